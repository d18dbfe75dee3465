"""The engine in a process of its own: `EngineClient` implements `Engine` in the HTTP process over a pipe.

In one process, the engine thread and the HTTP event loop share one GIL: at a few hundred streams the event loop's
per-token work (SSE, detokenizer, sockets) and the engine's Python between device steps wait for each other, and
both slow down. Here the engine (model, KV cache, CUDA graphs, its loop thread) runs in a child process and the
HTTP process keeps its GIL and its core to itself. Nothing else changes: the app sees the same `Engine` interface.

The protocol is one duplex pipe of the named tuples in `serving.engine.messages`. HTTP process -> engine: `Start`,
`Add`, `Abort`, `Shutdown`. Engine -> HTTP process: `Loaded` or `LoadFailed`; `Started` or `StartFailed`; once per
engine step `Outputs`; `Rejected`; `Stopped`. The child ignores SIGINT and SIGTERM (a signal for the whole
process group must not stop the engine while the HTTP process drains: that process owns shutdown); it exits when
told to or when the pipe closes. If the child dies, every open stream fails with EngineDeadError, liveness fails,
and the kubelet restarts the container.
"""
from __future__ import annotations

import asyncio
import atexit
import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Protocol

from serving.engine.config import GIL_SWITCH_INTERVAL_S, EngineConfig
from serving.engine.interface import (
    Engine,
    EngineDeadError,
    EngineStats,
    GenerationRequest,
    ModelInfo,
    ModelLoadError,
    QueueFullError,
    TokenOutput,
    check_request,
)
from serving.engine.messages import (
    Abort,
    Add,
    Loaded,
    LoadFailed,
    Output,
    Outputs,
    Rejected,
    Shutdown,
    Start,
    Started,
    StartFailed,
    Stopped,
)
from serving.engine.stream import LoopSink, Mailbox, OutputSink, StreamItem, TokenStream

logger = logging.getLogger("serving.engine")

_SHUTDOWN_TIMEOUT_S = 30.0
_UNLIMITED = 1 << 30
_JOIN_TIMEOUT_S = 10.0


class EngineClient:
    """`Engine` for the HTTP process; the real engine runs in the child process this starts."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection, model_info: ModelInfo,
                 tokenizer: object, stats: EngineStats, max_waiting: int, reaper: Callable[[], None]) -> None:
        self.model_info = model_info
        self.tokenizer = tokenizer
        self._process = process
        self._conn = conn
        self._reaper = reaper
        # Commands go out through a writer thread: a full pipe must never block the event loop (the engine process
        # may itself be waiting for this loop to read its outputs), and abort() may be called by a garbage-collector
        # pass on any thread, holding nothing (SimpleQueue.put is safe there).
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="engine-client-writer", daemon=True)
        self._writer.start()
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, Mailbox]] = {}
        self._stats = stats
        self._max_waiting = max_waiting
        self._dead: str | None = None
        self._replies: dict[type, asyncio.Future] = {}
        """What `_request` awaits, by the type of the reply that settles it."""
        self._stopping = False
        self._closed = False
        """The pipe is closed: the engine process has exited."""
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def spawn(cls, model_path: str | Path, config: EngineConfig, log_level: str = "info") -> "EngineClient":
        """Start the engine process and wait until its model is loaded (slow; call it in a thread). Raises
        ModelLoadError with the engine's own message when the model cannot be loaded."""
        # This process enforces max_waiting (it counts every request not yet finished); the engine's own count of
        # waiting requests can run ahead of its admissions in a burst, so it gets no limit of its own.
        unlimited = dataclasses.replace(config, max_waiting=_UNLIMITED)
        return cls.spawn_engine(partial(load_engine, str(model_path), unlimited), config.max_waiting, log_level)

    @classmethod
    def spawn_engine(cls, build: Callable[[], SubmittingEngine], max_waiting: int,
                     log_level: str = "info") -> "EngineClient":
        """Like `spawn`, for any engine `build()` returns in the child (it must be picklable, and the engine must
        have `submit(request, sink, handle)` besides the `Engine` methods, as `LLMEngine` does)."""
        context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        parent_conn, child_conn = context.Pipe(duplex=True)
        process = context.Process(target=engine_main, args=(child_conn, build, log_level),
                                  name="llm-engine", daemon=True)
        process.start()
        child_conn.close()
        # multiprocessing joins its children at exit after a SIGTERM the engine ignores: reap it first (atexit runs
        # the last registered first) should this process exit without shutting the engine down, even mid-load.
        reaper = partial(_reap, process, parent_conn)
        atexit.register(reaper)
        logger.info("engine process %d started", process.pid, extra={"event": "engine_process_started",
                                                                    "pid": process.pid})
        try:
            message = parent_conn.recv()
        except (EOFError, OSError):
            message = None
        if not isinstance(message, Loaded):
            process.join(_JOIN_TIMEOUT_S)
            parent_conn.close()
            atexit.unregister(reaper)
            if not isinstance(message, LoadFailed):
                raise ModelLoadError(f"the engine process exited (code {process.exitcode}) while loading the model; "
                                     "its log lines above say why")
            if message.kind == "ModelLoadError":
                raise ModelLoadError(message.message)
            raise RuntimeError(f"the engine process failed to load the model: {message.message}")
        return cls(process, parent_conn, message.model_info, message.tokenizer, message.stats, max_waiting, reaper)

    # ---- Engine ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Run the engine's warm-up in its process; returns when it is ready to serve. From here on a reader thread
        hands everything the engine sends to this event loop, in one callback per batch of messages."""
        self._loop = asyncio.get_running_loop()
        # A thread with a blocking socket, not loop.add_reader: uvloop makes a watched descriptor non-blocking, and
        # the writer thread's sends on the same socket would then fail with EAGAIN whenever the pipe is full.
        reader = threading.Thread(target=self._read, args=(self._loop,), name="engine-client-reader", daemon=True)
        reader.start()
        await self._request(Started, Start())

    def generate(self, request: GenerationRequest) -> TokenStream:
        check_request(request, self.model_info)
        queue = Mailbox()
        request_id = request.request_id
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            if self._stopping:
                raise EngineDeadError("the engine is shutting down")
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already running; use a unique id")
            waiting = len(self._streams) - self._stats.max_running
            if waiting >= self._max_waiting:
                raise QueueFullError(f"{waiting} requests are already waiting (max_waiting); retry later")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._send(Add(request))
        return TokenStream(queue, lambda: self.abort(request_id))

    def abort(self, request_id: str) -> None:
        # No lock: this may run in a garbage-collector pass inside a block that holds one (see __init__).
        if request_id in self._streams:
            self._send(Abort(request_id))

    def stats(self) -> EngineStats:
        stats = self._stats
        if self._dead is not None and stats.loop_alive:
            stats = dataclasses.replace(stats, loop_alive=False)
        return stats

    async def shutdown(self) -> None:
        """Abort everything still running (streams end with `abort`), stop the engine process and wait for it."""
        with self._lock:
            self._stopping = True
        if self._loop is None:  # never started: nothing reads replies, and no stream is open
            self._send(Shutdown())
        elif not self._closed:  # even with its loop dead, the engine process can still stop cleanly
            try:
                await asyncio.wait_for(self._request(Stopped, Shutdown()), _SHUTDOWN_TIMEOUT_S)
            except (asyncio.TimeoutError, EngineDeadError):
                pass
        await asyncio.to_thread(self._process.join, _JOIN_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("the engine process did not exit; killing it")
            self._process.kill()
            await asyncio.to_thread(self._process.join, _JOIN_TIMEOUT_S)
        self._outbox.put(None)
        await asyncio.to_thread(self._writer.join, _JOIN_TIMEOUT_S)
        self._conn.close()
        atexit.unregister(self._reaper)

    # ---- pipe ----------------------------------------------------------------------------------------------------

    async def _request(self, reply: type, message: tuple) -> None:
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._closed:
                raise EngineDeadError(self._dead or "the engine process is gone")
            self._replies[reply] = future
        self._send(message)
        await future

    def _send(self, message: tuple) -> None:
        self._outbox.put(message)

    def _write(self) -> None:
        """Writer thread: send each queued command; stops at None or when the pipe is closed (the reader then
        reports the engine process as gone)."""
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                return

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reader thread: receive what the engine sends and run `_handle` on the event loop, a batch per callback."""
        try:
            while True:
                batch = [self._conn.recv()]
                while self._conn.poll():
                    batch.append(self._conn.recv())
                loop.call_soon_threadsafe(self._handle_all, batch)
        except (EOFError, OSError):
            try:
                loop.call_soon_threadsafe(self._on_closed)
            except RuntimeError:
                pass
        except RuntimeError:  # the event loop is closed: nobody is left to tell
            pass

    def _handle_all(self, messages: list[tuple]) -> None:
        for message in messages:
            self._handle(message)

    def _handle(self, message: tuple) -> None:
        match message:
            case Outputs(outputs, stats):
                self._stats = stats
                # An output's error comes without tokens (see `Output`).
                self._dispatch([(request_id, outcome if isinstance(outcome, BaseException)
                                 else TokenOutput(token_ids or (), outcome))
                                for request_id, token_ids, outcome in outputs])
            case Rejected(request_id, error):
                self._dispatch([(request_id, error)])
            case StartFailed(text):
                self._reply(Started, RuntimeError(f"the engine's warm-up failed: {text}"))
            case Started(stats) | Stopped(stats):
                self._stats = stats
                self._reply(type(message))
        if not self._stats.loop_alive and self._dead is None:
            self._dead = "the engine loop died; the server must be restarted"

    def _reply(self, kind: type, error: BaseException | None = None) -> None:
        """Settle what `_request` awaits for a reply of this kind."""
        with self._lock:
            future = self._replies.pop(kind, None)
        if future is None or future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def _on_closed(self) -> None:
        """The pipe closed: the engine process exited. Fail whatever is still open."""
        self._process.join(0.1)  # on the event loop: only long enough to read an exit code that is due
        if self._stopping:
            reason = "the engine process stopped"
        elif self._process.exitcode is None:
            reason = "the engine process closed its pipe"
        else:
            reason = f"the engine process exited (code {self._process.exitcode})"
        with self._lock:
            self._closed = True
            self._dead = self._dead or reason
            streams, self._streams = self._streams, {}
            replies, self._replies = self._replies, {}
        if not self._stopping:
            logger.error("%s; failing %d open requests", reason, len(streams))
        for future in replies.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        self._deliver([(loop, queue, EngineDeadError(reason)) for loop, queue in streams.values()])

    def _dispatch(self, outputs: list[tuple[str, StreamItem]]) -> None:
        items: list[tuple[asyncio.AbstractEventLoop, Mailbox, StreamItem]] = []
        with self._lock:
            for request_id, item in outputs:
                final = not isinstance(item, TokenOutput) or item.finish_reason is not None
                entry = self._streams.pop(request_id, None) if final else self._streams.get(request_id)
                if entry is not None:
                    items.append((entry[0], entry[1], item))
        self._deliver(items)

    def _deliver(self, items: list[tuple[asyncio.AbstractEventLoop, Mailbox, StreamItem]]) -> None:
        other_loops: dict[asyncio.AbstractEventLoop, list[tuple[Mailbox, StreamItem]]] = {}
        for loop, stream_queue, item in items:
            if loop is self._loop:
                stream_queue.put_nowait(item)
            else:  # a stream read on another event loop
                other_loops.setdefault(loop, []).append((stream_queue, item))
        for loop, batch in other_loops.items():
            LoopSink.of(loop).deliver(batch)


def _reap(process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
    """At exit: close the pipe (the engine process stops on its own when it sees that), kill it if it lingers."""
    if not process.is_alive():
        return
    conn.close()
    process.join(_JOIN_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join(_JOIN_TIMEOUT_S)


# ---- the engine process ----------------------------------------------------------------------------------------


class SubmittingEngine(Engine, Protocol):
    """What the engine process runs (`LLMEngine`): an `Engine` that also takes requests with where their outputs go."""

    def submit(self, request: GenerationRequest, sink: OutputSink, handle: object) -> object:
        """Validate and enqueue `request`; its outputs go to `sink.deliver([(handle, output), ...])`."""


class _PipeSink:
    """Engine-process side: each step's outputs, keyed by request id, in one message with a stats snapshot."""

    def __init__(self, conn: Connection, lock: threading.Lock, engine: Engine) -> None:
        self._conn = conn
        self._lock = lock
        self._engine = engine

    def deliver(self, items: list[tuple[str, StreamItem]]) -> bool:
        # Plain tuples inside (see `serving.engine.messages.Outputs`).
        outputs: list[Output] = [(handle, item.token_ids, item.finish_reason) if isinstance(item, TokenOutput)
                   else (handle, None, item) for handle, item in items]
        return _send(self._conn, self._lock, Outputs(outputs, self._engine.stats()))


def _send(conn: Connection, lock: threading.Lock, message: tuple) -> bool:
    try:
        with lock:
            conn.send(message)
    except (OSError, ValueError):  # the HTTP process is gone
        return False
    return True


def load_engine(model_path: str, config: EngineConfig) -> SubmittingEngine:
    import torch

    from serving.engine.engine import LLMEngine
    from serving.logs import route_transformers_logging

    route_transformers_logging()
    engine = LLMEngine.from_model_dir(model_path, config)
    if engine.model_info.device == "cpu":
        # On CPU the engine's matmul threads would take every core and spin, starving the HTTP process of the core
        # it needs to stream (docs/BENCHMARKS.md): leave it one.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
    return engine


def engine_main(conn: Connection, build: Callable[[], SubmittingEngine], log_level: str) -> None:
    """The engine process: build the engine, then serve the HTTP process's commands until told to stop."""
    # A signal for the whole process group (Ctrl-C in a terminal; `timeout`, an init or a supervisor that signals the
    # group) must not stop the engine under requests the HTTP process is still draining: it stops the engine when
    # its drain is over, and if it dies first the pipe closes and the engine stops on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from serving.logs import configure_logging

    configure_logging(log_level)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    lock = threading.Lock()
    try:
        engine = build()
    except ModelLoadError as exc:
        _send(conn, lock, LoadFailed("ModelLoadError", str(exc)))
        return
    except Exception as exc:  # reported to the HTTP process, which logs it and exits 1
        logger.exception("the engine failed to load the model")
        _send(conn, lock, LoadFailed(type(exc).__name__, f"{type(exc).__name__}: {exc}"))
        return
    _send(conn, lock, Loaded(engine.model_info, engine.tokenizer, engine.stats()))
    sink = _PipeSink(conn, lock, engine)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the HTTP process is gone: stop the engine and exit
            asyncio.run(engine.shutdown())
            return
        if isinstance(message, Add):
            request = message.request
            try:
                engine.submit(request, sink, request.request_id)
            except Exception as exc:  # noqa: BLE001 - the HTTP process checked first; this is a race, reported
                _send(conn, lock, Rejected(request.request_id, exc))
        elif isinstance(message, Abort):
            engine.abort(message.request_id)
        elif isinstance(message, Start):
            started = time.perf_counter()
            try:
                asyncio.run(engine.start())
            except Exception as exc:  # reported to the HTTP process, which logs it and exits 1
                logger.exception("the engine's warm-up failed")
                _send(conn, lock, StartFailed(f"{type(exc).__name__}: {exc}"))
                continue
            logger.info("engine warmed up in %.1f s", time.perf_counter() - started)
            _send(conn, lock, Started(engine.stats()))
        elif isinstance(message, Shutdown):
            asyncio.run(engine.shutdown())
            _send(conn, lock, Stopped(engine.stats()))
            return
