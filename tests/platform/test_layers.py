"""The static checks can fail: each import-linter contract, ruff and mypy reject a deliberately wrong change.

Each case copies the platform's sources and pyproject.toml into a temporary folder, plants one wrong line there, and
runs the tool as `.ci/run` does; the untouched copy passes first, so a failure is the planted line's.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COPIED = ["llm_platform", "components", "validation", "serving", "pyproject.toml", "render.py", "config_reference.py",
          "__main__.py"]


def tool(name: str) -> str:
    found = Path(sys.executable).parent / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        pytest.skip(f"{name} is not installed (requirements-dev.txt pins it)")
    return on_path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the platform's sources (Python files only) and its check configuration."""
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=lambda folder, names: [
                n for n in names if not n.endswith(".py") and not (Path(folder) / n).is_dir()
                or n in ("__pycache__", ".venv")])
        else:
            shutil.copy(source, tmp_path / name)
    return tmp_path


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def plant(tree: Path, module: str, line: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}\n")


def test_contracts_hold_on_the_untouched_tree(tree):
    result = run([tool("lint-imports")], tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    # config below plan: the plan builds on the config, never the reverse (the old stack_config <-> planning cycle).
    ("llm_platform/config.py", "from llm_platform import plan", "Platform layers"),
    # the plan below the components and builders.
    ("llm_platform/plan.py", "import components.llm_serving", "Platform layers"),
    ("llm_platform/plan.py", "from llm_platform import builders", "Platform layers"),
    # leaf helpers import no config.
    ("llm_platform/quantities.py", "from llm_platform import config", "Platform layers"),
    # the composition point and the components are independent.
    ("components/gpu_pool.py", "from llm_platform import stack", "Platform layers"),
    ("llm_platform/metric_contract.py", "import serving.gateway", "The platform never imports the serving image"),
    ("serving/__init__.py", "import llm_platform.config", "The serving image never imports the platform"),
    # the engine below its callers: the engine never reaches up into the HTTP layer.
    ("serving/engine/interface.py", "import serving.api.openai", "Serving layers"),
    ("serving/state.py", "import serving.app", "Serving layers"),
    # the HTTP side never touches tensors, and the gateway carries no engine.
    ("serving/api/health.py", "import torch", "The HTTP side never touches tensors"),
    ("serving/gateway/balancer.py", "import serving.engine.engine", "The gateway needs no engine"),
])
def test_a_wrong_import_breaks_its_contract(tree, module, line, contract):
    plant(tree, module, line)
    result = run([tool("lint-imports")], tree)
    assert result.returncode != 0
    broken = [text for text in result.stdout.splitlines() if text.endswith("BROKEN")]
    assert broken and contract in " ".join(result.stdout.split()), result.stdout


def test_ruff_rejects_an_unused_import_and_a_serving_import_in_a_root_script(tree):
    assert run([tool("ruff"), "check", "--no-cache"], tree).returncode == 0
    plant(tree, "llm_platform/quantities.py", "import os")
    plant(tree, "render.py", "import serving")
    result = run([tool("ruff"), "check", "--no-cache", "--output-format", "concise"], tree)
    assert result.returncode != 0
    assert "llm_platform/quantities.py" in result.stdout and "F401" in result.stdout
    assert "render.py" in result.stdout and "TID251" in result.stdout


def test_mypy_rejects_a_type_error_in_the_platform(tree):
    checked = ["llm_platform/quantities.py", "llm_platform/model_source.py"]
    clean = run([tool("mypy"), "--no-incremental", *checked], tree)
    assert clean.returncode == 0, clean.stdout
    plant(tree, "llm_platform/quantities.py", "def whole_gib(value: Decimal) -> int:\n    return value / 2**30")
    result = run([tool("mypy"), "--no-incremental", *checked], tree)
    assert result.returncode != 0
    assert 'llm_platform/quantities.py' in result.stdout and "Incompatible return value type" in result.stdout
