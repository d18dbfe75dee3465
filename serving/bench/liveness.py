"""How fast the liveness probe answers while clients send the requests that used to stall the event loop.

The kubelet kills a pod whose `/health/live` misses its timeout (prod: 5 s, three times), and a stalled event loop
cannot answer it, whatever the engine is doing. This starts the real server (`python -m serving`, a random model of
a real architecture or a model directory you give), probes `/health/live` every `--probe-interval-ms` on a fresh
connection from a process of its own (as the kubelet does), and per request mix reports the probe's latency (p50,
p99, max) while `--clients` clients keep sending that mix:

- `idle`: nothing else;
- `huge-body`: 1 MiB prompts, past the body limit derived from the context window (413 after reading the body);
- `char-bound`: prompts just under the body limit but far past what the context window can hold (refused by
  the character bound before tokenizing; the body is parsed off the loop);
- `hostile-json`: deeply nested arrays and a 5,000-digit integer (400);
- `stream`: ordinary streamed completions, `--clients` at a time;
- `slow-body`: clients that send the headers and then a byte per second (the body timeout answers 408).

    python -m serving.bench.liveness --random-model tiny --model-path /tmp/tiny-model --seconds 10

Prints a table and, with `--json-out`, writes the numbers. The issue's bound is 100 ms under any mix.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from serving.bench import loadtest

MIXES = ("idle", "huge-body", "char-bound", "hostile-json", "stream", "slow-body")


async def _request(host: str, port: int, raw: bytes, read: bool = True) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        if read:
            while await reader.read(65536):
                pass
    finally:
        writer.close()


def _post(path: str, body: bytes, *, declared: int | None = None) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {declared if declared is not None else len(body)}\r\n\r\n").encode()
    return head + body


def _bodies(mix: str, body_limit: int) -> list[bytes]:
    if mix == "huge-body":
        return [_post("/v1/completions", json.dumps({"model": "bench", "prompt": "t1 " * 350_000}).encode())]
    if mix == "char-bound":
        # Just under the body limit: read and parsed, then refused before any tokenizing.
        words = max(1, (body_limit - 200) // 3)
        return [_post("/v1/completions", json.dumps({"model": "bench", "prompt": "t1 " * words}).encode())]
    if mix == "hostile-json":
        nested = b'{"model": "bench", "prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
        digits = b'{"model": "bench", "prompt": "hi", "x": ' + b"9" * 5000 + b"}"
        return [_post("/v1/completions", nested), _post("/v1/completions", digits)]
    if mix == "stream":
        body = {"model": "bench", "prompt": "t1 t2 t3 t4", "max_tokens": 32, "ignore_eos": True, "stream": True}
        return [_post("/v1/completions", json.dumps(body).encode())]
    return []


async def _client(host: str, port: int, mix: str, body_limit: int, stop: asyncio.Event, errors: list[str]) -> None:
    bodies = _bodies(mix, body_limit)
    turn = 0
    while not stop.is_set():
        try:
            if mix == "slow-body":
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(_post("/v1/completions", b"", declared=4096))
                try:
                    while not stop.is_set() and not reader.at_eof():
                        writer.write(b" ")
                        await writer.drain()
                        try:
                            await asyncio.wait_for(reader.read(65536), 1.0)
                        except asyncio.TimeoutError:
                            pass
                except ConnectionError:
                    pass  # the server's body timeout closed it (408): what this mix is for, not a client error
                finally:
                    writer.close()
            else:
                await _request(host, port, bodies[turn % len(bodies)])
                turn += 1
        except (ConnectionError, OSError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)


def probe(host: str, port: int, interval: float, seconds: float, start_after: float) -> list[float]:
    """Probe /health/live as the kubelet does (a connection per probe, blocking, in a process of its own so that
    the load's clients never delay it here); the latencies in seconds. A probe that is not 200 raises."""
    time.sleep(start_after)
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            status = sock.makefile("rb").readline()
        latencies.append(time.perf_counter() - started)
        if b" 200 " not in status:
            raise RuntimeError(f"liveness answered {status!r}")
        time.sleep(max(0.0, interval - latencies[-1]))
    return latencies


async def measure(url: str, mix: str, clients: int, seconds: float, interval: float, body_limit: int) -> dict:
    host, port = url.removeprefix("http://").split(":")
    stop = asyncio.Event()
    errors: list[str] = []
    load = [asyncio.create_task(_client(host, int(port), mix, body_limit, stop, errors))
            for _ in range(clients if mix != "idle" else 0)]
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        # The load is under way before the first probe counts.
        probing = asyncio.get_running_loop().run_in_executor(
            pool, probe, host, int(port), interval, seconds, min(1.0, seconds / 4) + 1.0)
        latencies = await probing
    stop.set()
    for task in load:
        task.cancel()
    await asyncio.gather(*load, return_exceptions=True)
    ms = sorted(x * 1e3 for x in latencies)
    return {"mix": mix, "clients": clients if mix != "idle" else 0, "probes": len(ms),
            "p50_ms": loadtest.percentile(ms, 50), "p99_ms": loadtest.percentile(ms, 99), "max_ms": ms[-1],
            "client_errors": len(errors)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.bench.liveness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--random-model", choices=sorted(loadtest.SHAPES), default=None,
                        help="build random weights of this shape in --model-path when it holds no model")
    parser.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated, of {', '.join(MIXES)}")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--probe-interval-ms", type=float, default=50.0)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    unknown = set(args.mixes.split(",")) - set(MIXES)
    if unknown:
        parser.error(f"unknown mix {', '.join(sorted(unknown))}; choose from {', '.join(MIXES)}")
    return args


def _main(args: argparse.Namespace) -> None:
    if args.random_model and not (args.model_path / "config.json").is_file():
        loadtest.build_random_model(args.model_path, args.random_model)
    port = loadtest.free_port()
    log_path = (args.json_out.with_suffix(".server.log") if args.json_out
                else Path(tempfile.gettempdir()) / "liveness.server.log")
    print(f"server log: {log_path}", file=sys.stderr)
    command = [sys.executable, "-m", "serving", "--model-path", str(args.model_path), "--model-name", "bench",
               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(args.max_model_len),
               "--body-timeout-seconds", "5"]
    process, url = loadtest.launch_server(command, port, args.startup_timeout, log_path,
                                          env={**os.environ, "API_KEY": "", "API_KEYS_FILE": ""})
    body_limit = 64 * 1024 + 32 * args.max_model_len  # the server's derived default (README, error contract)
    try:
        rows = [loadtest.run_async(measure(url, mix, args.clients, args.seconds, args.probe_interval_ms / 1e3,
                                           body_limit))
                for mix in args.mixes.split(",")]
    finally:
        loadtest.stop_server(process)
    table = [["mix", "clients", "probes", "p50 ms", "p99 ms", "max ms", "client errors"]] + [
        [r["mix"], str(r["clients"]), str(r["probes"]), f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
         f"{r['max_ms']:.1f}", str(r["client_errors"])] for r in rows]
    print(loadtest.markdown_table(table))
    if args.json_out:
        loadtest.write_run(args.json_out, args, mixes=rows)


def main(argv: list[str] | None = None) -> None:
    with loadtest.sigterm_unwinds():
        _main(parse_args(argv))


if __name__ == "__main__":
    main()
