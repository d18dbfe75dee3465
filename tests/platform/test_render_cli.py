"""`python render.py STACK --out DIR`, run as a newcomer would: real files, integers, no secrets, clear errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def run_render(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "render.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_render_prod_writes_one_document_per_resource(tmp_path):
    proc = run_render("prod", "--out", str(tmp_path / "prod"))
    assert proc.returncode == 0, proc.stderr
    files = sorted((tmp_path / "prod").glob("*.yaml"))
    assert len(files) == 32
    docs = [list(yaml.safe_load_all(f.read_text())) for f in files]
    assert all(len(d) == 1 for d in docs)
    kinds = [d[0]["kind"] for d in docs]
    assert kinds[0] == "Namespace" and "Deployment" in kinds
    text = "\n".join(f.read_text() for f in files)
    assert "mock-" not in text                      # the generated API key never lands in a file
    assert "replicas: 2\n" in text and "replicas: 2.0" not in text   # whole numbers are integers
    assert "stack prod: 32 manifests" in proc.stdout
    assert "output apiKey: [secret]" in proc.stdout


def test_render_is_deterministic(tmp_path):
    run_render("prod", "--out", str(tmp_path / "a"))
    run_render("prod", "--out", str(tmp_path / "b"))
    a = {f.name: f.read_text() for f in (tmp_path / "a").glob("*.yaml")}
    b = {f.name: f.read_text() for f in (tmp_path / "b").glob("*.yaml")}
    assert a == b


def test_render_bad_config_exits_2_with_the_message(tmp_path):
    bad = tmp_path / "Pulumi.broken.yaml"
    text = (ROOT / "Pulumi.prod.yaml").read_text().replace("maxReplicas: 10", "maxReplicas: 1")
    bad.write_text(text)
    proc = run_render(str(bad), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: stack 'broken': llm-platform:models[0].autoscaling.maxReplicas: "
                                   "1 is below minReplicas 2")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_render_unknown_stack_lists_the_known_ones(tmp_path):
    proc = run_render("qa", "--out", str(tmp_path))
    assert proc.returncode != 0
    assert "no stack file Pulumi.qa.yaml; known stacks: dev, prod, staging" in proc.stderr


def test_readme_config_reference_is_current():
    """The README's config table is generated from llm_platform/config.py; a stale table fails here."""
    proc = subprocess.run([sys.executable, str(ROOT / "config_reference.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_render_works_after_asyncio_run_cleared_the_event_loop():
    """Tests and embedding programs may call asyncio.run first, which leaves the thread without a loop."""
    import asyncio

    from render import render_stack

    async def nothing():
        return None

    asyncio.run(nothing())
    assert len(render_stack("dev").manifests()) >= 10
