"""The gateway's upstream HTTP/1.1 client (serving.gateway.upstream) on its own, against a small asyncio server in
the test whose every answer is scripted: chunked and content-length bodies, a body that ends with the connection,
keep-alive reuse and expiry, a reset before the answer and mid-body, a server that closes an idle connection, and a
response left unread. The server counts connections, so reuse (or not) is seen, not inferred."""
from __future__ import annotations

import asyncio
import socket
import struct
from typing import Awaitable, Callable

import pytest

from serving.gateway.upstream import UpstreamConnectError, UpstreamLost, UpstreamResponse, Upstreams

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]
"""Writes one answer to the request (its body given); False when the connection is to end after it."""


class ScriptedServer:
    """HTTP/1.1 on 127.0.0.1: reads each request (headers and content-length body) and answers it with `answer`."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
        self.closed_by_client = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> "ScriptedServer":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    self.closed_by_client.set()
                    return
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                self.requests.append((request_line, headers, body))
                if not await self.answer(reader, writer, body):
                    if reader.at_eof():
                        self.closed_by_client.set()
                    return
        except ConnectionError:
            self.closed_by_client.set()
        finally:
            writer.close()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: what the gateway sees when a pod's process dies."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def send(upstreams: Upstreams, server: ScriptedServer, body: bytes = b'{"x": 1}') -> UpstreamResponse:
    return await upstreams.request(server.url, "POST", "/v1/completions",
                                   [(b"content-type", b"application/json"), (b"x-request-id", b"r-1")], body)


async def chunked_events(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    for n in range(3):
        writer.write(chunk(b"data: %d\n\n" % n))
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    return True


async def json_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (len(body), body))
    return True


def test_a_chunked_body_is_decoded_and_the_connection_reused():
    async def scenario():
        async with ScriptedServer(chunked_events) as server:
            upstreams = Upstreams()
            for _ in range(3):
                response = await send(upstreams, server)
                assert response.status == 200 and response.header(b"content-type") == b"text/event-stream"
                assert await response.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
                response.close()
            assert server.connections == 1 and len(server.requests) == 3
            request_line, headers, body = server.requests[0]
            assert request_line == b"POST /v1/completions HTTP/1.1\r\n" and body == b'{"x": 1}'
            assert headers[b"host"] == server.url.split("://")[1].encode()
            assert headers[b"content-length"] == b"8" and headers[b"x-request-id"] == b"r-1"
            upstreams.close()

    asyncio.run(scenario())


def test_a_content_length_body_is_read_whole_and_the_connection_reused():
    async def scenario():
        async with ScriptedServer(json_answer) as server:
            upstreams = Upstreams()
            for n in range(2):
                response = await send(upstreams, server, b'{"n": %d}' % n)
                assert await response.read() == b'{"n": %d}' % n
                response.close()
            assert server.connections == 1
            upstreams.close()

    asyncio.run(scenario())


def test_blocks_are_handed_over_as_they_arrive():
    """The first block is the caller's while the server still holds back the second."""
    second = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"first"))
        await writer.drain()
        await second.wait()
        writer.write(chunk(b"second") + b"0\r\n\r\n")
        return True

    async def scenario():
        async with ScriptedServer(answer) as server:
            upstreams = Upstreams()
            response = await send(upstreams, server)
            assert await response.next_block() == b"first"
            second.set()
            assert await response.next_block() == b"second"
            assert await response.next_block() == b""
            response.close()
            upstreams.close()

    asyncio.run(scenario())


def test_connection_close_ends_a_body_without_length_and_the_connection_is_not_reused():
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-type: text/event-stream\r\n\r\n"
                     b"data: 1\n\ndata: 2\n\n")
        return False

    async def scenario():
        async with ScriptedServer(answer) as server:
            upstreams = Upstreams()
            for _ in range(2):
                response = await send(upstreams, server)
                assert await response.read() == b"data: 1\n\ndata: 2\n\n"
                response.close()
            assert server.connections == 2
            upstreams.close()

    asyncio.run(scenario())


def test_connection_close_with_a_length_is_not_reused_either():
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)  # the client has the whole body before the connection ends
        return False

    async def scenario():
        async with ScriptedServer(answer) as server:
            upstreams = Upstreams()
            for _ in range(2):
                response = await send(upstreams, server)
                assert await response.read() == b"ok"
                response.close()
            assert server.connections == 2
            upstreams.close()

    asyncio.run(scenario())


def test_a_reset_mid_body_fails_after_the_bytes_that_came_first():
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"data: 0\n\n"))
        await writer.drain()
        await asyncio.sleep(0.05)
        reset(writer)
        return False

    async def scenario():
        async with ScriptedServer(answer) as server:
            upstreams = Upstreams()
            response = await send(upstreams, server)
            assert await response.next_block() == b"data: 0\n\n"
            with pytest.raises(UpstreamLost, match="lost"):
                await response.next_block()
            response.close()
            upstreams.close()

    asyncio.run(scenario())


def test_a_reset_before_the_answer_fails_the_request_and_a_refused_connection_is_a_connect_error():
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
        reset(writer)
        return False

    async def scenario():
        async with ScriptedServer(answer) as server:
            upstreams = Upstreams()
            with pytest.raises(UpstreamLost):
                await send(upstreams, server)
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        with pytest.raises(UpstreamConnectError, match="cannot connect"):
            await upstreams.request(f"http://127.0.0.1:{port}", "POST", "/", [], b"")
        upstreams.close()

    asyncio.run(scenario())


def test_an_idle_connection_the_server_closed_is_not_used_again():
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
        await json_answer(reader, writer, body)
        await writer.drain()
        return False  # as a server's keep-alive timeout does: close after answering, without saying so

    async def scenario():
        async with ScriptedServer(answer) as server:
            upstreams = Upstreams()
            response = await send(upstreams, server)
            assert await response.read() == b'{"x": 1}'
            response.close()  # pooled: the answer did not say close
            await asyncio.sleep(0.1)  # the server's FIN arrives while the connection is idle
            response = await send(upstreams, server)
            assert await response.read() == b'{"x": 1}'
            response.close()
            assert server.connections == 2
            upstreams.close()

    asyncio.run(scenario())


def test_an_idle_connection_past_the_keepalive_expiry_is_not_reused():
    async def scenario():
        async with ScriptedServer(json_answer) as server:
            upstreams = Upstreams(keepalive_expiry=0.05)
            for pause in (0.0, 0.2):
                await asyncio.sleep(pause)
                response = await send(upstreams, server)
                assert await response.read() == b'{"x": 1}'
                response.close()
            assert server.connections == 2
            upstreams.close()

    asyncio.run(scenario())


def test_a_response_not_read_to_the_end_closes_its_connection():
    """What happens when the gateway's client leaves mid-stream: the server sees the connection end (and a pod
    aborts the generation), and the next request gets a fresh connection."""
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(chunk(b"data: more\n\n"))
            await writer.drain()
            await asyncio.sleep(0.01)

    async def scenario():
        async with ScriptedServer(endless) as server:
            upstreams = Upstreams()
            response = await send(upstreams, server)
            assert await response.next_block()
            response.close()
            await asyncio.wait_for(server.closed_by_client.wait(), 10)
            server.answer = json_answer
            response = await send(upstreams, server)
            assert await response.read() == b'{"x": 1}'
            response.close()
            assert server.connections == 2
            upstreams.close()

    asyncio.run(scenario())


def test_a_request_cancelled_while_waiting_for_the_answer_closes_its_connection():
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> bool:
        await reader.read()  # no answer; only the client's end of the connection ends this
        return False

    async def scenario():
        async with ScriptedServer(never) as server:
            upstreams = Upstreams()
            waiting = asyncio.ensure_future(send(upstreams, server))
            while not server.requests:
                await asyncio.sleep(0.01)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await asyncio.wait_for(server.closed_by_client.wait(), 10)
            upstreams.close()

    asyncio.run(scenario())


def test_a_header_value_with_a_line_break_is_refused_before_sending():
    async def scenario():
        async with ScriptedServer(json_answer) as server:
            upstreams = Upstreams()
            with pytest.raises(ValueError, match="line break"):
                await upstreams.request(server.url, "POST", "/", [(b"x-request-id", b"a\r\nx-evil: 1")], b"")
            assert server.connections == 0

    asyncio.run(scenario())


def test_idle_connections_to_a_pod_no_longer_used_are_closed_by_later_requests_elsewhere():
    """A pod that left (scaled down, rescheduled) gets no more requests; its pooled connections are closed anyway."""
    async def scenario():
        async with ScriptedServer(json_answer) as gone, ScriptedServer(json_answer) as other:
            upstreams = Upstreams(keepalive_expiry=0.05)
            response = await send(upstreams, gone)
            assert await response.read() == b'{"x": 1}'
            response.close()
            await asyncio.sleep(0.2)
            response = await send(upstreams, other)
            assert await response.read() == b'{"x": 1}'
            response.close()
            await asyncio.wait_for(gone.closed_by_client.wait(), 10)
            upstreams.close()

    asyncio.run(scenario())
