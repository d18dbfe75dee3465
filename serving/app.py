"""The FastAPI application: `create_app(settings, engine_or_factory)`, its lifespan, and the request middleware.

The state the routers share, and the server's lifecycle, live in `serving.state`.

Every HTTP request passes one pure-ASGI middleware (pure, so streaming responses are not buffered) that gives
it a request id, checks its API key before reading its body (for API requests), caps its body's size and read
time, and, for API requests, counts it in the metrics and writes one access log line. Nothing heavy happens at
import: the engine (torch) is only touched through the factory.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api import health, openai
from serving.api import metrics as metrics_api
from serving.errors import CLIENT_CLOSED_REQUEST, error_response, install_error_handlers
from serving.logs import request_id_var
from serving.settings import Settings
from serving.state import API_KEY_NAME, EngineSource, ServerState

logger = logging.getLogger("serving")
access_logger = logging.getLogger("serving.access")

# Oversized bodies up to this size are read and dropped so the client sees the 413 (see _bounded_body).
_DISCARD_CAP_BYTES = 16 * 1024 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


class RequestMiddleware:
    """Request id, the API key (checked before any body byte is read), the body's size cap and read deadline, and (for
    /v1 requests) metrics, access log and the last-resort 500."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        incoming_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming_id if _REQUEST_ID.match(incoming_id) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        is_api = scope["path"].startswith("/v1/")
        started = time.perf_counter()
        status: int | None = None
        key_name: str | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        if is_api:
            self.state.request_started()
        try:
            refusal = None
            if is_api and self.state.keys.enabled:
                key_name, refusal = self._authenticate(headers)
                scope.setdefault("state", {})[API_KEY_NAME] = key_name
            if refusal is not None:
                await refusal(scope, _no_body, send_with_id)
            else:
                bounded = await self._bounded_body(scope, headers, receive, send_with_id)
                if bounded is not None:
                    await self.app(scope, bounded, send_with_id)
        except Exception:
            logger.exception("unhandled error", extra={"path": scope["path"]})
            if status is None:
                response = error_response(500, f"Internal server error (request id {request_id}); it was logged",
                                          code="internal_error")
                await response(scope, _no_body, send_with_id)
        finally:
            if is_api:
                duration = time.perf_counter() - started
                # No response at all means the client left first (before its body arrived, or the task was cancelled).
                final_status = status if status is not None else CLIENT_CLOSED_REQUEST
                self.state.request_finished()
                self.state.metrics.count_request(final_status)
                self.state.metrics.duration.observe(duration)
                access_logger.info("%s %s %s", scope["method"], scope["path"], final_status,
                                   extra={"method": scope["method"], "path": scope["path"], "status": final_status,
                                          "duration_ms": round(duration * 1e3, 2),
                                          **({"key": key_name} if key_name else {})})
            request_id_var.reset(token)

    def _authenticate(self, headers: dict[bytes, bytes]) -> tuple[str | None, JSONResponse | None]:
        """(the key's name, None), or (None, a 401). Runs before the body is read: a caller without a key cannot make
        the server read, hold or parse anything."""
        # A body left unread makes the connection unusable for another request: tell the client it closes.
        close = {"Connection": "close"} if _has_body(headers) else None
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, error_response(401, "Missing API key: send it as 'Authorization: Bearer <key>'",
                                        code="invalid_api_key", headers=close)
        key = self.state.keys.authenticate(token.strip())
        if key is None:
            return None, error_response(401, "Incorrect API key provided", code="invalid_api_key", headers=close)
        return key.name, None

    async def _bounded_body(self, scope: Scope, headers: dict[bytes, bytes], receive: Receive,
                            send: Send) -> Receive | None:
        """Read the body up to the limit and replay it; answer 413 (larger) or 408 (too slow) and return None.

        Content-Length is checked before reading, then the bytes actually received, since a chunked body or
        a client that lies about its length has no trustworthy header. An oversized body is read and thrown
        away (up to a cap) before the 413 goes out, as nginx does: a client still uploading would otherwise
        get a connection reset instead of the answer. The whole body, dropped bytes included, must arrive within
        the body timeout: a client trickling a byte a second would otherwise hold its connection and task forever.
        """
        limit = self.state.max_body_bytes
        declared = headers.get(b"content-length")
        if scope["method"] in ("GET", "HEAD", "OPTIONS") and not _has_body(headers):
            return receive
        deadline = asyncio.get_running_loop().time() + self.state.settings.body_timeout_seconds
        receive_in_time = partial(_receive_by, deadline, receive)
        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                consumed = int(declared) <= _DISCARD_CAP_BYTES and await _discard_body(receive_in_time,
                                                                                      _DISCARD_CAP_BYTES)
                await _too_large(limit, consumed)(scope, _no_body, send)
                return None
            chunks: list[bytes] = []
            size = 0
            more_body = True
            while more_body:
                message = await receive_in_time()
                if message["type"] != "http.request":
                    return None  # the client went away before sending its body
                chunk = message.get("body", b"")
                more_body = message.get("more_body", False)
                size += len(chunk)
                if size > limit:
                    consumed = not more_body or await _discard_body(receive_in_time, _DISCARD_CAP_BYTES - size)
                    await _too_large(limit, consumed)(scope, _no_body, send)
                    return None
                chunks.append(chunk)
        except _BodyTimeout:
            seconds = self.state.settings.body_timeout_seconds
            await error_response(408, f"The request body did not arrive within {seconds:g} seconds; send it at once",
                                 code="request_timeout", headers={"Connection": "close"})(scope, _no_body, send)
            return None
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices for streaming responses

        return replay


class _BodyTimeout(Exception):
    """The request body's deadline passed."""


async def _receive_by(deadline: float, receive: Receive) -> Message:
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        raise _BodyTimeout
    try:
        return await asyncio.wait_for(receive(), remaining)
    except asyncio.TimeoutError:
        raise _BodyTimeout from None


def _has_body(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers


def _too_large(limit: int, body_consumed: bool) -> JSONResponse:
    # A body left unread makes the connection unusable for another request: tell the client it closes.
    return error_response(413, f"Request body is larger than the server's limit of {limit} bytes; send a "
                               "smaller request", code="request_too_large",
                          headers=None if body_consumed else {"Connection": "close"})


async def _discard_body(receive: Receive, budget: int) -> bool:
    """Read and drop the rest of a request body; False when it is larger than `budget` or the client left."""
    while budget >= 0:
        message = await receive()
        if message["type"] != "http.request":
            return False
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return budget >= 0
    return False


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def create_app(settings: Settings, engine: EngineSource) -> FastAPI:
    """The app. `engine` is a started-or-not Engine, or a zero-argument factory run in a thread at startup."""
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Not awaited here: uvicorn only starts listening once startup returns, and probes must answer meanwhile.
        loading = asyncio.create_task(state.load(engine), name="load-engine")
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()
            await state.close()

    # No OpenAPI page: request bodies are parsed by hand (see api.openai.json_body), so it would be incomplete;
    # the API is OpenAI's, documented there.
    # No trailing-slash redirects: Starlette's would send `/v1/completions/` to a URL built from the Host header.
    app = FastAPI(title="llm-platform serving", version="1.0.0", lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics_api.router)
    app.include_router(openai.router)
    app.add_middleware(RequestMiddleware, state=state)
    return app

