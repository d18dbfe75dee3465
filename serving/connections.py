"""Connection limits below the ASGI app, in uvicorn's HTTP protocol: a cap on open connections, and a deadline and a
size limit for a request's headers.

uvicorn accepts every connection and waits for a request's headers as long as the client likes, so a few thousand
half-open connections hold memory and file descriptors indefinitely. Here a connection beyond `max_connections` is
closed as it arrives, and one whose request headers do not arrive within `header_timeout` seconds (or grow past
`MAX_HEADER_BYTES`) gets a 408 (431) and is closed. The body's own deadline is the request middleware's
(`serving.app`), since the app reads the body.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.errors import error_body

logger = logging.getLogger("serving")

MAX_HEADER_BYTES = 64 * 1024
_REFUSAL_LOG_SECONDS = 10.0


def _response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps(error_body(status, message, code=code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; `guarded_protocol()` makes one with the settings' values."""

    max_connections = 1024
    header_timeout = 10.0
    _refused = 0
    _refusal_logged_at = float("-inf")

    # uvicorn's own signature, which narrows asyncio.Protocol's BaseTransport (and ignores the override there too).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        if len(self.connections) > self.max_connections:
            self._note_refusal()
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        awaiting_headers = self._header_timer is not None
        super().data_received(data)
        if awaiting_headers and self._header_timer is not None:  # these bytes did not complete the headers
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse(431, "Request Header Fields Too Large",
                             f"The request headers are larger than {MAX_HEADER_BYTES} bytes; send smaller headers",
                             "headers_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()  # the next request on a kept-alive connection gets its own deadline

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_bytes = 0
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        self._refuse(408, "Request Timeout", f"The request headers did not arrive within {self.header_timeout:g} "
                                             "seconds; send them at once", "request_timeout")

    def _refuse(self, status: int, reason: str, message: str, code: str) -> None:
        self._disarm_header_timer()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A response is still being sent (the next request was pipelined behind it): close after it instead.
            self.cycle.keep_alive = False
            return
        self.transport.write(_response(status, reason, message, code))
        self.transport.close()

    @classmethod
    def _note_refusal(cls) -> None:
        # One log line per interval, not one per connection: a flood must not also flood the log.
        cls._refused += 1
        now = time.monotonic()
        if now - cls._refusal_logged_at >= _REFUSAL_LOG_SECONDS:
            logger.warning("connection limit reached: closing new connections",
                           extra={"event": "connections_refused", "refused": cls._refused,
                                  "max_connections": cls.max_connections})
            cls._refusal_logged_at, cls._refused = now, 0


def guarded_protocol(max_connections: int, header_timeout: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give uvicorn (`uvicorn.Config(http=...)`) for these limits."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"max_connections": max_connections, "header_timeout": header_timeout})
