"""What the gateway costs: the same closed-loop streaming load straight at a model server and through the gateway,
level by level in one run on one machine, and the gateway process's CPU time per streamed token.

The model server is `python -m serving` on a model directory (`--backend model`, tiny random weights by default,
on CPU), or the HTTP-layer benchmark's server on a synthetic engine (`--backend synthetic`: no model work, so the
machine's cores go to HTTP alone and the comparison is steadier). The gateway is `python -m serving.gateway` with
one static route to it and its default logging (one access line per request). Each concurrency level runs direct,
then through the gateway, `--repeat` times interleaved, with `serving.bench.loadtest`'s clients and prompts. Per
level it reports each way's best output tokens/s and the loss, TTFT p50/p99 both ways, and the gateway's CPU
microseconds per streamed token (from /proc). On a machine with few cores the gateway's CPU is taken from the
server's, so the loss measured there is an upper bound of what a gateway on its own nodes costs.

    python -m serving.bench.gateway --concurrency 1,16,64 --json-out /tmp/bench-gateway.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from serving.bench import loadtest
from serving.bench.http_layer import cpu_seconds

MODEL_NAME = "bench"


def start_backend(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = loadtest.free_port()
    if args.backend == "synthetic":
        command = [sys.executable, "-m", "serving.bench.http_layer", "--serve", "--model-path", str(args.model_path),
                   "--port", str(port), "--device-ms", str(args.device_ms), "--python-ms", "0.1",
                   "--max-running", str(args.max_num_seqs), "--engine-process", "on"]
    else:
        command = [sys.executable, "-m", "serving", "--model-path", str(args.model_path), "--model-name", MODEL_NAME,
                   "--host", "127.0.0.1", "--port", str(port), "--device", args.device, "--dtype", args.dtype,
                   "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning"]
    return loadtest.launch_server(command, port, args.startup_timeout, log_path,
                                  env={**os.environ, "API_KEY": "", "API_KEYS_FILE": ""})


def start_gateway(args: argparse.Namespace, upstream: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = loadtest.free_port()
    command = [sys.executable, "-m", "serving.gateway", "--host", "127.0.0.1", "--port", str(port),
               "--route", f"{MODEL_NAME}={upstream}", "--max-inflight-per-pod", "4096", "--max-queue", "4096"]
    process = subprocess.Popen(command, cwd=loadtest.REPO_ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, "API_KEY": "", "API_KEYS_FILE": "", "ROUTES": "",
                                             "ROUTES_FILE": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_routed(process, url, args.startup_timeout, log_path)
    except BaseException:
        loadtest.stop_server(process, 30)
        raise
    return process, url


def _wait_routed(process: subprocess.Popen, url: str, timeout: float, log_path: Path) -> None:
    """Until the gateway listens and sees the server ready (its readiness probe of the route passed)."""
    ready_line = f'llm_gateway_ready_pods{{model="{MODEL_NAME}"}} 1.0'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"gateway exited with {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/metrics", timeout=2) as response:
                if ready_line in response.read().decode():
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    sys.exit(f"gateway did not route to the server within {timeout}s; see {log_path}")


async def run_levels(args: argparse.Namespace, direct_url: str, gateway_url: str, gateway_pid: int) -> list[dict]:
    """Each level `--repeat` times each way, interleaved (direct, gateway, direct, ...), so a neighbour's load on a
    shared machine falls on both ways alike; each way's run with the most tokens/s stands for it, all are kept."""
    levels = []
    for index, concurrency in enumerate(int(c) for c in args.concurrency.split(",")):
        direct_runs, gateway_runs = [], []
        for _ in range(args.repeat):
            direct_runs.append(await loadtest.run_level(args, direct_url, concurrency, index))
            before = cpu_seconds(gateway_pid)
            through = await loadtest.run_level(args, gateway_url, concurrency, index)
            cpu = cpu_seconds(gateway_pid) - before
            through["gateway_cpu_s"] = round(cpu, 2)
            tokens = through["output_tokens"]
            through["gateway_cpu_us_per_token"] = round(cpu / tokens * 1e6, 1) if tokens else None
            gateway_runs.append(through)
        direct = max(direct_runs, key=lambda run: run["output_tok_s"])
        through = max(gateway_runs, key=lambda run: run["output_tok_s"])
        level = {
            "concurrency": concurrency, "direct": direct, "gateway": through,
            "throughput_loss_pct": (round((1 - through["output_tok_s"] / direct["output_tok_s"]) * 100, 1)
                                    if direct["output_tok_s"] else None),
            "gateway_cpu_us_per_token": through["gateway_cpu_us_per_token"],
            "direct_runs": direct_runs, "gateway_runs": gateway_runs,
        }
        print(json.dumps({"concurrency": concurrency,
                          "direct_tok_s": [run["output_tok_s"] for run in direct_runs],
                          "gateway_tok_s": [run["output_tok_s"] for run in gateway_runs],
                          "gateway_cpu_us_per_token": [run["gateway_cpu_us_per_token"] for run in gateway_runs]}),
              file=sys.stderr, flush=True)
        levels.append(level)
    return levels


def format_table(levels: list[dict]) -> str:
    header = ["conc", "errors (direct/gw)", "direct tok/s", "gateway tok/s", "loss %", "TTFT p50 ms direct",
              "TTFT p50 ms gw", "TTFT p99 ms direct", "TTFT p99 ms gw", "gateway CPU us/token"]
    rows = [[str(level["concurrency"]), f"{level['direct']['errors']}/{level['gateway']['errors']}",
             str(level["direct"]["output_tok_s"]), str(level["gateway"]["output_tok_s"]),
             str(level["throughput_loss_pct"]), str(level["direct"]["ttft_p50_ms"]),
             str(level["gateway"]["ttft_p50_ms"]), str(level["direct"]["ttft_p99_ms"]),
             str(level["gateway"]["ttft_p99_ms"]), str(level["gateway_cpu_us_per_token"])] for level in levels]
    return loadtest.markdown_table([header, *rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    backend = parser.add_argument_group("the model server")
    backend.add_argument("--backend", choices=["model", "synthetic"], default="model",
                         help="python -m serving on --model-path, or a synthetic engine (no model work)")
    backend.add_argument("--model-path", type=Path, default=Path(tempfile.gettempdir()) / "bench-gateway-tiny",
                         help="model directory (tiny random weights are built there if it has no config.json)")
    backend.add_argument("--device", default="cpu")
    backend.add_argument("--dtype", default="float32")
    backend.add_argument("--max-num-seqs", type=int, default=64, help="engine slots (synthetic: running requests)")
    backend.add_argument("--device-ms", type=float, default=4.0, help="synthetic backend: per engine step")
    backend.add_argument("--startup-timeout", type=float, default=300)
    load = parser.add_argument_group("load (as serving.bench.loadtest)")
    load.add_argument("--concurrency", default="1,16,64")
    load.add_argument("--requests-per-level", type=int, default=64)
    load.add_argument("--rounds", type=int, default=2, help="at least rounds x concurrency requests per level")
    load.add_argument("--in-min", type=int, default=32)
    load.add_argument("--in-max", type=int, default=128)
    load.add_argument("--out-min", type=int, default=64)
    load.add_argument("--out-max", type=int, default=128)
    load.add_argument("--repeat", type=int, default=2, help="runs of each level each way, interleaved; the best "
                      "of each way is reported (default 2)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--timeout", type=float, default=300, help="seconds without progress before a request fails")
    load.add_argument("--max-level-seconds", type=float, default=0, help="stop issuing requests after this long")
    loadtest.add_client_processes_argument(load)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    # What loadtest.run_level reads besides the above.
    args.model, args.api_key, args.warmup, args.token_id_min = MODEL_NAME, None, True, 10
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with loadtest.sigterm_unwinds():
        return _measure(args)


def _measure(args: argparse.Namespace) -> int:
    if not (args.model_path / "config.json").is_file():
        print(f"building tiny random weights in {args.model_path}", file=sys.stderr)
        loadtest.build_random_model(args.model_path, "tiny")
    vocab = json.loads((args.model_path / "config.json").read_text())["vocab_size"]
    args.token_id_max = min(vocab - 2, 32000)  # below the random models' special tokens
    logs = args.json_out.with_suffix("") if args.json_out else Path(tempfile.gettempdir()) / "bench-gateway"
    print(f"logs: {logs}.server.log, {logs}.gateway.log", file=sys.stderr)
    server = gateway = None
    try:
        server, direct_url = start_backend(args, Path(f"{logs}.server.log"))
        gateway, gateway_url = start_gateway(args, direct_url, Path(f"{logs}.gateway.log"))
        levels = loadtest.run_async(run_levels(args, direct_url, gateway_url, gateway.pid))
    finally:
        if gateway is not None:
            loadtest.stop_server(gateway, 30)
        if server is not None:
            loadtest.stop_server(server, 60)
    print(format_table(levels))
    if args.json_out:
        loadtest.write_run(args.json_out, args, levels=levels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
