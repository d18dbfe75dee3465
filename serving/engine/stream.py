"""The async stream a caller reads one request's tokens from, and how an engine thread feeds it.

The engine-loop thread puts `TokenOutput`s (or an `EngineError`) into a `Mailbox` on the caller's event
loop. Reading merges everything already there into one output, so a slow consumer gets several tokens at
once instead of falling further behind. A stream abandoned before its final output (closed, its task
cancelled, or garbage-collected) aborts its request so the slot is freed.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from typing import Any, Callable, Protocol, Union

from serving.engine.interface import TokenOutput

StreamItem = Union[TokenOutput, BaseException]
"""What a stream's mailbox holds: a request's next output, or the error that ends it (an `EngineError`, or what the
engine process refused its submit with)."""


class Mailbox:
    """One stream's outputs on its event loop: any number of `put_nowait` calls from that loop's thread, one reader.

    What asyncio.Queue does for this case, at a fraction of its cost per streamed token: a reader that finds
    outputs waiting takes them without awaiting, and no size limit or list of waiting writers is kept."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[StreamItem] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: StreamItem) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __len__(self) -> int:
        return len(self._items)

    async def wait(self) -> None:
        """Return once there is an output to take."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def take(self) -> StreamItem:
        return self._items.popleft()


class TokenStream:
    """AsyncIterator[TokenOutput] over one request; the last output carries the finish reason."""

    def __init__(self, queue: Mailbox, on_abandon: Callable[[], None]) -> None:
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
        queue = self._queue
        if not queue:
            try:
                await queue.wait()
            except BaseException:  # cancelled while waiting: the consumer is gone
                self._abandon()
                raise
        item = queue.take()
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
            if not queue:
                return TokenOutput(tuple(token_ids))
            item = queue.take()

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
            except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to free
                pass


class OutputSink(Protocol):
    """Where the engine loop thread sends outputs: once per step, every output for this sink's requests."""

    def deliver(self, items: list[tuple[Any, StreamItem]]) -> bool:
        """`items` are (handle, TokenOutput or EngineError) pairs, the handle being what the request was submitted
        with (each sink has its own kind: a `Mailbox`, a request id). False when nobody can read them any more (the
        engine then aborts those requests)."""


class LoopSink:
    """Delivers to mailboxes (the handles) on one event loop, in one thread-safe callback per step."""

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

    def deliver(self, items: list[tuple[Mailbox, StreamItem]]) -> bool:
        try:
            self.loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed
            return False
        return True


def _put_all(items: list[tuple[Mailbox, StreamItem]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
