"""The gateway's front: a plain ASGI app (no framework between a streamed token and the socket) serving
`/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/health/live`, `/health/ready` and `/metrics`.

An API request is checked in the order that costs least: its key (401), the key's limits (429), its body's size
(413), JSON and `model` (400, or 404 naming the models that exist); then its model's pool gives it a pod (or it
waits: 503 while the model stays at zero, 429 when the queue is full) and the proxy streams the answer back.
Every API request gets a request id (a valid incoming `X-Request-ID`, else a new one; echoed to the client and
sent to the pod, so the two log lines meet), is counted in `llm_gateway_requests_total`, and writes one access
log line naming its key by name. A client that leaves cancels the request's task, which cancels the upstream call.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Message, Receive, Scope, Send

from serving.api_keys import ApiKey, KeyRing
from serving.disconnect import DisconnectWatch
from serving.errors import CLIENT_CLOSED_REQUEST
from serving.gateway.config import GatewayConfig
from serving.gateway.discovery import Discovery
from serving.gateway.errors import GatewayError
from serving.gateway.limits import KeyLimiter, retry_after
from serving.gateway.metrics import ANONYMOUS, NO_MODEL, UNKNOWN_MODEL, GatewayMetrics
from serving.gateway.pool import ModelPool, NoPodReady, QueueFull, QueueTimeout, ShuttingDown
from serving.gateway.proxy import Outcome, Proxy
from serving.gateway.upstream import Upstreams
from serving.json_body import JsonBodyError, parse_json_object
from serving.logs import request_id_var

logger = logging.getLogger("serving.gateway")
access_logger = logging.getLogger("serving.gateway.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
# Oversized bodies up to this size are read and dropped so the client sees the 413, as the server does.
_DISCARD_CAP_BYTES = 16 * 1024 * 1024
# A request that waited out a cold start: the model is still loading; a queue that is full frees within seconds.
COLD_START_RETRY_AFTER_SECONDS = 30
QUEUE_RETRY_AFTER_SECONDS = 1
# The headers a pod needs; the rest (cookies, hop-by-hop) stay at the gateway.
_FORWARDED_HEADERS = frozenset((b"authorization", b"accept"))


# Idle connections to pods are let go before the model server's own keep-alive timeout (uvicorn's 5 s): reusing one
# the server is closing at that moment would fail the request's first attempt.
UPSTREAM_KEEPALIVE_SECONDS = 4.0
UPSTREAM_CONNECT_TIMEOUT_SECONDS = 5.0


def upstream_clients() -> tuple[Upstreams, httpx.AsyncClient]:
    """The pods' connection pools for requests (serving.gateway.upstream: no read timeout, a stream may pause for a
    long prefill or a full pod queue, and a client that gives up cancels it; connections are bounded by the pools'
    per-pod limits), and an httpx client for the once-a-second readiness probes of static routes. One TLS context
    serves both (loading the CA bundle takes tens of milliseconds)."""
    tls = httpx.create_ssl_context()
    upstreams = Upstreams(keepalive_expiry=UPSTREAM_KEEPALIVE_SECONDS,
                          connect_timeout=UPSTREAM_CONNECT_TIMEOUT_SECONDS, tls=tls)
    probes = httpx.AsyncClient(timeout=httpx.Timeout(UPSTREAM_CONNECT_TIMEOUT_SECONDS), verify=tls,
                               limits=httpx.Limits(keepalive_expiry=UPSTREAM_KEEPALIVE_SECONDS),
                               trust_env=False)  # pods are reached directly, never through an environment proxy
    return upstreams, probes


class Gateway:
    """The ASGI app and what its requests share: pools, keys, limits, metrics, the upstream connections."""

    def __init__(self, config: GatewayConfig, keys: KeyRing | None = None) -> None:
        self.config = config
        self.keys = keys if keys is not None else KeyRing(config.api_keys_file, config.api_key)
        self.metrics = GatewayMetrics([route.model for route in config.routes])
        self.pools = {route.model: ModelPool(route, self.metrics, config.load_factor) for route in config.routes}
        self.limiter = KeyLimiter()
        self.draining = False
        self.started_at = int(time.time())
        self._upstreams: Upstreams | None = None
        self._probes: httpx.AsyncClient | None = None
        self._proxy: Proxy | None = None
        self._discoveries: list[Discovery] = []
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- lifecycle -------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        self._upstreams, self._probes = upstream_clients()
        self._proxy = Proxy(self._upstreams, self.metrics)
        self._discoveries = [Discovery(pool, self._probes, self.config.discovery_seconds)
                             for pool in self.pools.values()]
        for discovery in self._discoveries:
            discovery.start()

    async def shutdown(self) -> None:
        for discovery in self._discoveries:
            await discovery.stop()
        if self._upstreams is not None:
            self._upstreams.close()
        if self._probes is not None:
            await self._probes.aclose()

    async def drain(self, grace_seconds: float) -> None:
        """Readiness goes false; requests in flight (streams, held requests) get up to `grace_seconds` to end."""
        self.draining = True
        logger.info("draining", extra={"event": "drain_started", "active_requests": self._active,
                                       "grace_seconds": grace_seconds})
        try:
            await asyncio.wait_for(self._idle.wait(), grace_seconds)
            logger.info("drained: no requests in flight", extra={"event": "drained"})
        except asyncio.TimeoutError:
            logger.warning("drain period over with requests in flight; waiting ones get 503, streams are closed",
                           extra={"event": "drain_deadline", "active_requests": self._active})
            for pool in self.pools.values():  # uvicorn's own graceful shutdown then lets them send the answer
                pool.close()

    # ---- ASGI ------------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/health/live":
            await _send_json(send, 200, {"status": "alive"})
        elif path == "/health/ready":
            await _send_json(send, 503 if self.draining else 200, {"status": "draining" if self.draining
                                                                   else "ready"})
        elif path == "/metrics":
            await _send_bytes(send, 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST.encode())
        else:
            await self._api(scope, receive, send, path, method)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _api(self, scope: Scope, receive: Receive, send: Send, path: str, method: str) -> None:
        headers = dict(scope["headers"])
        incoming_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming_id if _REQUEST_ID.match(incoming_id) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        outcome = Outcome()
        log = {"model": NO_MODEL, "key": ANONYMOUS}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome.status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        self._active += 1
        self._idle.clear()
        try:
            await self._route(scope, receive, send_with_id, path, method, headers, request_id, outcome, log)
        except GatewayError as exc:
            if outcome.status is None:
                await _send_bytes(send_with_id, exc.status, exc.body(), b"application/json",
                                  [(name.lower().encode(), value.encode()) for name, value in exc.headers.items()])
        except asyncio.CancelledError:
            if outcome.status is None:
                outcome.status = CLIENT_CLOSED_REQUEST
            raise
        except Exception:
            logger.exception("unhandled error", extra={"path": path})
            if outcome.status is None:
                error = GatewayError(500, f"Internal gateway error (request id {request_id}); it was logged",
                                     code="internal_error")
                await _send_bytes(send_with_id, 500, error.body(), b"application/json")
        finally:
            self._finish(method, path, started, outcome, log)
            request_id_var.reset(token)

    def _finish(self, method: str, path: str, started: float, outcome: Outcome, log: dict) -> None:
        status = outcome.status if outcome.status is not None else CLIENT_CLOSED_REQUEST
        model = log["model"]
        self.metrics.requests.labels(model, str(status)).inc()
        if outcome.prompt_tokens or outcome.completion_tokens:
            self.metrics.tokens.labels(log["key"], model, "prompt").inc(outcome.prompt_tokens)
            self.metrics.tokens.labels(log["key"], model, "completion").inc(outcome.completion_tokens)
        self._active -= 1
        if self._active == 0:
            self._idle.set()
        duration = time.perf_counter() - started
        access_logger.info("%s %s %s", method, path, status, extra={
            "method": method, "path": path, "status": status, "duration_ms": round(duration * 1e3, 2),
            "model": model, "key": log["key"], "pod": outcome.pod, "retries": outcome.retries,
            "prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            **({"cut": True} if outcome.cut else {})})

    async def _route(self, scope: Scope, receive: Receive, send: Send, path: str, method: str,
                     headers: dict[bytes, bytes], request_id: str, outcome: Outcome, log: dict) -> None:
        if path == "/v1/models" or path in _GENERATION_PATHS:
            allowed = "GET" if path == "/v1/models" else "POST"
            if method != allowed:
                raise GatewayError(405, f"{path} takes {allowed}, not {method}", code="method_not_allowed")
        else:
            raise GatewayError(404, "Unknown path; this gateway serves /v1/models, /v1/completions and "
                                    "/v1/chat/completions", code="not_found")
        key = self._authenticate(headers)
        log["key"] = key.name if key is not None else ANONYMOUS
        if path == "/v1/models":
            await _send_json(send, 200, {"object": "list", "data": [
                {"id": model, "object": "model", "created": self.started_at, "owned_by": "llm-platform"}
                for model in self.pools]})
            return
        if key is not None:
            wait = self.limiter.admit(key, time.monotonic())
            if wait is not None:
                limit = self.limiter.which_limit(key, time.monotonic())
                raise GatewayError(429, f"Rate limit reached for this key ({limit}); retry after "
                                        f"{retry_after(wait)}s", code="rate_limit_exceeded",
                                   headers={"Retry-After": retry_after(wait)})
        body = await self._read_body(headers, receive)
        if body is None:
            return  # the client left while sending its body
        data = _parse(body)
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "Invalid request: model: a model name (string) is required", param="model",
                               code="invalid_request")
        pool = self.pools.get(model)
        if pool is None:
            log["model"] = UNKNOWN_MODEL
            raise GatewayError(404, f"The model {model!r} does not exist; this endpoint serves "
                                    f"{', '.join(repr(name) for name in self.pools)}",
                               param="model", code="model_not_found")
        log["model"] = model
        strip_usage = False
        if data.get("stream") is True:
            options = data.get("stream_options")
            if options is None or (isinstance(options, dict) and options.get("include_usage") is not True):
                # The pods count tokens; ask for the totals so the key's usage is known, and leave them out again.
                data["stream_options"] = {**(options or {}), "include_usage": True}
                body = json.dumps(data).encode()
                strip_usage = True
        upstream_headers = [(name, value) for name, value in headers.items() if name in _FORWARDED_HEADERS]
        upstream_headers += [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())]
        watch = DisconnectWatch(receive)
        try:
            await self._proxy.forward(pool, path, body, upstream_headers,  # type: ignore[union-attr]
                                      prefix_of(data, self.config.prefix_chars), strip_usage, send, outcome)
        except QueueFull:
            raise GatewayError(429, f"The model {model!r} has {pool.route.max_queue} requests waiting already; "
                                    f"retry after {QUEUE_RETRY_AFTER_SECONDS}s", code="queue_full",
                               headers={"Retry-After": str(QUEUE_RETRY_AFTER_SECONDS)}) from None
        except QueueTimeout:
            raise GatewayError(429, f"Every pod of the model {model!r} stayed full for "
                                    f"{pool.route.cold_start_timeout_seconds:g}s; retry after "
                                    f"{QUEUE_RETRY_AFTER_SECONDS}s", code="queue_full",
                               headers={"Retry-After": str(QUEUE_RETRY_AFTER_SECONDS)}) from None
        except NoPodReady:
            raise GatewayError(503, f"The model {model!r} is starting (no replica became ready within "
                                    f"{pool.route.cold_start_timeout_seconds:g}s); retry after "
                                    f"{COLD_START_RETRY_AFTER_SECONDS}s", code="model_starting",
                               headers={"Retry-After": str(COLD_START_RETRY_AFTER_SECONDS)}) from None
        except ShuttingDown:
            raise GatewayError(503, "The gateway is shutting down; retry the request (another replica takes it)",
                               code="shutting_down", headers={"Retry-After": "1"}) from None
        except asyncio.CancelledError:
            if watch.client_left():
                return  # counted as 499 by the caller; the upstream request was closed on the way out
            raise
        finally:
            watch.stop()
            if key is not None:
                self.limiter.spend_tokens(key, outcome.prompt_tokens + outcome.completion_tokens,
                                          time.monotonic())

    def _authenticate(self, headers: dict[bytes, bytes]) -> ApiKey | None:
        if not self.keys.enabled:
            return None
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GatewayError(401, "Missing API key: send it as 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
        key = self.keys.authenticate(token.strip())
        if key is None:
            raise GatewayError(401, "Incorrect API key provided", code="invalid_api_key")
        return key

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes | None:
        """The body, or None when the client left; a 413 when it is larger than the limit (checked on the
        declared length and on the bytes received, and read to the end first so the client sees the answer)."""
        limit = self.config.max_body_bytes
        declared = headers.get(b"content-length", b"")
        chunks, size, more = [], 0, True
        too_large = declared.isdigit() and int(declared) > limit
        seconds = self.config.body_timeout_seconds
        try:
            # The whole body within the deadline: a client trickling a byte a second would otherwise hold its
            # connection and task for ever.
            async with asyncio.timeout(seconds):
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        too_large = True
                    if not too_large:
                        chunks.append(chunk)
                    elif size > _DISCARD_CAP_BYTES:
                        break
                    more = message.get("more_body", False)
        except TimeoutError:
            raise GatewayError(408, f"The request body did not arrive within {seconds:g} seconds; send it at once",
                               code="request_timeout", headers={"Connection": "close"}) from None
        if too_large:
            raise GatewayError(413, f"Request body is larger than {limit} bytes; send a smaller request",
                               code="request_too_large")
        return b"".join(chunks)


def _parse(body: bytes) -> dict:
    """The body as a JSON object, or a 400 (`serving.json_body`: hostile bodies are client errors, not 500s)."""
    try:
        return parse_json_object(body)
    except JsonBodyError as exc:
        raise GatewayError(400, str(exc), code="invalid_json", param=exc.param) from None


def prefix_of(data: dict, chars: int) -> bytes | None:
    """The request's leading block for prefix affinity: the first `chars` characters of the prompt, or of the
    messages as `role: content` lines; a token-id prompt's first `chars // 4` ids (about as many tokens). None
    when there is nothing to hash (the request is then balanced by load alone)."""
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of prompts (or of token-id lists): the first leads
    text = ""
    if isinstance(prompt, str):
        text = prompt[:chars]
    elif isinstance(prompt, list):
        text = ",".join(str(token) for token in prompt[:max(1, chars // 4)])
    elif isinstance(data.get("messages"), list):
        parts = []
        length = 0
        for message in data["messages"]:
            if length >= chars or not isinstance(message, dict):
                break
            content = message.get("content")
            if isinstance(content, list):  # content parts: their text
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict)
                                  and isinstance(part.get("text"), str))
            line = f"{message.get('role')}: {content if isinstance(content, str) else ''}\n"
            parts.append(line)
            length += len(line)
        text = "".join(parts)[:chars]
    return text.encode("utf-8", "surrogatepass") if text else None


async def _send_json(send: Send, status: int, payload: dict) -> None:
    await _send_bytes(send, status, json.dumps(payload).encode(), b"application/json")


async def _send_bytes(send: Send, status: int, body: bytes, content_type: bytes,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
