"""The FastAPI application: `create_app(settings, engine_or_factory)`, its lifecycle, and the request middleware.

Lifecycle (`ServerState.phase`): the app starts listening at once, `loading` the model in a background
thread and then warming it up (`engine.start()`); `ready` serves; `draining` (after SIGTERM, see
`serving.__main__`) refuses new work and lets in-flight requests finish up to the grace period, then aborts
them; `stopped` after the engine shut down; `failed` when the model could not be loaded.

Every HTTP request passes one pure-ASGI middleware (pure, so streaming responses are not buffered) that gives
it a request id, caps its body size, and, for API requests, counts it in the metrics and writes one access
log line. Nothing heavy happens at import: the engine (torch) is only touched through the factory.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable, Union

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api import health, metrics as metrics_api, openai
from serving.engine.interface import Engine, EngineStats, ModelLoadError
from serving.errors import CLIENT_CLOSED_REQUEST, APIError, error_response, install_error_handlers
from serving.gpu_monitor import GpuUtilizationCollector
from serving.logs import request_id_var
from serving.metrics import ServerMetrics
from serving.settings import Settings

logger = logging.getLogger("serving")
access_logger = logging.getLogger("serving.access")

EngineSource = Union[Engine, Callable[[], Engine]]

# After the drain deadline aborts what is left, aborted streams need a moment to send their last event.
_ABORT_SETTLE_SECONDS = 5.0
# Oversized bodies up to this size are read and dropped so the client sees the 413 (see _bounded_body).
_DISCARD_CAP_BYTES = 16 * 1024 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


class Phase(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class InflightGeneration:
    """An engine request being streamed; the drain deadline aborts it and marks it `cut`."""

    engine_request_id: str
    cut: bool = False


class ServerState:
    """What the routers share: settings, metrics, the engine once started, phase and in-flight work."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.phase = Phase.LOADING
        self.engine: Engine | None = None
        self.started_at = int(time.time())
        self.gpu_collector = GpuUtilizationCollector()
        self.metrics = ServerMetrics(settings.model_name, self.engine_stats, self.gpu_collector)
        self.inflight: dict[str, InflightGeneration] = {}
        self._active_requests = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def started(self) -> bool:
        """Loaded and warmed up (it stays so while draining)."""
        return self.phase in (Phase.READY, Phase.DRAINING)

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    @property
    def failed(self) -> bool:
        return self.phase is Phase.FAILED

    # ---- engine access ---------------------------------------------------------------------------------------

    def engine_stats(self) -> EngineStats | None:
        """Stats of a started engine, else None (metrics then read zero)."""
        if self.engine is None or self.phase in (Phase.LOADING, Phase.FAILED):
            return None
        return self.engine.stats()

    def require_engine(self) -> Engine:
        """The engine, or a 503 that says why there is none to use."""
        if self.phase is Phase.READY and self.engine is not None:
            return self.engine
        reason = {
            Phase.LOADING: "the model is still loading; retry shortly",
            Phase.DRAINING: "the server is shutting down; retry on another replica",
            Phase.STOPPED: "the server is shutting down; retry on another replica",
            Phase.FAILED: "the model failed to load; see the server log",
        }[self.phase]
        raise APIError(503, f"Service unavailable: {reason}", code="not_ready", headers={"Retry-After": "1"})

    # ---- lifecycle -------------------------------------------------------------------------------------------

    async def load(self, source: EngineSource) -> None:
        """Build the engine (slow: in a thread, so health probes answer meanwhile), then warm it up."""
        try:
            if callable(source) and not hasattr(source, "generate"):
                engine = await _run_in_daemon_thread(source)
            else:
                engine = source
            self.engine = engine
            await engine.start()
        except ModelLoadError as exc:
            self.phase = Phase.FAILED
            logger.error(str(exc), extra={"event": "model_load_failed", "model_path": str(self.settings.model_path)})
            return
        except Exception:
            self.phase = Phase.FAILED
            logger.exception("engine failed to start", extra={"event": "model_load_failed"})
            return
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
            info = engine.model_info
            logger.info("ready to serve", extra={"event": "ready", "model": self.settings.model_name,
                                                 "max_model_len": info.max_model_len, "device": info.device,
                                                 "dtype": info.dtype})

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new work, let in-flight requests finish for up to `grace_seconds`, then abort the rest."""
        if self.phase in (Phase.LOADING, Phase.READY):
            self.phase = Phase.DRAINING
        logger.info("draining", extra={"event": "drain_started", "active_requests": self._active_requests,
                                       "grace_seconds": grace_seconds})
        if await self._wait_idle(grace_seconds):
            logger.info("drained: no requests in flight", extra={"event": "drained"})
            return
        cut = list(self.inflight.values())
        logger.warning("drain deadline reached: aborting in-flight generations",
                       extra={"event": "drain_deadline", "aborted": len(cut), "active_requests": self._active_requests})
        for generation in cut:
            generation.cut = True
            if self.engine is not None:
                self.engine.abort(generation.engine_request_id)
        if not await self._wait_idle(_ABORT_SETTLE_SECONDS):
            logger.warning("requests still open after abort; the server closes them",
                           extra={"active_requests": self._active_requests})

    async def close(self) -> None:
        """Shut the engine down (aborting anything left) once the HTTP server stopped serving."""
        if self.phase is not Phase.FAILED:
            self.phase = Phase.STOPPED
        if self.engine is not None:
            await self.engine.shutdown()
        self.gpu_collector.close()
        logger.info("engine shut down", extra={"event": "stopped"})

    # ---- in-flight generations (the drain deadline aborts them) ------------------------------------------------

    def track(self, engine_request_id: str) -> InflightGeneration:
        generation = InflightGeneration(engine_request_id)
        self.inflight[engine_request_id] = generation
        return generation

    def untrack(self, engine_request_id: str) -> None:
        self.inflight.pop(engine_request_id, None)

    # ---- request accounting (middleware) ---------------------------------------------------------------------

    def request_started(self) -> None:
        self._active_requests += 1
        self._idle.clear()
        self.metrics.active.inc()

    def request_finished(self) -> None:
        self._active_requests -= 1
        self.metrics.active.dec()
        if self._active_requests == 0:
            self._idle.set()

    async def _wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


async def _run_in_daemon_thread(function: Callable[[], Engine]) -> Engine:
    """Like asyncio.to_thread, but a daemon thread: a SIGTERM during a minutes-long load must not wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Engine] = loop.create_future()

    def settle(result: Engine | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result = function()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name="model-loader", daemon=True).start()
    return await future


class RequestMiddleware:
    """Request id, body-size cap, and (for /v1 requests) metrics, access log and the last-resort 500."""

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

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        if is_api:
            self.state.request_started()
        try:
            receive = await self._bounded_body(scope, headers, receive, send_with_id)
            if receive is not None:
                await self.app(scope, receive, send_with_id)
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
                                          "duration_ms": round(duration * 1e3, 2)})
            request_id_var.reset(token)

    async def _bounded_body(self, scope: Scope, headers: dict[bytes, bytes], receive: Receive,
                            send: Send) -> Receive | None:
        """Read the body up to the limit and replay it; answer 413 and return None when it is larger.

        Content-Length is checked before reading, then the bytes actually received, since a chunked body or
        a client that lies about its length has no trustworthy header. An oversized body is read and thrown
        away (up to a cap) before the 413 goes out, as nginx does: a client still uploading would otherwise
        get a connection reset instead of the answer.
        """
        limit = self.state.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            consumed = int(declared) <= _DISCARD_CAP_BYTES and await _discard_body(receive, _DISCARD_CAP_BYTES)
            await _too_large(limit, consumed)(scope, _no_body, send)
            return None
        if scope["method"] in ("GET", "HEAD", "OPTIONS") and declared is None:
            return receive
        chunks: list[bytes] = []
        size = 0
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away before sending its body
            chunk = message.get("body", b"")
            more_body = message.get("more_body", False)
            size += len(chunk)
            if size > limit:
                consumed = not more_body or await _discard_body(receive, _DISCARD_CAP_BYTES - size)
                await _too_large(limit, consumed)(scope, _no_body, send)
                return None
            chunks.append(chunk)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices for streaming responses

        return replay


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
    async def lifespan(app: FastAPI):
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
    app = FastAPI(title="llm-platform serving", version="1.0.0", lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics_api.router)
    app.include_router(openai.router)
    app.add_middleware(RequestMiddleware, state=state)
    return app

