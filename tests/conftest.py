"""Shared fixtures: the recording Pulumi mocks (from render.py, the same ones `render` uses) and stack configs.

`render_values(stack, values)` runs the real `__main__.py` under mocks with a config dict; `stack_values(stack)`
gives a stack file's config (without the `llm-platform:` prefix) to copy and break in bad-config tests.
`tiny_model_dir` is one tiny random-weight model directory per test session, built offline.
"""
from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

# Pulumi (through render) is imported inside the helpers: the serving tests then run where only the serving
# image's packages are installed (the GPU machine's one prepared call runs the GPU tests there).


def stack_values(stack: str) -> dict[str, Any]:
    """A deep copy of `Pulumi.<stack>.yaml`'s config, keys without the project prefix."""
    from render import stack_file

    _, path = stack_file(stack)
    config = yaml.safe_load(path.read_text())["config"]
    return copy.deepcopy({key.split(":", 1)[1]: value for key, value in config.items()})


def as_pulumi_config(values: dict[str, Any]) -> dict[str, str]:
    """What the Pulumi CLI hands the program: `project:key` -> string (JSON for objects)."""
    from render import PROJECT

    return {f"{PROJECT}:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def render_values(stack: str, values: dict[str, Any]):
    """Run the program under the recording mocks with `values` as the stack's config; a `render.RenderResult`."""
    from render import run_program

    return run_program(stack, as_pulumi_config(values))


_RENDERED: dict[str, Any] = {}


@pytest.fixture
def rendered():
    """Render a stack file once per test session: `rendered("prod")`."""
    def get(stack: str):
        if stack not in _RENDERED:
            _RENDERED[stack] = render_values(stack, stack_values(stack))
        return _RENDERED[stack]
    return get


@pytest.fixture
def in_mocks():
    """Run a callable that builds components under the recording mocks: `in_mocks(lambda: GpuPool(...))`."""
    from render import run_with_mocks

    def run(build, stack: str = "test"):
        return run_with_mocks(stack, {}, build)
    return run


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tests.serving.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
