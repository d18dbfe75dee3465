"""The liveness benchmark runs end to end against the real server: every mix is sent, every probe answered 200.
It checks that the script works and what it counts, never a speed (the numbers live in docs/BENCHMARKS.md)."""
from __future__ import annotations

import json

from serving.bench import liveness


def test_liveness_benchmark_probes_under_each_mix(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "liveness.json"
    liveness.main(["--model-path", str(tiny_model_dir), "--seconds", "1.5", "--clients", "2", "--max-model-len", "256",
                   "--mixes", "idle,huge-body,hostile-json,slow-body", "--json-out", str(out)])
    rows = {row["mix"]: row for row in json.loads(out.read_text())["mixes"]}
    assert list(rows) == ["idle", "huge-body", "hostile-json", "slow-body"]
    for row in rows.values():
        # A probe that did not answer 200 raises; each mix's clients reached the server without a transport error.
        assert row["probes"] >= 5 and row["client_errors"] == 0
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert rows["idle"]["clients"] == 0 and rows["huge-body"]["clients"] == 2
    assert "| hostile-json |" in capsys.readouterr().out


def test_an_unknown_mix_is_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        liveness.parse_args(["--model-path", "/tmp/x", "--mixes", "idle,teapot"])
    assert "unknown mix teapot" in capsys.readouterr().err
