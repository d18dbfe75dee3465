"""Closed-loop streaming load test of the server: output tokens/s, TTFT and inter-token latency per concurrency.

Each level runs `concurrency` clients; each client sends a streaming `/v1/completions` request, reads it to
the end, and sends the next one (closed loop). Prompts are random token ids (256-768 by default) and
outputs are forced to their length (64-256 by default) with `ignore_eos`, so every level does the same work
whatever the weights. Per request: TTFT (first text chunk), inter-token latency (gaps between text chunks),
output tokens (from `usage`). Per level: output tokens / wall time, p50/p99 latencies, errors.

Start a server here (`--model-path`, optionally building random weights of a real shape first with
`--random-model`) or target a running one (`--url`). The HTTP client is a raw asyncio connection (on uvloop where
it is installed) that parses SSE itself, so the numbers include no client library's overhead. A level's clients are
split over `--client-processes` processes (a quarter of the cores by default, at most 4): one process reading 25,000
events a second would need most of a core itself, and `client_busy_max` says how busy the busiest one was.

    python -m serving.bench.loadtest --model-path /tmp/llama-1b-random --random-model llama-3.2-1b \\
        --device cuda --max-num-seqs 256 --max-model-len 2048 --json-out bench.json
    python -m serving.bench.loadtest --url http://127.0.0.1:8000 --model llama-3.1-8b --api-key KEY
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import queue as queue_module
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Coroutine, Iterator, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
# A client process busier than this share of a core may be what limits a level, not the server.
CLIENT_BUSY_WARNING = 0.85

# Random-weight model shapes (`--random-model`): real architectures, so GPU numbers mean something.
SHAPES: dict[str, dict[str, Any]] = {  # each a LlamaConfig's keyword arguments
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True),
    # About 100M parameters (tied embeddings), Llama-shaped with grouped-query attention: a CPU-sized real model.
    "llama-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
                       tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=False),
}


# ---- one request --------------------------------------------------------------------------------------------


@dataclass
class RequestResult:
    requested_tokens: int
    started: float  # time.monotonic(): one clock for every client process of a level
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    ended: float = 0.0
    error: str | None = None


async def stream_completion(url: str, body: dict, api_key: str | None, timeout: float) -> RequestResult:
    """POST one streaming completion over a raw connection and time every text chunk.

    The response is read in large blocks and parsed here (chunked framing, then SSE events), with one timeout
    that moves on whenever bytes arrive: a client costs the server's side of the measurement, not its own, so
    it must stay cheaper per token than the server it measures (see `--client-processes`)."""
    result = RequestResult(requested_tokens=body["max_tokens"], started=time.monotonic())
    target = urlparse(url)
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (f"POST {target.path or '/'} HTTP/1.1\r\nHost: {target.hostname}:{target.port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{auth}"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    writer = None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout) as deadline:
            reader, writer = await asyncio.open_connection(target.hostname, target.port)
            writer.write(head + payload)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if status != 200:
                result.error = f"HTTP {status}: {(await reader.read(300)).decode(errors='replace')}"
                return result
            events = _SseEvents(chunked=headers.get("transfer-encoding", "").lower() == "chunked")
            while not events.done and (data := await reader.read(1 << 16)):
                deadline.reschedule(loop.time() + timeout)
                for event in events.feed(data):
                    _handle_event(event, result)
    except (OSError, TimeoutError, ValueError, IndexError) as exc:
        result.error = repr(exc)
    finally:
        result.ended = time.monotonic()
        if writer is not None:
            writer.close()
    return result


class _SseEvents:
    """Server-sent events out of a response body read in arbitrary blocks, with or without chunked framing."""

    def __init__(self, chunked: bool) -> None:
        self.chunked = chunked
        self.done = False
        self._framed = b""  # chunked bytes not yet unframed
        self._text = b""  # body bytes not yet split into events

    def feed(self, data: bytes) -> list[bytes]:
        if self.chunked:
            data = self._unframe(data)
        self._text += data
        *events, self._text = self._text.split(b"\n\n")
        return events

    def _unframe(self, data: bytes) -> bytes:
        buffer = self._framed + data
        body = []
        position = 0
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                break
            size = int(buffer[position:line_end].split(b";")[0].strip(), 16)  # ValueError on a malformed size line
            if size == 0:
                self.done = True
                position = len(buffer)
                break
            chunk_end = line_end + 2 + size
            if len(buffer) < chunk_end + 2:
                break
            body.append(buffer[line_end + 2:chunk_end])
            position = chunk_end + 2  # past the chunk's CRLF
        self._framed = buffer[position:]
        return b"".join(body)


def _handle_event(event: bytes, result: RequestResult) -> None:
    for line in event.splitlines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        message = json.loads(line[6:])
        if "error" in message:
            result.error = message["error"].get("message", str(message["error"]))[:300]
        if message.get("usage"):
            result.output_tokens = message["usage"]["completion_tokens"]
        if any(choice.get("text") for choice in message.get("choices", [])):
            result.chunk_times.append(time.monotonic())


# ---- one concurrency level ----------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    rank = (len(values) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def make_work(count: int, seed: int, args: argparse.Namespace) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)

    def prompt() -> list[int]:
        length = rng.randint(args.in_min, args.in_max)
        return [rng.randrange(args.token_id_min, args.token_id_max) for _ in range(length)]

    return [(prompt(), rng.randint(args.out_min, args.out_max)) for _ in range(count)]


async def run_level(args: argparse.Namespace, url: str, concurrency: int, level_index: int) -> dict:
    count = max(args.requests_per_level, concurrency * args.rounds)
    work = make_work(count, args.seed + level_index, args)
    endpoint = url.rstrip("/") + "/v1/completions"
    if args.warmup:
        await asyncio.gather(*(stream_completion(endpoint, _body(args, p, 8), args.api_key, args.timeout)
                               for p, _ in work[:min(concurrency, 8)]))
    processes = max(1, min(args.client_processes, concurrency))
    if processes == 1:
        started, cpu_before = time.monotonic(), time.process_time()
        results = await _closed_loop(args, endpoint, work, concurrency, started)
        client_cpu = [time.process_time() - cpu_before]
    else:
        abandoned = threading.Event()
        try:
            results, client_cpu, started = await asyncio.to_thread(_run_in_processes, args, endpoint, work,
                                                                   concurrency, processes, abandoned)
        finally:  # cancelled (SIGINT, SIGTERM): the thread stops waiting and kills the client processes at once
            abandoned.set()
    wall = max((r.ended for r in results), default=started) - started
    ok = [r for r in results if r.error is None and r.chunk_times]
    ttft = [r.chunk_times[0] - r.started for r in ok]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    e2e = [r.ended - r.started for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    ms = lambda value: None if value is None else round(value * 1e3, 2)  # noqa: E731
    busiest = max(client_cpu) / wall if wall > 0 else 0.0
    if busiest > CLIENT_BUSY_WARNING:
        print(f"warning: at concurrency {concurrency} a client process was {busiest:.0%} busy, so the client may be "
              f"what limits this level; run it again with more --client-processes (now {processes})",
              file=sys.stderr, flush=True)
    return {
        "concurrency": concurrency, "requests": len(results), "ok": len(ok), "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if r.error), None),
        "short_outputs": sum(r.output_tokens < r.requested_tokens for r in ok),
        "wall_s": round(wall, 2), "output_tokens": tokens, "output_tok_s": round(tokens / wall, 1) if wall else 0.0,
        "requests_per_s": round(len(ok) / wall, 2) if wall else 0.0,
        "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
        "itl_p50_ms": ms(percentile(itl, 50)), "itl_p99_ms": ms(percentile(itl, 99)),
        "e2e_p50_ms": ms(percentile(e2e, 50)), "e2e_p99_ms": ms(percentile(e2e, 99)),
        "client_processes": processes,
        "client_cpu_us_per_token": round(sum(client_cpu) / tokens * 1e6, 1) if tokens else None,
        "client_busy_max": round(busiest, 3),
    }


def run_async(main: Coroutine[object, object, T]) -> T:
    """asyncio.run on uvloop where it is installed (the server's own loop; a third of the client's cost per event
    here), else on the standard loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _body(args: argparse.Namespace, prompt: list[int], max_tokens: int) -> dict:
    return {"model": args.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def _closed_loop(args: argparse.Namespace, endpoint: str, work: list[tuple[list[int], int]], concurrency: int,
                       started: float) -> list[RequestResult]:
    """`concurrency` clients, each sending the next request of `work` as soon as its last one ended."""
    queue = list(reversed(work))
    results: list[RequestResult] = []

    async def client() -> None:
        while queue:
            if args.max_level_seconds and time.monotonic() - started > args.max_level_seconds:
                return  # time cap: stop issuing, in-flight requests finish
            prompt, max_tokens = queue.pop()
            results.append(await stream_completion(endpoint, _body(args, prompt, max_tokens), args.api_key,
                                                   args.timeout))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def _run_in_processes(args: argparse.Namespace, endpoint: str, work: list[tuple[list[int], int]], concurrency: int,
                      processes: int, abandoned: threading.Event) -> tuple[list[RequestResult], list[float], float]:
    """One level's closed loop split over `processes` client processes: each gets every n-th request and its share
    of the clients, and all start together. Returns the results, each process's CPU seconds, and the start time.
    Once `abandoned` is set (the caller was cancelled) it stops within a second and kills the client processes."""
    context = multiprocessing.get_context("spawn")  # the caller runs an event loop, which a fork would copy
    go, out = context.Event(), context.Queue()
    children, inboxes = [], []  # the queues stay referenced: a collected one unlinks what a child still has to open
    try:
        for index, (share, clients) in enumerate(split_level(work, concurrency, processes)):
            # The requests go through a queue, not the start arguments: start() writes those to a pipe it holds both
            # ends of, and blocks for ever if they are larger than the pipe and the child dies before reading them.
            inbox = context.Queue()
            inboxes.append(inbox)
            child = context.Process(target=_client_process, daemon=True, name=f"loadtest-client-{index}",
                                    args=(args, endpoint, inbox, clients, go, out))
            child.start()
            children.append(child)
            inbox.put(share)
            inbox.cancel_join_thread()  # a child that died unread must not hold this process's exit
        for _ in children:
            _receive(out, children, "ready", 60, abandoned)
        started = time.monotonic()
        go.set()
        results: list[RequestResult] = []
        client_cpu: list[float] = []
        for _ in children:
            share, cpu = _receive(out, children, "done", None, abandoned)
            results.extend(share)
            client_cpu.append(cpu)
    finally:
        for child in children:
            child.join(0 if abandoned.is_set() else 5)
            if child.is_alive():
                child.kill()
    return results, client_cpu, started


def split_level(work: list, concurrency: int, processes: int) -> list[tuple[list, int]]:
    """Each process's requests and clients: request j goes to client j mod concurrency, as one closed loop would
    hand them out, and client c to process c mod processes, so every process has the same work per client (a
    process with fewer clients and as many requests would run an extra round alone and stretch the level)."""
    return [([item for j, item in enumerate(work) if j % concurrency % processes == index],
             len(range(index, concurrency, processes)))
            for index in range(processes)]


def _receive(out: "multiprocessing.Queue", children: list, kind: str, timeout: float | None,
             abandoned: threading.Event) -> Any:
    """The payload of the next message of `kind` from a client process (what that kind carries); exits with a clear
    message if one died instead."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        try:
            got, payload = out.get(timeout=1)
        except queue_module.Empty:
            if abandoned.is_set():
                sys.exit("load test stopped")
            dead = [child for child in children if child.exitcode not in (None, 0)]
            if dead:
                sys.exit(f"client process {dead[0].name} exited with {dead[0].exitcode}")
            continue
        if got == "error":
            sys.exit(f"a client process failed: {payload}")
        assert got == kind, (got, kind)
        return payload
    sys.exit(f"client processes did not get {kind} within {timeout}s")


def _client_process(args: argparse.Namespace, endpoint: str, inbox: "multiprocessing.Queue", concurrency: int,
                    go: "multiprocessing.synchronize.Event", out: "multiprocessing.Queue") -> None:
    work: list[tuple[list[int], int]] = inbox.get()
    out.put(("ready", None))
    go.wait()
    started, cpu_before = time.monotonic(), time.process_time()
    try:
        results = run_async(_closed_loop(args, endpoint, work, concurrency, started))
    except BaseException as exc:  # said in the parent, which is waiting for this process's results
        out.put(("error", repr(exc)))
        raise
    out.put(("done", (results, time.process_time() - cpu_before)))


def format_table(levels: list[dict]) -> str:
    columns = [("concurrency", "conc"), ("requests", "reqs"), ("errors", "errors"), ("output_tok_s", "out tok/s"),
               ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"), ("itl_p50_ms", "ITL p50 ms"),
               ("itl_p99_ms", "ITL p99 ms"), ("e2e_p50_ms", "E2E p50 ms"), ("client_busy_max", "client busy")]
    return markdown_table([[title for _, title in columns]]
                          + [[str(level[key]) for key, _ in columns] for level in levels])


def markdown_table(rows: list[list[str]]) -> str:
    """A right-aligned Markdown table; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.rjust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 1) + ":" for width in widths) + "|")
    return "\n".join(lines)


# ---- the server under test ----------------------------------------------------------------------------------


def build_random_model(directory: Path, shape: str) -> None:
    """Random weights of a real architecture plus a word-level tokenizer (`t0 t1 ...`), all offline."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dims = SHAPES[shape]
    vocab = dims["vocab_size"]
    directory.mkdir(parents=True, exist_ok=True)
    words = {f"t{i}": i for i in range(vocab - 2)} | {"<|begin_of_text|>": vocab - 2, "<|end_of_text|>": vocab - 1}
    word_level = Tokenizer(models.WordLevel(words, unk_token="t0"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>", unk_token="t0")
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(**dims, bos_token_id=vocab - 2, eos_token_id=vocab - 1, initializer_range=0.02)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        # transformers declares PreTrainedModel.to through @wraps(Module.to), which mypy reads as unbound.
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)  # type: ignore[arg-type]
    model.save_pretrained(directory, safe_serialization=True)


def write_run(path: Path, args: argparse.Namespace, **results: object) -> None:
    """A benchmark run as JSON: its arguments (as text; never the API key) beside its results."""
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items() if k != "api_key"}, **results},
                               indent=1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "serving", "--model-path", str(args.model_path), "--model-name", args.model,
               "--host", "127.0.0.1", "--port", str(port)]
    for flag in ("device", "dtype", "max_num_seqs", "max_model_len", "max_queue", "max_prefill_tokens", "cuda_graphs",
                 "engine_process", "attention_backend", "overlap"):
        if getattr(args, flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return launch_server(command, port, args.startup_timeout, log_path,
                         env={**os.environ, "API_KEY": "", "API_KEYS_FILE": ""})


def launch_server(command: list[str], port: int, timeout: float, log_path: Path,
                  env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start a server process logging to `log_path` and wait until it serves; stopped again if that fails."""
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=env)
    try:
        wait_started(process, url, timeout, log_path)
    except BaseException:  # including SIGTERM while the model loads: the server must not outlive this run
        stop_server(process)
        raise
    return process, url


def stop_server(process: subprocess.Popen, timeout: float = 120) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within `timeout` seconds."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_started(process: subprocess.Popen, url: str, timeout: float, log_path: Path) -> None:
    """Poll /health/startup until 200; exit with where the log is if the server dies or takes too long (the caller
    stops it: a SIGKILL here would leave its engine process behind)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"server exited with {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/health/startup", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    sys.exit(f"server did not start within {timeout}s; see {log_path}")


def add_client_processes_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    default = max(1, min(4, (os.cpu_count() or 1) // 4))
    parser.add_argument("--client-processes", type=_positive_int, default=default,
                        help="processes the clients of a level are split over, so that the client is never what "
                             f"limits the server's number (default here: {default}, a quarter of the cores, "
                             "at most 4; each level's client_busy_max says how busy the busiest one was)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_argument_group("target (one of)")
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--model-path", type=Path, help="start `python -m serving` on this model directory")
    target.add_argument("--random-model", choices=sorted(SHAPES),
                        help="first build random weights of this shape into --model-path (if it has no config.json)")
    server = parser.add_argument_group("server options (with --model-path)")
    server.add_argument("--device")
    server.add_argument("--dtype")
    server.add_argument("--max-num-seqs", type=int)
    server.add_argument("--max-model-len", type=int)
    server.add_argument("--max-queue", type=int)
    server.add_argument("--max-prefill-tokens", type=int, help="prompt tokens prefilled per engine step")
    server.add_argument("--cuda-graphs", choices=["on", "off"], help="decode from CUDA graphs (server default: on)")
    server.add_argument("--engine-process", choices=["on", "off"],
                        help="the engine in its own process or on a thread of the server's (server default: on)")
    server.add_argument("--attention-backend", choices=["auto", "triton", "flash", "sdpa"],
                        help="how attention reads the KV cache (server default: auto)")
    server.add_argument("--overlap", choices=["auto", "on", "off"],
                        help="steps launched from tokens still on the device, host work overlapping the device "
                             "(server default: auto)")
    server.add_argument("--startup-timeout", type=float, default=600)
    load = parser.add_argument_group("load")
    load.add_argument("--model", default="bench", help="served model name (default: bench)")
    load.add_argument("--api-key", default=os.environ.get("API_KEY") or None)
    load.add_argument("--concurrency", default="1,16,64,256", help="comma-separated levels")
    load.add_argument("--requests-per-level", type=int, default=32)
    load.add_argument("--rounds", type=int, default=2, help="at least rounds x concurrency requests per level")
    load.add_argument("--in-min", type=int, default=256)
    load.add_argument("--in-max", type=int, default=768)
    load.add_argument("--out-min", type=int, default=64)
    load.add_argument("--out-max", type=int, default=256)
    load.add_argument("--token-id-min", type=int, default=10, help="prompt token ids are drawn from [min, max)")
    load.add_argument("--token-id-max", type=int, default=None, help="default: the model's vocab size, at most 32000")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--timeout", type=float, default=300, help="seconds without progress before a request fails")
    load.add_argument("--warmup", action="store_true", help="a few short requests before each level")
    load.add_argument("--max-level-seconds", type=float, default=0, help="stop issuing requests after this long")
    add_client_processes_argument(load)
    load.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if (args.url is None) == (args.model_path is None):
        parser.error("give exactly one of --url and --model-path")
    if args.token_id_max is None:
        vocab = 32000
        if args.model_path is not None and (args.model_path / "config.json").is_file():
            vocab = json.loads((args.model_path / "config.json").read_text())["vocab_size"]
        elif args.random_model:
            vocab = SHAPES[args.random_model]["vocab_size"]
        args.token_id_max = min(vocab - 2, 32000)  # below the random models' special tokens
    return args


async def run_levels(args: argparse.Namespace, url: str) -> list[dict]:
    levels = []
    for index, concurrency in enumerate(int(c) for c in args.concurrency.split(",")):
        level = await run_level(args, url, concurrency, index)
        print(json.dumps(level), file=sys.stderr, flush=True)
        levels.append(level)
    return levels


def _exit_on_signal(signum: int, frame: object) -> None:
    # Once: `timeout` signals the process and then its group, and a second SystemExit would cut the cleanup short.
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, through `finally`: a level's client processes are killed and a server the run
    started is stopped, where the default action would leave both running (on the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    with sigterm_unwinds():
        _main(parse_args(argv))


def _main(args: argparse.Namespace) -> None:
    process = None
    url = args.url
    try:
        if args.model_path is not None:
            if args.random_model and not (args.model_path / "config.json").is_file():
                print(f"building random {args.random_model} weights in {args.model_path}", file=sys.stderr)
                build_random_model(args.model_path, args.random_model)
            log_path = (args.json_out.with_suffix(".server.log") if args.json_out
                        else Path(tempfile.gettempdir()) / "loadtest.server.log")
            print(f"server log: {log_path}", file=sys.stderr)
            process, url = start_server(args, log_path)
        levels = run_async(run_levels(args, url))
    finally:
        if process is not None:
            stop_server(process)
    print(format_table(levels))
    if args.json_out:
        write_run(args.json_out, args, levels=levels)


if __name__ == "__main__":
    main()
