"""What the HTTP layer costs: the real server streaming from a synthetic engine, so no model or GPU is needed.

Everything but the model is the real server (`serving.__main__.serve`: uvicorn, middleware, request validation,
detokenizer, SSE, metrics). The engine is replaced by `SyntheticEngine`, which on every step waits `--device-ms`
without the GIL (as the engine thread does while the GPU works), then holds the GIL for `--python-ms` (the engine's
own Python between device steps), then appends one token to every running request and delivers them as the real
engine does, in its own process (`--engine-process on`, the server's default) or on a thread of the server's. So
the engine alone would stream `running / (device_ms + python_ms)` tokens per second; what the server delivers below
that is the HTTP layer's cost, and the HTTP process's CPU time per streamed token says how much of a core each
token takes (with the engine on a thread, that includes the engine's Python).

The load is `serving.bench.loadtest`'s closed loop in this process; the server runs in a subprocess and its CPU
time comes from /proc (Linux). Prompts are not prefilled (the first token comes one step after admission).

    python -m serving.bench.http_layer --concurrency 64,256 --device-ms 4.5 --python-ms 0.6
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Sized

from serving.bench import loadtest
from serving.engine.interface import EngineStats, GenerationRequest, ModelInfo, QueueFullError, TokenOutput
from serving.engine.stream import LoopSink, Mailbox, OutputSink, StreamItem, TokenStream

MODEL_NAME = "bench"


class SyntheticEngine:
    """Implements `serving.engine.interface.Engine` with timed steps instead of a model (see the module doc)."""

    def __init__(self, tokenizer: Sized, *, device_ms: float, python_ms: float, max_running: int,
                 max_waiting: int = 4096, max_model_len: int = 1 << 20) -> None:
        self.tokenizer: object = tokenizer  # as `Engine` declares it
        vocab = len(tokenizer)
        self.model_info = ModelInfo(max_model_len=max_model_len, vocab_size=vocab, eos_token_ids=())
        self._token_range = (10, max(11, vocab - 2))  # below the random models' special tokens
        self._device_s = device_ms / 1e3
        self._python_s = python_ms / 1e3
        self._max_running = max_running
        self._max_waiting = max_waiting
        self._lock = threading.Condition()
        self._waiting: list[_Synthetic] = []
        self._running: dict[str, _Synthetic] = {}
        self._generated = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="synthetic-engine", daemon=True)
        self._thread.start()

    def generate(self, request: GenerationRequest) -> TokenStream:
        queue = Mailbox()
        self.submit(request, LoopSink.of(asyncio.get_running_loop()), queue)
        return TokenStream(queue, lambda: self.abort(request.request_id))

    def submit(self, request: GenerationRequest, sink: OutputSink, handle: object) -> None:
        with self._lock:
            if len(self._waiting) >= self._max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(_Synthetic(request, sink, handle))
            self._lock.notify()

    def abort(self, request_id: str) -> None:
        with self._lock:
            seqs = [seq for seq in [self._running.pop(request_id, None), *self._waiting]
                    if seq is not None and seq.request.request_id == request_id]
            self._waiting = [seq for seq in self._waiting if seq.request.request_id != request_id]
        for seq in seqs:  # the final output every request gets
            seq.sink.deliver([(seq.handle, TokenOutput((), "abort"))])

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(waiting=len(self._waiting), running=len(self._running), max_running=self._max_running,
                               kv_cache_usage=0.0, kv_cache_capacity_tokens=1, prompt_tokens_total=0,
                               generation_tokens_total=self._generated, loop_alive=True, device="cpu")

    async def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
            live = [*self._running.values(), *self._waiting]
            self._running, self._waiting = {}, []
        for seq in live:
            seq.sink.deliver([(seq.handle, TokenOutput((), "abort"))])

    def _run(self) -> None:
        low, high = self._token_range
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._running):
                    self._lock.wait()
                if self._stopping:
                    return
                while self._waiting and len(self._running) < self._max_running:
                    seq = self._waiting.pop(0)
                    self._running[seq.request.request_id] = seq
                step = list(self._running.values())
            time.sleep(self._device_s)
            spin_until = time.perf_counter() + self._python_s
            while time.perf_counter() < spin_until:
                pass
            batches: dict[OutputSink, list[tuple[object, StreamItem]]] = {}
            finished = []
            for seq in step:
                seq.generated += 1
                done = seq.generated >= seq.request.sampling.max_tokens
                token = low + (seq.generated * 7 + len(seq.request.prompt_token_ids)) % (high - low)
                batches.setdefault(seq.sink, []).append((seq.handle, TokenOutput((token,), "length" if done else None)))
                if done:
                    finished.append(seq.request.request_id)
            with self._lock:
                self._generated += len(step)
                for request_id in finished:
                    self._running.pop(request_id, None)
            for sink, items in batches.items():
                sink.deliver(items)


class _Synthetic:
    def __init__(self, request: GenerationRequest, sink: OutputSink, handle: object) -> None:
        self.request = request
        self.sink = sink
        self.handle = handle
        self.generated = 0


def build_synthetic_engine(model_path: str, device_ms: float, python_ms: float, max_running: int) -> SyntheticEngine:
    from transformers import AutoTokenizer

    return SyntheticEngine(AutoTokenizer.from_pretrained(model_path), device_ms=device_ms, python_ms=python_ms,
                           max_running=max_running)


# ---- the server subprocess ----------------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    from serving.__main__ import serve as serve_app
    from serving.engine.process import EngineClient
    from serving.settings import Settings

    build = partial(build_synthetic_engine, str(args.model_path), args.device_ms, args.python_ms, args.max_running)
    settings = Settings(model_path=args.model_path, model_name=MODEL_NAME, host="127.0.0.1", port=args.port,
                        log_level="warning")
    if args.engine_process == "on":
        return serve_app(settings, lambda: EngineClient.spawn_engine(build, max_waiting=4096, log_level="warning"))
    return serve_app(settings, build())


def start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = loadtest.free_port()
    command = [sys.executable, "-m", "serving.bench.http_layer", "--serve", "--model-path", str(args.model_path),
               "--port", str(port), "--device-ms", str(args.device_ms), "--python-ms", str(args.python_ms),
               "--max-running", str(args.max_running), "--engine-process", args.engine_process]
    return loadtest.launch_server(command, port, args.startup_timeout, log_path)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_levels(args: argparse.Namespace, url: str, pid: int) -> list[dict]:
    levels = []
    for index, concurrency in enumerate(int(c) for c in args.concurrency.split(",")):
        before = cpu_seconds(pid)
        level = await loadtest.run_level(args, url, concurrency, index)
        cpu = cpu_seconds(pid) - before
        step_ms = args.device_ms + args.python_ms
        level["engine_tok_s"] = round(min(concurrency, args.max_running) / step_ms * 1e3, 1)
        level["server_cpu_s"] = round(cpu, 2)
        tokens = level["output_tokens"]
        level["server_cpu_us_per_token"] = round(cpu / tokens * 1e6, 1) if tokens else None
        print(json.dumps(level), file=sys.stderr, flush=True)
        levels.append(level)
    return levels


def format_table(levels: list[dict]) -> str:
    columns = [("concurrency", "conc"), ("requests", "reqs"), ("errors", "errors"), ("short_outputs", "short"),
               ("engine_tok_s", "engine tok/s"), ("output_tok_s", "served tok/s"),
               ("server_cpu_us_per_token", "HTTP process CPU us/token"), ("ttft_p99_ms", "TTFT p99 ms"),
               ("itl_p50_ms", "ITL p50 ms"), ("itl_p99_ms", "ITL p99 ms"), ("client_busy_max", "client busy")]
    return loadtest.markdown_table([[title for _, title in columns]]
                                   + [[str(level.get(key, "-")) for key, _ in columns] for level in levels])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", type=Path, default=Path(tempfile.gettempdir()) / "bench-http-tokenizer",
                        help="a model directory whose tokenizer the server uses (built here if it has none)")
    parser.add_argument("--device-ms", type=float, default=4.5, help="per step, waiting without the GIL")
    parser.add_argument("--python-ms", type=float, default=0.6,
                        help="per step, holding the GIL (default: the engine thread's measured Python at batch 256)")
    parser.add_argument("--max-running", type=int, default=256, help="requests that step together (slots)")
    parser.add_argument("--engine-process", choices=["on", "off"], default="on",
                        help="the engine in its own process, as the server runs it by default, or on a thread")
    parser.add_argument("--concurrency", default="64,256")
    parser.add_argument("--requests-per-level", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--in-min", type=int, default=256)
    parser.add_argument("--in-max", type=int, default=768)
    parser.add_argument("--out-min", type=int, default=64)
    parser.add_argument("--out-max", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--max-level-seconds", type=float, default=0)
    parser.add_argument("--startup-timeout", type=float, default=120)
    loadtest.add_client_processes_argument(parser)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # What loadtest.run_level reads besides the above.
    args.model, args.api_key, args.warmup, args.token_id_min = MODEL_NAME, None, True, 10
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args)
    with loadtest.sigterm_unwinds():
        return _measure(args)


def _measure(args: argparse.Namespace) -> int:
    if not (args.model_path / "tokenizer.json").is_file():
        print(f"building a tokenizer (and tiny random weights) in {args.model_path}", file=sys.stderr)
        loadtest.build_random_model(args.model_path, "tiny")
    args.token_id_max = loadtest.SHAPES["tiny"]["vocab_size"] - 2
    log_path = (args.json_out.with_suffix(".server.log") if args.json_out
                else Path(tempfile.gettempdir()) / "http_layer.server.log")
    process = None
    try:
        process, url = start_server(args, log_path)
        levels = loadtest.run_async(run_levels(args, url, process.pid))
    finally:
        if process is not None:
            loadtest.stop_server(process, 60)
    print(format_table(levels))
    if args.json_out:
        loadtest.write_run(args.json_out, args, levels=levels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
