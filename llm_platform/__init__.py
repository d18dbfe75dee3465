"""The llm-platform program's own modules, in layers (each imports only the ones below it; see pyproject.toml):

- `stack`: the composition point that reads, validates and plans a stack (`load()`, `parse_stack_config()`);
- `builders`: pure Kubernetes builders the components wire into resources;
- `plan`: the capacity plan (checks and computed values) over the validated config;
- `config`: the typed, validated stack configuration (the schema, its reader and the cross-field rules);
- leaf helpers: `capacity`, `metric_contract`, `model_source`, `quantities`.
"""
