"""A small fake model server for the gateway's balancing and failure tests: real HTTP on 127.0.0.1, in a thread.

It answers `/health/ready` and streams OpenAI-shaped completions whose text names the upstream (`pod-a ...`), so a
test can tell which pod served a request. Its behaviour is set per test: a delay per token (a slow pod), resetting
the connection on each request (a pod that dies before its first byte), or dropping it after a few events (a pod
lost mid-stream). It records every request it got and counts the streams a client abandoned.
"""
from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class Behaviour:
    tokens: int = 5
    token_delay: float = 0.0
    reset: bool = False
    """Reset the connection as soon as a request arrives (before any byte)."""
    die_after_events: int | None = None
    """Send this many events, then reset the connection."""
    ready: bool = True


@dataclass
class Seen:
    path: str
    body: dict
    headers: dict[str, str] = field(default_factory=dict)


class FakeUpstream:
    def __init__(self, name: str, port: int = 0) -> None:
        self.name = name
        self.behaviour = Behaviour()
        self.requests: list[Seen] = []
        self.abandoned = 0
        self.active = 0
        self.events_sent = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._port = port
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fake-{name}", daemon=True)

    def start(self) -> "FakeUpstream":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def served(self, path: str = "/v1/completions") -> int:
        return sum(seen.path == path for seen in self.requests)

    # ---- the HTTP side ---------------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode().split(" ", 2)
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if path == "/health/ready":
                    status = 200 if self.behaviour.ready else 503
                    _respond(writer, status, b'{"status": "ok"}')
                    await writer.drain()
                    continue
                data = json.loads(body)
                self.requests.append(Seen(path, data, headers))
                if self.behaviour.reset:
                    _reset(writer)
                    return
                if not await self._answer(writer, data):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, data: dict) -> bool:
        """Answer one completion; False when the connection is gone (reset by design or by the client)."""
        behaviour = self.behaviour
        usage = {"prompt_tokens": 3, "completion_tokens": behaviour.tokens, "total_tokens": 3 + behaviour.tokens}
        if not data.get("stream"):
            await asyncio.sleep(behaviour.token_delay * behaviour.tokens)
            text = " ".join([f"pod-{self.name}"] * behaviour.tokens)
            body = {"id": "cmpl-1", "object": "text_completion", "model": data.get("model"),
                    "choices": [{"index": 0, "text": text, "finish_reason": "length"}], "usage": usage}
            _respond(writer, 200, json.dumps(body).encode())
            await writer.drain()
            return True
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        include_usage = (data.get("stream_options") or {}).get("include_usage")
        self.active += 1
        try:
            for index in range(behaviour.tokens):
                if behaviour.die_after_events is not None and index >= behaviour.die_after_events:
                    await writer.drain()
                    _reset(writer)
                    return False
                chunk = {"id": "cmpl-1", "object": "text_completion", "model": data.get("model"),
                         "choices": [{"index": 0, "text": f"pod-{self.name} ", "finish_reason": None}]}
                if include_usage:
                    chunk["usage"] = None
                _chunk(writer, f"data: {json.dumps(chunk)}\n\n".encode())
                await writer.drain()
                self.events_sent += 1
                await asyncio.sleep(behaviour.token_delay)
            if include_usage:
                last = {"id": "cmpl-1", "object": "text_completion", "model": data.get("model"), "choices": [],
                        "usage": usage}
                _chunk(writer, f"data: {json.dumps(last)}\n\n".encode())
            _chunk(writer, b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        except (ConnectionError, asyncio.CancelledError):
            self.abandoned += 1
            return False
        finally:
            self.active -= 1


def _respond(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
    reason = {200: "OK", 503: "Service Unavailable"}.get(status, "Error")
    writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
                 "\r\n\r\n".encode() + body)


def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: what a client sees when a pod's process dies."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
