"""The gateway benchmark runs end to end on CPU: numbers come out both ways and every request got its exact length
through the gateway too. It checks that the script works, never a speed. The model server here runs the synthetic
engine (seconds to start, where the tiny model's server takes tens of seconds on this machine); the gateway, the
clients and the comparison are the same for both backends."""
from __future__ import annotations

import json

from serving.bench import gateway as gateway_bench


def test_gateway_benchmark_compares_direct_and_through_the_gateway(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "gateway.json"
    assert gateway_bench.main(["--backend", "synthetic", "--model-path", str(tiny_model_dir), "--max-num-seqs", "4", "--concurrency", "1,2",
                               "--requests-per-level", "2", "--rounds", "1", "--in-min", "4", "--in-max", "8",
                               "--out-min", "4", "--out-max", "8", "--client-processes", "1", "--repeat", "1",
                               "--json-out", str(out)]) == 0
    levels = json.loads(out.read_text())["levels"]
    assert [level["concurrency"] for level in levels] == [1, 2]
    for level in levels:
        for way in ("direct", "gateway"):
            assert level[way]["errors"] == 0 and level[way]["short_outputs"] == 0 and level[way]["ok"] >= 2
        assert level["direct"]["output_tokens"] == level["gateway"]["output_tokens"] > 0  # the same work both ways
        # Measured in clock ticks (10 ms): the gateway may spend less than one on a level this small.
        assert level["gateway_cpu_us_per_token"] >= 0 and level["throughput_loss_pct"] is not None
    assert "gateway CPU us/token" in capsys.readouterr().out
