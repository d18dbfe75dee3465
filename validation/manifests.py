"""Where manifests come from: every stack file of the repo rendered in-process, or a folder of YAML.

Stacks are discovered by glob (`Pulumi.<stack>.yaml` and `examples/*.yaml`), so a new stack file is
validated without editing anything here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent

Manifest = dict[str, Any]


def discover_stack_files(root: Path = ROOT) -> list[Path]:
    """Every stack file: `Pulumi.*.yaml` at the root (not the project file `Pulumi.yaml`), then examples."""
    stacks = sorted(root.glob("Pulumi.*.yaml"))
    examples = sorted([*root.glob("examples/*.yaml"), *root.glob("examples/*.yml")])
    return stacks + examples


def stack_label(stack_file: Path, root: Path = ROOT) -> str:
    """`prod` for `Pulumi.prod.yaml`, `examples/<name>` for an example, the bare stack name for other paths."""
    stack = stack_file.name[len("Pulumi."):] if stack_file.name.startswith("Pulumi.") else stack_file.name
    stack = stack.rsplit(".", 1)[0]
    if stack_file.parent == root or not stack_file.is_relative_to(root):
        return stack
    return f"{stack_file.parent.relative_to(root)}/{stack}"


def render(stack: str | Path) -> list[Manifest]:
    """The exact manifests of a stack (a name such as `prod`, or a stack file path), rendered under mocks."""
    os.environ.setdefault("PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION", "true")
    from render import render_stack

    target = str(Path(stack).resolve()) if Path(stack).suffix in (".yaml", ".yml") else str(stack)
    return render_stack(target).manifests()


def read_dir(directory: Path) -> list[Manifest]:
    """Every document of every `*.yaml`/`*.yml` file in a folder (not recursive), in file-name order."""
    found: list[Manifest] = []
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        found.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def write_dir(manifests: list[Manifest], directory: Path) -> list[Path]:
    """One YAML file per manifest, named like `render.py` names them; the folder is emptied of YAML first."""
    from render import dump_yaml

    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.yaml"):
        old.unlink()
    written = []
    for index, manifest in enumerate(manifests, start=1):
        path = directory / f"{index:02d}-{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"
        path.write_text(dump_yaml(manifest))
        written.append(path)
    return written
