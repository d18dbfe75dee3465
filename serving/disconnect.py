"""Noticing a client that leaves mid-request, for the model server's API and the gateway alike.

Starlette's StreamingResponse (ASGI spec 2.3, as uvicorn declares) opens a task group, a cancel scope and an extra
task per request only to notice the client leaving; a profile put a fifth of the server's per-request work there.
One asyncio watcher per request does the same: it waits on `receive` and cancels the request's own task when the
client disconnects.
"""
from __future__ import annotations

import asyncio

from starlette.types import Receive


class DisconnectWatch:
    """Cancels the current task when the client leaves (`http.disconnect`), until `stop()`: one asyncio task that
    waits on `receive`. In the task's `except CancelledError`, `client_left()` says whether that cancellation was
    the client leaving alone (and then takes it back), or the server's own (which must propagate)."""

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None, "DisconnectWatch runs inside the request's task"
        self._task = task
        self._watching = True
        self._left = False
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._watching:  # never after stop(): a cancellation would hit whatever the task does next
            self._left = True
            self._task.cancel()

    def client_left(self) -> bool:
        return self._left and self._task.uncancel() == 0

    def stop(self) -> None:
        self._watching = False
        if self._watcher.done() and not self._watcher.cancelled():
            self._watcher.result()  # receive() failed: the server's error, raised as Starlette's task group would
        self._watcher.cancel()
