"""The gateway's HTTP/1.1 client for its pods: a keep-alive connection pool per pod, each request written in one
`write`, each response parsed by httptools (the C parser uvicorn uses) in an `asyncio.Protocol`, and the body
handed to the proxy block by block as it arrives.

Why not httpx: the gateway relays every streamed token, and its CPU comes out of the same cores as the model
server's. With httpx it spent 95-130 us of CPU per streamed token at 16-64 streams, 55% of it in httpx's receive
path for the streamed body (per chunk: httpcore's async-generator layers, anyio's socket read, h11's pure-Python
chunked parsing) and 22% in sending each request and reading its headers (docs/BENCHMARKS.md, Gateway). Here a
body block costs one parser callback and, when the proxy is already waiting, one future.

What the proxy relies on:
- `UpstreamConnectError` (refused, unreachable: the pod is gone) and `UpstreamLost` (reset, closed, a malformed
  answer) are both `UpstreamError`; which one, and whether any body arrived first, decides retry or error event.
- A connection goes back to its pool only when its response was read to the end and the pod keeps it alive; any
  other `close()` (the client left, the pod was lost mid-body) closes it, and a pod sees the generation's client
  go away and aborts it.
- An idle connection is not reused after `keepalive_expiry` seconds, shorter than the model server's own keep-alive
  (uvicorn's 5 s): reusing one the server is closing at that moment would fail the request's first attempt.
"""
from __future__ import annotations

import asyncio
import ssl
from collections import deque

import httptools

# Body bytes held for a proxy that has not taken them yet (a slow client) before the pod's socket stops being read,
# so TCP pushes back on the pod instead of the gateway buffering a whole answer.
_READ_PAUSE_BYTES = 256 * 1024
# Connections kept idle per pod; more than this at once were opened for a burst and are closed when it ends.
_MAX_IDLE_PER_POD = 512


class UpstreamError(Exception):
    """The exchange with the pod failed."""


class UpstreamConnectError(UpstreamError):
    """No connection: refused, unreachable or not resolvable."""


class UpstreamLost(UpstreamError):
    """The connection failed, or the pod's answer was not HTTP, after it was made."""


class Upstreams:
    """Keep-alive connections to every pod the gateway sends to, pooled per `scheme://host:port`."""

    def __init__(self, keepalive_expiry: float = 4.0, connect_timeout: float = 5.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self._keepalive_expiry = keepalive_expiry
        self._connect_timeout = connect_timeout
        self._tls = tls
        self._origins: dict[str, _Origin] = {}
        self._next_sweep = 0.0

    async def request(self, origin_url: str, method: str, target: str, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"") -> "UpstreamResponse":
        """Send one request to `origin_url` (`http://host:port`) and return once the response's headers are in;
        its body is read with `next_block()` or `read()`, and `close()` must follow either way."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._next_sweep:
            self._sweep(now)
        origin = self._origins.get(origin_url)
        if origin is None:
            origin = self._origins[origin_url] = _Origin(origin_url, self._tls)
        head = [b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n" % (
            method.encode(), target.encode(), origin.host_header, len(body))]
        for name, value in headers:
            if b"\n" in value or b"\r" in value:  # would end the header early and smuggle in the rest
                raise ValueError(f"header {name!r} holds a line break")
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"\r\n")
        head.append(body)
        origin.busy += 1  # from here until the response's close(), or a failed connect: no sweep forgets the pod
        connection = origin.take_idle(now - self._keepalive_expiry)
        if connection is None:
            try:
                connection = await self._connect(origin, loop)
            except BaseException:
                origin.busy -= 1
                raise
        response = UpstreamResponse(connection, loop)
        try:
            connection.send(response, b"".join(head))
            await response.headers_received
        except BaseException:
            response.close()  # cancelled (the client left) or failed: this connection's state is unknown
            raise
        return response

    async def _connect(self, origin: "_Origin", loop: asyncio.AbstractEventLoop) -> "_Connection":
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(origin), origin.host, origin.port, ssl=origin.tls,
                    server_hostname=origin.host if origin.tls is not None else None)
        except TimeoutError:
            raise UpstreamLost(f"no connection to {origin.url} within {self._connect_timeout:g}s") from None
        except OSError as exc:  # refused, unreachable, a name that does not resolve, a TLS handshake refused
            raise UpstreamConnectError(f"cannot connect to {origin.url}: {exc.strerror or exc}") from None
        return connection

    def _sweep(self, now: float) -> None:
        """Close connections idle past the expiry at every pod, and forget pods with no connection left: pods come
        and go, and a pod that vanished without closing its connections would otherwise keep them open."""
        self._next_sweep = now + self._keepalive_expiry
        for url, origin in list(self._origins.items()):
            origin.close_idle(used_before=now - self._keepalive_expiry)
            if not origin.idle and not origin.busy:
                del self._origins[url]

    def close(self) -> None:
        """Close every idle connection; connections in use are closed by their responses."""
        for origin in self._origins.values():
            origin.close_idle()


class UpstreamResponse:
    """One response: its status and headers once `request()` returns, its body block by block."""

    __slots__ = ("status", "headers", "headers_received", "_connection", "_loop", "_blocks", "_buffered",
                 "_waiter", "_complete", "_error", "_keep_alive", "_paused", "_closed")

    def __init__(self, connection: "_Connection", loop: asyncio.AbstractEventLoop) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        """Names lower-cased, in the pod's order."""
        self.headers_received: asyncio.Future[None] = loop.create_future()
        self._connection: _Connection | None = connection
        self._loop = loop
        self._blocks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: UpstreamError | None = None
        self._keep_alive = False
        self._paused = False
        self._closed = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of the header `name` (lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def next_block(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some if none did); b"" at the end of the
        body. UpstreamLost when the connection failed first; bytes that arrived before the failure come first."""
        while True:
            blocks = self._blocks
            if blocks:
                block = blocks.popleft() if len(blocks) == 1 else b"".join(blocks)
                blocks.clear()
                self._buffered = 0
                if self._paused and self._connection is not None:
                    self._paused = False
                    self._connection.transport.resume_reading()
                return block
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read(self) -> bytes:
        """The whole body."""
        blocks = []
        while block := await self.next_block():
            blocks.append(block)
        return b"".join(blocks)

    def close(self) -> None:
        """Give the connection back to the pool if this response was read to the end and the pod keeps the
        connection alive; close it otherwise. Idempotent."""
        if self._closed:
            return
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.return_or_close(reusable=self._complete and self._keep_alive and not self._blocks)

    # ---- from the connection ---------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_headers(self, status: int) -> None:
        self.status = status
        if not self.headers_received.done():
            self.headers_received.set_result(None)

    def _on_body(self, block: bytes) -> None:
        self._blocks.append(block)
        self._buffered += len(block)
        if self._buffered > _READ_PAUSE_BYTES and not self._paused and self._connection is not None:
            self._paused = True
            self._connection.transport.pause_reading()
        self._wake()

    def _on_complete(self, keep_alive: bool) -> None:
        self._complete = True
        self._keep_alive = keep_alive
        self._wake()

    def _on_failure(self, error: UpstreamError) -> None:
        if self._complete:
            return
        self._error = error
        if not self.headers_received.done():
            self.headers_received.set_exception(error)
        self._wake()


class _Origin:
    """One pod's address and its idle connections, the most recently used last."""

    __slots__ = ("url", "host", "port", "host_header", "tls", "idle", "busy")

    def __init__(self, url: str, tls: ssl.SSLContext | None) -> None:
        scheme, _, netloc = url.partition("://")
        host, _, port = netloc.rpartition(":")
        self.url = url
        self.host = host.strip("[]")
        self.port = int(port)
        self.host_header = netloc.encode()
        self.tls = (tls or ssl.create_default_context()) if scheme == "https" else None
        self.idle: list[_Connection] = []
        self.busy = 0
        """Connections with a request on them."""

    def take_idle(self, used_since: float) -> "_Connection | None":
        """The most recently used idle connection, unless even it has been idle since before `used_since` (then
        every idle connection has, and all are closed)."""
        idle = self.idle
        if not idle:
            return None
        connection = idle.pop()
        if connection.idle_since < used_since:
            connection.close()
            self.close_idle()
            return None
        return connection

    def put_idle(self, connection: "_Connection") -> None:
        if len(self.idle) >= _MAX_IDLE_PER_POD:
            connection.close()
        else:
            self.idle.append(connection)

    def forget(self, connection: "_Connection") -> None:
        try:
            self.idle.remove(connection)
        except ValueError:
            pass  # it was in use: nothing to forget

    def close_idle(self, used_before: float | None = None) -> None:
        """Close the idle connections (those last used before `used_before`, when given)."""
        idle = self.idle
        keep = len(idle) if used_before is None else next(
            (index for index, connection in enumerate(idle) if connection.idle_since >= used_before), len(idle))
        self.idle = idle[keep:]
        for connection in idle[:keep]:
            connection.close()


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to a pod; httptools calls the `on_*` methods while it parses a response."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.response: UpstreamResponse | None = None
        self.idle_since = 0.0
        self.lost = False
        self._parser: httptools.HttpResponseParser | None = None
        self._until_close = False  # the body has no length and ends when the pod closes the connection

    def send(self, response: UpstreamResponse, data: bytes) -> None:
        if self.lost:
            raise UpstreamLost(f"the connection to {self.origin.url} was closed")
        self.response = response
        self._parser = httptools.HttpResponseParser(self)
        self._until_close = False
        self.transport.write(data)

    def return_or_close(self, reusable: bool) -> None:
        self.response = None
        self.origin.busy -= 1
        if reusable and not self.lost:
            self.idle_since = asyncio.get_running_loop().time()
            self.origin.put_idle(self)
        else:
            self.close()

    def close(self) -> None:
        self.lost = True
        self.transport.close()

    # ---- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is None or self._parser is None:
            self.close()  # bytes nobody asked for: this connection is out of step with the pod
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self.response._on_failure(UpstreamLost(f"{self.origin.url} answered something that is not HTTP/1.1: "
                                                   f"{exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        response = self.response
        if response is None:
            self.origin.forget(self)  # an idle connection the pod (or its keep-alive timeout) closed
            return
        if exc is None and self._until_close and response.headers_received.done():
            response._on_complete(keep_alive=False)
            return
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "the pod closed the connection"
        response._on_failure(UpstreamLost(f"connection to {self.origin.url} lost ({reason})"))

    # ---- httptools callbacks ---------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.response is None or self.response.headers_received.done():
            # A second response to one request: the connection is out of step. Raising here makes feed_data
            # fail, and the connection is closed.
            raise UpstreamLost(f"{self.origin.url} sent more than one response to a request")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers.append((name.lower(), value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        parser, response = self._parser, self.response
        headers = response.headers  # type: ignore[union-attr]
        self._until_close = not any(name in (b"content-length", b"transfer-encoding") for name, _ in headers)
        response._on_headers(parser.get_status_code())  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.response._on_body(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self.response._on_complete(self._parser.should_keep_alive())  # type: ignore[union-attr]
