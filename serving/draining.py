"""uvicorn's server with the shutdown the platform's pods need, shared by the model server and the gateway.

uvicorn's own signal handling would not do: it closes the listening socket at once (so readiness probes get
connection errors rather than a 503), bounds in-flight work by its own timeout, and re-raises the signal after
shutting down, so the process dies of SIGTERM instead of exiting 0. Here the first SIGTERM or SIGINT runs the app's
drain (readiness fails, in-flight requests get their grace period) and only then lets uvicorn shut down; a second
signal exits at once.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType
from typing import Awaitable, Callable

import uvicorn

logger = logging.getLogger("serving")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT awaits `drain()` before uvicorn's shutdown begins, and which stops by
    itself once `failed()` says the process can no longer serve (the kubelet then restarts it, visibly)."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]],
                 failed: Callable[[], bool] | None = None) -> None:
        super().__init__(config)
        self._drain_app = drain
        self._failed = failed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Future | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Called by uvicorn's signal.signal handler on the main thread, which also runs the event loop, between two
        # bytecodes: schedule work on the loop rather than doing it here. Not recording the signal in
        # `_captured_signals` keeps uvicorn from re-raising it after shutdown (exit code 0).
        if self._drain is not None or self._loop is None:
            logger.warning("second signal: exiting without waiting", extra={"signal": signal.Signals(sig).name})
            self.should_exit = True
            self.force_exit = True
            return
        logger.info("signal received: draining", extra={"signal": signal.Signals(sig).name})
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain_app()
        finally:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's shutdown then lets open responses finish: streams already hold their error.
        return (self._failed is not None and self._failed()) or await super().on_tick(counter)
