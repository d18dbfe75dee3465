"""The async stream a caller reads one request's tokens from, and how an engine thread feeds it.

The engine-loop thread puts `TokenOutput`s (or an `EngineError`) into an asyncio.Queue on the caller's
event loop. Reading merges everything already queued into one output, so a slow consumer gets several
tokens at once instead of falling further behind. A stream abandoned before its final output (closed,
its task cancelled, or garbage-collected) aborts its request so the slot is freed.
"""
from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Callable, Protocol

from serving.engine.interface import TokenOutput


class TokenStream:
    """AsyncIterator[TokenOutput] over one request; the last output carries the finish reason."""

    def __init__(self, queue: asyncio.Queue, on_abandon: Callable[[], None]) -> None:
        self._queue = queue
        self._on_abandon = on_abandon
        self._done = False
        self._pending_error: BaseException | None = None

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> TokenOutput:
        if self._pending_error is not None:
            self._done = True
            error, self._pending_error = self._pending_error, None
            raise error
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled while waiting: the consumer is gone
            self._abandon()
            raise
        token_ids: list[int] = []
        while True:
            if isinstance(item, BaseException):
                if not token_ids:
                    self._done = True
                    raise item
                self._pending_error = item  # deliver the tokens that came before the error first
                return TokenOutput(tuple(token_ids))
            token_ids.extend(item.token_ids)
            if item.finish_reason is not None:
                self._done = True
                return TokenOutput(tuple(token_ids), item.finish_reason)
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return TokenOutput(tuple(token_ids))

    async def aclose(self) -> None:
        """Stop reading: aborts the request if it has not finished."""
        self._abandon()

    def _abandon(self) -> None:
        if not self._done:
            self._done = True
            self._on_abandon()

    def __del__(self) -> None:
        if not self._done:
            try:
                self._on_abandon()
            except Exception:  # interpreter shutdown: nothing left to free
                pass


class OutputSink(Protocol):
    """Where the engine loop thread sends outputs: once per step, every output for this sink's requests."""

    def deliver(self, items: list[tuple[object, object]]) -> bool:
        """`items` are (handle, TokenOutput or EngineError) pairs, the handle being what the request was submitted
        with. False when nobody can read them any more (the engine then aborts those requests)."""


class LoopSink:
    """Delivers to asyncio queues (the handles) on one event loop, in one thread-safe callback per step."""

    _by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopSink]" = weakref.WeakKeyDictionary()
    _by_loop_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "LoopSink":
        """The one sink of `loop`: an engine groups each step's outputs by sink, so one sink per loop means one
        callback per loop per step."""
        with cls._by_loop_lock:
            sink = cls._by_loop.get(loop)
            if sink is None:
                sink = cls._by_loop[loop] = cls(loop)
            return sink

    def deliver(self, items: list[tuple[asyncio.Queue, object]]) -> bool:
        try:
            self.loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed
            return False
        return True


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
