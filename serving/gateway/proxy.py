"""One request's trip to a pod and back: a slot from the model's pool, the upstream call (`upstream`: pooled
keep-alive connections, the body streamed), one retry before the first byte, and the response passed through as it
arrives.

- Before the first byte (connection refused or reset, the pod answering 503 because it is draining or still
  loading, or the connection lost before the first body chunk) nothing has reached the client, so the request is
  sent once more: to another ready pod, or, when the model has one pod, to whatever a fresh look at the pods finds
  (the same pod if it is back, else the request waits as in a cold start). A second failure is a 502.
- After the first byte a lost pod cannot be hidden: a stream ends with an OpenAI-shaped error event
  (`data: {"error": ...}`) and `data: [DONE]`, so a client sees why it is incomplete.
- Server-sent events are forwarded one upstream block at a time, never held back. The only event the gateway
  looks into is the one carrying `usage` (the tokens the key used), found by a plain byte search; when the gateway
  asked for it on the client's behalf (`strip_usage`), that event is left out.
- The caller cancels the task when the client leaves; closing the unfinished upstream response then closes its
  connection, and the pod aborts the generation and frees its slot.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from starlette.types import Send

from serving.gateway.errors import GatewayError, error_json
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.pool import ModelPool
from serving.gateway.upstream import UpstreamConnectError, UpstreamError, UpstreamResponse, Upstreams

logger = logging.getLogger("serving.gateway.proxy")

# Response headers a client needs from the pod; hop-by-hop and length headers are the gateway's own.
_PASSED_HEADERS = frozenset((b"content-type", b"cache-control", b"retry-after", b"x-accel-buffering"))
_USAGE_MARKS = (b'"usage": {', b'"usage":{')


@dataclass
class Outcome:
    """What happened, for the access log, the metrics and the key's token bucket."""

    status: int | None = None
    pod: str | None = None
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cut: bool = False
    """The pod was lost mid-stream and the client got the error event."""


class _PodFailed(Exception):
    """The pod failed before the first byte; safe to send the request again."""

    def __init__(self, reason: str, drop: bool) -> None:
        super().__init__(reason)
        self.drop = drop  # the pod refused the connection: out of the ready set until discovery finds it again


class Proxy:
    def __init__(self, upstreams: Upstreams, metrics: GatewayMetrics) -> None:
        self._upstreams = upstreams
        self._metrics = metrics

    async def forward(self, pool: ModelPool, path: str, body: bytes, headers: list[tuple[bytes, bytes]],
                      prefix: bytes | None, strip_usage: bool, send: Send, outcome: Outcome) -> None:
        """Send the request to a pod of `pool` and stream the answer to `send`; GatewayError before any byte."""
        avoid = None
        while True:
            pod = await pool.acquire(prefix, avoid)
            outcome.pod = pod.address
            try:
                await self._exchange(pool.model, pod.url, path, body, headers, strip_usage, send, outcome,
                                     may_retry=not outcome.retries)
                return
            except _PodFailed as failure:
                if failure.drop:
                    pool.drop(pod.url)
                if outcome.retries:
                    raise GatewayError(502, f"The model server failed twice before answering ({failure}); retry "
                                            "the request", code="upstream_failed") from None
                outcome.retries += 1
                self._metrics.retries.labels(pool.model).inc()
                logger.warning("pod failed before its first byte; sending the request again",
                               extra={"event": "retry", "model": pool.model, "pod": pod.address,
                                      "reason": str(failure)})
                avoid = pod.url
            finally:
                pool.release(pod)
            if pool.refresh is not None and len(pool.ready_urls) <= 1:
                await pool.refresh()  # one pod, or none left: look again before choosing

    async def _exchange(self, model: str, pod_url: str, path: str, body: bytes, headers: list[tuple[bytes, bytes]],
                        strip_usage: bool, send: Send, outcome: Outcome, may_retry: bool) -> None:
        started = time.perf_counter()
        try:
            response = await self._upstreams.request(pod_url, "POST", path, headers, body)
        except UpstreamConnectError as exc:  # refused or unreachable: the pod is gone
            raise _PodFailed(str(exc), drop=True) from None
        except UpstreamError as exc:  # a reset on a kept-alive connection may be that connection alone
            raise _PodFailed(str(exc), drop=False) from None
        try:
            if response.status == 503 and may_retry:  # draining or loading: another pod can take it
                raise _PodFailed("the pod answered 503", drop=False)
            streaming = (response.header(b"content-type") or b"").startswith(b"text/event-stream")
            try:
                # A JSON answer's first byte is all of it.
                first = await response.next_block() if streaming else await response.read()
            except UpstreamError as exc:
                raise _PodFailed(str(exc), drop=False) from None
            self._metrics.upstream_latency.labels(model).observe(time.perf_counter() - started)
            passed = [(name, value) for name, value in response.headers if name in _PASSED_HEADERS]
            outcome.status = response.status
            if not streaming:
                if response.status == 200:
                    self._count_usage(first, outcome)
                await send({"type": "http.response.start", "status": response.status,
                            "headers": [*passed, (b"content-length", str(len(first)).encode())]})
                await send({"type": "http.response.body", "body": first})
                return
            await send({"type": "http.response.start", "status": response.status, "headers": passed})
            await self._stream(first, response, _UsageEvents(strip_usage, outcome), send, outcome)
        finally:
            response.close()  # unfinished (client gone, pod lost): closes the connection, the pod aborts

    async def _stream(self, first: bytes, response: UpstreamResponse, usage: "_UsageEvents", send: Send,
                      outcome: Outcome) -> None:
        block = first
        while block:
            forwarded = usage.feed(block)
            if forwarded:
                await send({"type": "http.response.body", "body": forwarded, "more_body": True})
            try:
                block = await response.next_block()
            except UpstreamError as exc:
                outcome.cut = True
                logger.warning("pod lost mid-stream; the client gets an error event",
                               extra={"event": "stream_cut", "pod": outcome.pod, "reason": str(exc)})
                event = error_json(502, f"The model server failed mid-stream ({exc}); the response is "
                                        "incomplete, retry the request", code="upstream_failed")
                tail = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
                await send({"type": "http.response.body", "body": tail, "more_body": True})
                break
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    def _count_usage(body: bytes, outcome: Outcome) -> None:
        try:
            usage = json.loads(body).get("usage") or {}
            outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            outcome.completion_tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, AttributeError, TypeError):
            pass  # not the shape we know: the tokens go uncounted rather than the answer failing


class _UsageEvents:
    """Forwards SSE bytes as they come, reading the one event that carries usage totals.

    Blocks that end on an event boundary and hold no usage object (nearly all of them) pass through as they are.
    Otherwise the block is split into events: a trailing partial event waits for its rest (a client could not use
    half an event either), and the usage event is read, and dropped when the client did not ask for it."""

    def __init__(self, strip: bool, outcome: Outcome) -> None:
        self._strip = strip
        self._outcome = outcome
        self._rest = b""

    def feed(self, block: bytes) -> bytes:
        if not self._rest and block.endswith(b"\n\n") and _USAGE_MARKS[0] not in block and _USAGE_MARKS[1] not in block:
            return block
        events = (self._rest + block).split(b"\n\n")
        self._rest = events.pop()
        kept = [event for event in events if self._keep(event)]
        return b"".join(event + b"\n\n" for event in kept)

    def _keep(self, event: bytes) -> bool:
        if not any(mark in event for mark in _USAGE_MARKS) or not event.startswith(b"data: "):
            return True
        try:
            chunk = json.loads(event[6:])
            usage = chunk["usage"]
            self._outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self._outcome.completion_tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            return True
        # The usage-only chunk (no choices) is the one the gateway added; a chunk with choices is the client's.
        return not (self._strip and not chunk.get("choices"))

