"""The benchmark scripts run end to end on CPU (tiny random model), so the GPU session's one prepared call does not
spend device time on a broken script. They check that numbers come out and work was exact, never a speed."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from serving.bench import engine_loop, engine_steps, loadtest
from tests.serving.server import REPO_ROOT, alive, children, command_line, descendants


def test_engine_steps_times_every_variant_and_checks_the_attention_forms_agree(tmp_path, capsys):
    out = tmp_path / "steps.json"
    assert engine_steps.main(["--shape", "tiny", "--device", "cpu", "--batches", "1,3", "--kv-len", "64",
                              "--prompts", "3", "--prompt-len", "16", "--repeat", "1", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    # On CPU only sdpa applies; flash and triton are skipped with their reasons.
    assert result["skipped"] == {"flash": "it needs a CUDA device (the engine runs on cpu)",
                                 "triton": "it needs a CUDA device (the engine runs on cpu)"}
    assert [(row["attention"], row["batch"]) for row in result["decode"]] == [("sdpa", 1), ("sdpa", 3)]
    assert all(row["eager_ms"] > 0 and row["graph_ms"] is None for row in result["decode"])  # no graphs on CPU
    for row in result["decode"]:  # rows hold a spread of lengths within the bucket: less to read than the bucket
        assert 16 <= row["mean_len"] <= 64 and 0 < row["floor_ms"] <= row["bucket_floor_ms"]
    assert [row["what"] for row in result["prefill"]] == ["prefill, one prompt per pass",
                                                          "prefill, packed in one pass"]
    assert all(row["same_result"] for row in result["attention"])
    printed = capsys.readouterr().out
    assert "| decode step |" in printed and "prefill, packed in one pass" in printed


def test_engine_steps_times_flash_beside_sdpa_where_it_applies(tmp_path, monkeypatch):
    """With a flash kernel (the CPU stand-in here) every section gets a flash row that agrees with sdpa."""
    from serving.engine import attention as attention_module
    from tests.serving.flash_reference import flash_varlen_reference

    monkeypatch.setattr(engine_steps, "flash_unavailable_reason", lambda *args: None)
    monkeypatch.setattr(attention_module.torch.ops.aten, "_flash_attention_forward", flash_varlen_reference,
                        raising=False)
    out = tmp_path / "steps.json"
    assert engine_steps.main(["--shape", "tiny", "--device", "cpu", "--batches", "2", "--kv-len", "64",
                              "--prompts", "2", "--prompt-len", "16", "--repeat", "1", "--attention", "sdpa,flash",
                              "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["skipped"] == {}
    assert [row["attention"] for row in result["decode"]] == ["sdpa", "flash"]
    assert [(row["what"], row["attention"]) for row in result["prefill"]] == [
        ("prefill, one prompt per pass", "sdpa"), ("prefill, packed in one pass", "sdpa"),
        ("prefill, packed in one pass", "flash")]
    assert [(row["attention"], row["same_result"]) for row in result["attention"]] == [("sdpa", True),
                                                                                      ("flash", True)]


def test_engine_loop_runs_every_request_to_its_length_and_times_the_decode_steps(tmp_path, capsys):
    for device_ms in ("0", "0.5"):  # without device time, and with a simulated device step
        out = tmp_path / f"loop-{device_ms}.json"
        assert engine_loop.main(["--batches", "1,5", "--steps", "12", "--rounds", "2", "--device-ms", device_ms,
                                 "--slots", "8", "--json-out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["device_ms"] == float(device_ms)
        assert [level["batch"] for level in result["levels"]] == [1, 5]
        for level in result["levels"]:
            # Every request got all its tokens, one decode step per token after the first, with the simulated device
            # (the engine overlaps it, as on CUDA) or without: no step is launched past the end.
            assert level["tokens"] == level["batch"] * 12 and level["steps"] == 11
            assert level["ms_per_step"] > 0 and len(level["ms_per_step_all"]) == 2
    assert "loop ms/step" in capsys.readouterr().out


@pytest.mark.parametrize("temperature", ["0", "0.7"])
def test_engine_loop_closed_loop_replaces_each_finished_request_and_reports_the_devices_busy_time(tmp_path,
                                                                                                   temperature):
    out = tmp_path / "closed.json"
    assert engine_loop.main(["--batches", "4", "--arrivals", "14", "--steps", "9", "--steps-min", "3",
                             "--prompt-len", "40", "--prompt-min", "5", "--max-prefill-tokens", "32",
                             "--device-ms", "0.5", "--prefill-us", "20", "--rounds", "1",
                             "--temperature", temperature, "--json-out", str(out)]) == 0
    level = json.loads(out.read_text())["levels"][0]
    # 14 requests, 4 at a time, greedy or sampled on the simulated device: more decode steps than the longest
    # request alone would take, every token delivered (run_level checks the total against the requests' lengths).
    assert level["requests"] == 14 and 3 * 14 <= level["tokens"] <= 9 * 14
    assert level["steps"] > 9
    assert 0.0 < level["device_busy"] <= 1.0


def test_loadtest_drives_a_real_server_and_gets_exact_lengths(tmp_path, capsys):
    out = tmp_path / "load.json"
    loadtest.main(["--model-path", str(tmp_path / "model"), "--random-model", "tiny", "--device", "cpu",
                   "--dtype", "float32", "--cuda-graphs", "off", "--concurrency", "1,3", "--requests-per-level", "3",
                   "--rounds", "1", "--in-min", "8", "--in-max", "24", "--out-min", "4", "--out-max", "9",
                   "--json-out", str(out)])
    levels = json.loads(out.read_text())["levels"]
    assert [level["concurrency"] for level in levels] == [1, 3]
    for level in levels:
        assert level["errors"] == 0 and level["short_outputs"] == 0 and level["ok"] == level["requests"] >= 3
        assert level["output_tok_s"] > 0
    assert "out tok/s" in capsys.readouterr().out


@pytest.mark.parametrize("script, when, signals", [
    ("loadtest", "while the server loads its model", "twice"),
    ("loadtest", "while the server loads its model", "then to the group"),
    ("loadtest", "while the client processes run", "once"),
    ("loadtest", "while the client processes run", "then to the group"),
    ("http_layer", "while the client processes run", "once"),
])
def test_sigterm_stops_a_benchmark_with_its_server_and_client_processes(tiny_model_dir, tmp_path, script, when,
                                                                        signals):
    """SIGTERM to the benchmark (`kill`), a second one while the first one's cleanup runs, or one to it and then its
    whole process group (as `timeout` sends it, which gpu_session.sh runs each stage under): nothing it started is
    left running."""
    command = [sys.executable, "-m", f"serving.bench.{script}", "--model-path", str(tiny_model_dir),
               "--concurrency", "4", "--client-processes", "2", "--requests-per-level", "100000", "--in-min", "8",
               "--in-max", "16", "--out-min", "8", "--out-max", "16", "--json-out", str(tmp_path / "load.json")]
    if script == "loadtest":
        command += ["--device", "cpu", "--dtype", "float32", "--cuda-graphs", "off"]
        server_command = " -m serving --model-path"
    else:
        server_command = " -m serving.bench.http_layer --serve"
    load = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            tree = descendants(load.pid)
            server = [pid for pid in tree if server_command in command_line(pid)]
            if when == "while the server loads its model":  # its engine process is up, the model not loaded yet
                ready = server and any("spawn_main" in command_line(pid) for pid in descendants(server[0]))
            else:
                ready = len([pid for pid in children(load.pid) if "spawn_main" in command_line(pid)]) == 2
            if server and ready:
                break
            assert load.poll() is None and time.monotonic() < deadline, load.communicate()[0].decode()
            time.sleep(0.02)
        if when == "while the server loads its model":
            assert '"event": "ready"' not in (tmp_path / "load.server.log").read_text()
        load.send_signal(signal.SIGTERM)
        if signals == "twice":
            time.sleep(0.2)  # the first one's cleanup now waits for the server to stop
            load.send_signal(signal.SIGTERM)
        elif signals == "then to the group":
            os.killpg(load.pid, signal.SIGTERM)
        assert load.wait(60) == 128 + signal.SIGTERM, load.communicate()[0].decode()[-2000:]
        # Its server had stopped before it exited (under `timeout`, the next stage must find the GPU free)...
        time.sleep(0.2)  # (reaped by then)
        assert not alive(server[0]), "the server outlived the load test"
        # ... and its client processes and every helper process went with it.
        deadline = time.monotonic() + 10
        while left := [(pid, command_line(pid)) for pid in tree if alive(pid)]:
            assert time.monotonic() < deadline, f"still running after the load test stopped: {left}"
            time.sleep(0.1)
    finally:  # whatever the outcome, leave nothing running
        load.kill()
        for leftover in tree + [p for pid in tree for p in descendants(pid)]:
            if alive(leftover):
                os.kill(leftover, signal.SIGKILL)


def test_report_sets_each_level_beside_its_target_and_the_roofline(tmp_path):
    from serving.bench import report

    level = {"ttft_p50_ms": 20.0, "ttft_p99_ms": 90.0, "itl_p50_ms": 1.5, "itl_p99_ms": 4.0, "errors": 0,
             "short_outputs": 0}
    (tmp_path / "load.json").write_text(json.dumps({"levels": [
        {"concurrency": 1, "output_tok_s": 672.5, **level},
        {"concurrency": 64, "output_tok_s": 29_000.0, "client_busy_max": 0.915, **level}]}))
    (tmp_path / "steps.json").write_text(json.dumps({
        "decode": [{"attention": "flash", "batch": 1, "kv_len": 1024, "mean_len": 700, "eager_ms": 9.0,
                    "graph_ms": 1.9, "floor_ms": 0.75, "bucket_floor_ms": 0.76, "tokens_per_s": 526.3,
                    "roofline_tokens_per_s": 1345.0},
                   {"attention": "flash", "batch": 64, "kv_len": 1024, "mean_len": 640, "eager_ms": 10.0,
                    "graph_ms": 2.5, "floor_ms": 1.1, "bucket_floor_ms": 1.4, "tokens_per_s": 25600.0,
                    "roofline_tokens_per_s": 58000.0}],
        "prefill": [], "attention": [], "skipped": {"sdpa": "not asked for"}}))
    (tmp_path / "http-on.json").write_text(json.dumps({"levels": [
        {"concurrency": 256, "requests": 512, "errors": 0, "short_outputs": 0, "engine_tok_s": 42666.7,
         "output_tok_s": 19105.8, "server_cpu_us_per_token": 44.1, "ttft_p99_ms": 369.7, "itl_p50_ms": 9.6,
         "itl_p99_ms": 22.8}]}))
    (tmp_path / "http-requests.json").write_text(json.dumps({"levels": [
        {"concurrency": 64, "requests": 4000, "errors": 0, "short_outputs": 0, "engine_tok_s": 116363.6,
         "output_tok_s": 848.0, "server_cpu_us_per_token": 1237.5, "ttft_p99_ms": 140.2, "itl_p50_ms": None,
         "itl_p99_ms": None}]}))
    text = report.report(tmp_path)
    assert "|  256 |  512 |      0 |     0 |      42666.7 |      19105.8 |                      44.1 |" in text
    per_request = text.split("The HTTP process's work per request")[1]
    assert "|   64 | 4000 |      0 |     0 |     116363.6 |        848.0 |                    1237.5 |" in per_request
    assert "synthetic engine in its own process" in text and "on a thread of the server" not in text
    assert "|    1 |     672.5 |    600 |       50.0% |" in text
    assert "|   64 |  29,000.0 | 12,000 |       50.0% |" in text
    # How busy the busiest client process was, where the level recorded it (older results did not).
    end_to_end = text.split("Engine steps")[0]
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in end_to_end.splitlines()
            if line.startswith("|") and line.split("|")[1].strip() in ("1", "64")}
    assert rows == {"1": "-", "64": "92%"}
    assert "Baselines" not in text  # none were measured
    assert "|     flash |    64 |   1024 |      640 |    10.00 |     2.50 |     1.10 |            1.40 |" in text
    assert "sdpa was not timed: not asked for." in text
    assert report.main([str(tmp_path / "missing")]) == 2
    # --write puts the same report between the markers of a document, leaving the rest as it was.
    document = tmp_path / "BENCHMARKS.md"
    document.write_text(f"# Before\n\n{report.BEGIN}\nold results\n{report.END}\n\n## After\n")
    assert report.main([str(tmp_path), "--write", str(document)]) == 0
    written = document.read_text()
    assert written == f"# Before\n\n{report.BEGIN}\n{text.strip()}\n{report.END}\n\n## After\n"
    document.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs one <!-- gpu-session:begin --> line"):
        report.main([str(tmp_path), "--write", str(document)])


def test_http_layer_streams_every_token_from_the_synthetic_engine_and_reads_the_server_cpu(tmp_path, capsys):
    from serving.bench import http_layer

    out = tmp_path / "http.json"
    # Three client processes: the levels' clients (2 and 6) and requests are split over them and merged back.
    assert http_layer.main(["--model-path", str(tmp_path / "tokenizer"), "--device-ms", "1", "--python-ms", "0.5",
                            "--max-running", "4", "--concurrency", "2,6", "--requests-per-level", "6",
                            "--rounds", "1", "--in-min", "8", "--in-max", "24", "--out-min", "5", "--out-max", "12",
                            "--client-processes", "3", "--json-out", str(out)]) == 0
    levels = json.loads(out.read_text())["levels"]
    assert [level["concurrency"] for level in levels] == [2, 6]
    assert [level["client_processes"] for level in levels] == [2, 3]  # never more processes than clients
    work = [loadtest.make_work(6, index, argparse.Namespace(in_min=8, in_max=24, out_min=5, out_max=12,
                                                            token_id_min=10, token_id_max=510))
            for index in range(2)]
    for level, requests in zip(levels, work):
        assert level["errors"] == 0 and level["short_outputs"] == 0 and level["ok"] == level["requests"] == 6
        assert level["output_tokens"] == sum(max_tokens for _, max_tokens in requests)  # each request once
        assert level["server_cpu_s"] > 0 and level["server_cpu_us_per_token"] > 0
        assert level["client_cpu_us_per_token"] > 0 and 0 < level["client_busy_max"] <= 1
    # The engine alone would stream min(concurrency, slots) tokens per 1.5 ms step.
    assert [level["engine_tok_s"] for level in levels] == [round(2 / 1.5e-3, 1), round(4 / 1.5e-3, 1)]
    assert "HTTP process CPU us/token" in capsys.readouterr().out


def _chunked(events: list[bytes]) -> bytes:
    """A chunked HTTP body carrying `events` in chunks of odd sizes, one with a chunk extension, and the last chunk."""
    payload = b"".join(events)
    sizes, position, framed = [7, 1, 40, 3], 0, []
    for index, size in enumerate(sizes * len(payload)):
        if position >= len(payload):
            break
        part = payload[position:position + size]
        position += size
        extension = b";name=value" if index == 2 else b""
        framed.append(b"%x%s\r\n%s\r\n" % (len(part), extension, part))
    return b"".join(framed) + b"0\r\n\r\n"


@pytest.mark.parametrize("chunked", [True, False])
def test_loadtest_client_parses_events_whatever_blocks_the_body_arrives_in(chunked):
    events = [b'data: {"choices": [{"text": "t%d"}]}\n\n' % i for i in range(12)] + [b"data: [DONE]\n\n"]
    body = _chunked(events) if chunked else b"".join(events)
    expected = [event[:-2] for event in events]
    rng = random.Random(0)
    for trial in range(200):  # every split point once, then random splits into many blocks
        cuts = [trial] if trial < len(body) else sorted(rng.sample(range(1, len(body)), rng.randint(2, 30)))
        parser = loadtest._SseEvents(chunked=chunked)
        got = []
        for start, end in zip([0, *cuts], [*cuts, len(body)]):
            got += parser.feed(body[start:end])
        assert got == expected, (trial, cuts)
        assert parser.done is chunked  # the last chunk ends a chunked body; a plain one ends when the server closes
    if chunked:  # a size line that is not one is the server's error, not the end of its body
        with pytest.raises(ValueError):
            loadtest._SseEvents(chunked=True).feed(b"\r\n" + body)


def _serve_slowly(gaps_s: list[float]):
    """An HTTP server that sends an event stream's head, then one event after each gap in `gaps_s`."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        for gap in gaps_s:
            await asyncio.sleep(gap)
            writer.write(b'data: {"choices": [{"text": "t"}]}\n\n')
            await writer.drain()
        writer.write(b'data: {"choices": [], "usage": {"completion_tokens": %d}}\n\n' % len(gaps_s))
        writer.close()
    return handle


@pytest.mark.parametrize("gaps_s, fails", [([0.15] * 6, False), ([0.05, 0.6], True)])
def test_loadtest_client_fails_a_request_only_after_its_timeout_passes_without_progress(gaps_s, fails):
    async def run() -> loadtest.RequestResult:
        server = await asyncio.start_server(_serve_slowly(gaps_s), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await loadtest.stream_completion(f"http://127.0.0.1:{port}/v1/completions",
                                                    {"max_tokens": len(gaps_s)}, None, timeout=0.4)

    result = asyncio.run(run())
    # Six events 0.15 s apart take 0.9 s in all, more than the 0.4 s timeout, and must not fail: the timeout
    # counts from the last bytes received. A 0.6 s silence must.
    if fails:
        assert result.error is not None and "TimeoutError" in result.error
        assert len(result.chunk_times) == 1
    else:
        assert result.error is None and result.output_tokens == 6 and len(result.chunk_times) == 6
        assert result.ended - result.started > 0.4


def test_loadtest_refuses_no_client_processes():
    with pytest.raises(SystemExit):
        loadtest.parse_args(["--url", "http://127.0.0.1:1", "--client-processes", "0"])


def test_stream_path_times_each_part_of_a_streamed_token(tmp_path, capsys):
    from serving.bench import stream_path

    out = tmp_path / "parts.json"
    assert stream_path.main(["--repeat", "1", "--json-out", str(out)]) == 0
    parts = json.loads(out.read_text())["us_per_token"]
    assert set(parts) == {"detokenizer", "detokenizer, two stop strings", "engine stream (one output per loop turn)",
                          "SSE event of a text delta"}
    assert all(us > 0 for us in parts.values())
    assert "| part of the streaming path |" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("requests, concurrency, processes", [(24, 6, 4), (128, 64, 3), (512, 256, 4), (7, 3, 2)])
def test_a_level_split_over_client_processes_gives_each_the_same_work_per_client(requests, concurrency, processes):
    work = list(range(requests))
    shares = loadtest.split_level(work, concurrency, processes)
    assert sorted(item for share, _ in shares for item in share) == work  # every request once
    assert sum(clients for _, clients in shares) == concurrency
    rounds = [len(share) / clients for share, clients in shares]
    # The same number of rounds per client everywhere (to within the one partial round a closed loop has anyway).
    assert max(rounds) - min(rounds) <= 1, rounds
    assert max(rounds) <= -(-requests // concurrency)


def test_paged_kv_compare_sets_each_measurement_of_the_two_layouts_side_by_side():
    from serving.bench.paged_kv import compare

    def run(label, uncached, cached, peak, rates):
        return {"label": label, "ttft": {"tiny": {"prefix_len": 1000, "uncached_ms": uncached, "cached_ms": cached}},
                "admission": {"tiny": {"kv_capacity_tokens": 65536, "requests": 256, "peak_running": peak}},
                "throughput": {"tiny": [{"streams": streams, "output_tok_s": rate, "min_tok_s": rate - 1,
                                         "max_tok_s": rate + 1} for streams, rate in zip((16, 64), rates)]}}

    table = compare(run("contiguous", 20.0, 20.0, 16, (100.0, 200.0)), run("paged", 21.0, 2.0, 160, (110.0, 180.0)))
    lines = table.splitlines()
    assert "contiguous" in lines[0] and "paged" in lines[0]
    assert any("10.0x faster" in line for line in lines)  # 20 ms against 2 ms with the prefix cached
    assert any("sequences running at once" in line and "10.0x" in line for line in lines)
    assert any("16 streams" in line and "1.10x" in line for line in lines)
    assert any("64 streams" in line and "0.90x" in line for line in lines)
