"""`python -m validation`: renders or reads manifests, runs every layer, prints a table, exits non-zero on failure."""
from __future__ import annotations

from tests.validation.conftest import pick, prod_manifests
from validation.__main__ import main
from validation.manifests import write_dir


def test_clean_stack_exits_zero(capsys, checkov_bin, monkeypatch):
    monkeypatch.setenv("CHECKOV_BIN", checkov_bin)
    assert main(["prod"]) == 0
    out = capsys.readouterr().out
    assert "== prod: " in out
    assert [line.split()[1] for line in out.splitlines()[1:5]] == ["PASS"] * 4


def test_broken_folder_exits_one_and_names_the_finding(tmp_path, capsys, checkov_bin, monkeypatch):
    monkeypatch.setenv("CHECKOV_BIN", checkov_bin)
    manifests = prod_manifests()
    pick(manifests, "Service", "llm-service")["spec"]["ports"][0]["targetPort"] = "metrics"
    write_dir(manifests, tmp_path)
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "crossref  FAIL (1)" in out
    assert "service-target-port" in out and "Service/ai-production/llm-service" in out


def test_bad_stack_config_exits_two(tmp_path, capsys):
    stack = tmp_path / "Pulumi.broken.yaml"
    stack.write_text("config:\n  llm-platform:namespace: ai-broken\n  llm-platform:models: []\n")
    assert main([str(stack)]) == 2
    assert "models" in capsys.readouterr().err
