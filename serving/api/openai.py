"""The OpenAI-compatible API: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (JSON or SSE stream).

The API key was checked before the body was read (`serving.app`). A request is validated (400 naming the field),
checked against the served model name (404), tokenized off the event loop (`serving.api.prompts`: the chat
template for chat, control tokens in message text refused), checked against the context window (400 with the
numbers), and submitted to the engine, which answers 429 when its queue is full. Tokens stream back through the
incremental detokenizer, which also cuts at stop strings. However a generation ends (finished, stop string, client
gone, drain deadline, error), its engine stream is closed, which aborts the engine request and frees its slot.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

from serving.api.prompts import Prompts
from serving.detokenizer import IncrementalDetokenizer
from serving.disconnect import DisconnectWatch
from serving.engine.interface import (
    Engine,
    EngineDeadError,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
)
from serving.errors import CLIENT_CLOSED_REQUEST, APIError, bad_request, error_body, validation_error
from serving.json_body import JsonBodyError
from serving.json_body import parse_json_object as json_body_object
from serving.protocol import (
    BaseGenerationRequest,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    FinishReason,
    ModelCard,
    ModelList,
    Usage,
)
from serving.state import API_KEY_NAME, InflightGeneration, ServerState

logger = logging.getLogger("serving.api")

RequestT = TypeVar("RequestT", bound=BaseGenerationRequest)
# How long a client refused with 429 should wait: a slot frees within a few decode steps of any finish.
RETRY_AFTER_SECONDS = "1"


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def require_api_key(request: Request) -> None:
    """When keys are configured, every /v1 call needs `Authorization: Bearer <key>`. The request middleware checks it,
    before reading the body; this refuses a request it did not pass, should the router ever be served without it."""
    state = _state(request)
    if state.keys.enabled and request.scope.get("state", {}).get(API_KEY_NAME) is None:
        raise APIError(401, "Missing API key: send it as 'Authorization: Bearer <key>'", code="invalid_api_key")


router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])


def json_body(model: type[RequestT]) -> Callable[[Request], Awaitable[RequestT]]:
    """Parse and validate the body ourselves: clear 400s whatever the Content-Type, and 404 for a wrong model."""

    def validate(raw: bytes) -> RequestT:
        data = parse_json_object(raw)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None

    async def parse(request: Request) -> RequestT:
        raw = await request.body()
        if len(raw) > _PARSE_ON_LOOP_BYTES:
            # Parsing a large body takes milliseconds (5 per MiB): on a tokenizer thread, so that a stream of large
            # requests cannot queue the probes and the streams behind it on the event loop.
            body = await asyncio.get_running_loop().run_in_executor(_state(request).tokenizer_pool, validate, raw)
        else:
            body = validate(raw)
        unsupported = body.unsupported_parameter()
        if unsupported is not None:
            raise bad_request(unsupported[1], param=unsupported[0], code="unsupported_parameter")
        served = _state(request).settings.model_name
        if body.model != served:
            raise APIError(404, f"The model {body.model!r} does not exist; this server serves {served!r}",
                           param="model", code="model_not_found")
        return body

    return parse


# Bodies up to this size are parsed on the event loop: less than the cost of handing them to a thread.
_PARSE_ON_LOOP_BYTES = 64 * 1024
def parse_json_object(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 (`serving.json_body`: hostile bodies are client errors, not 500s)."""
    try:
        return json_body_object(raw)
    except JsonBodyError as exc:
        raise bad_request(str(exc), param=exc.param, code="invalid_json") from None


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    state = _state(request)
    engine = state.require_engine()
    return ModelList(data=[ModelCard(id=state.settings.model_name, created=state.started_at,
                                     max_model_len=engine.model_info.max_model_len)])


@router.post("/completions")
async def create_completion(request: Request,
                            body: CompletionRequest = Depends(json_body(CompletionRequest))) -> Response:
    arrived = time.perf_counter()
    state = _state(request)
    engine = state.require_engine()
    if isinstance(body.prompt, str):
        prompt_ids = await _prompts(state, engine).completion(body.prompt)
    else:
        prompt_ids = list(body.prompt)
    generation = _Generation.submit(state, engine, f"cmpl-{uuid.uuid4().hex}", prompt_ids, body, "prompt", arrived)
    if body.stream:
        return _sse(generation, _Chunks(generation, body, state.settings.model_name, "text_completion",
                                        lambda text: {"text": text}, last={"text": ""}))
    text = await _collect_unless_disconnected(request, generation)
    return JSONResponse(CompletionResponse(
        id=generation.request_id, model=state.settings.model_name,
        choices=[CompletionChoice(text=text, finish_reason=generation.finish_reason)],
        usage=generation.usage(),
    ).model_dump())


@router.post("/chat/completions")
async def create_chat_completion(request: Request,
                                 body: ChatCompletionRequest = Depends(json_body(ChatCompletionRequest))) -> Response:
    arrived = time.perf_counter()
    state = _state(request)
    engine = state.require_engine()
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    prompt_ids = await _prompts(state, engine).chat(messages)
    generation = _Generation.submit(state, engine, f"chatcmpl-{uuid.uuid4().hex}", prompt_ids, body, "messages",
                                    arrived)
    if body.stream:
        return _sse(generation, _Chunks(generation, body, state.settings.model_name, "chat.completion.chunk",
                                        lambda text: {"delta": {"content": text}}, last={"delta": {}},
                                        first={"delta": {"role": "assistant", "content": ""}}))
    text = await _collect_unless_disconnected(request, generation)
    return JSONResponse(ChatCompletionResponse(
        id=generation.request_id, model=state.settings.model_name,
        choices=[ChatChoice(message=ChatMessageOut(content=text), finish_reason=generation.finish_reason)],
        usage=generation.usage(),
    ).model_dump())


def _prompts(state: ServerState, engine: Engine) -> Prompts:
    """The prompt preparer of this engine (made on first use: it scans the vocabulary, on a tokenizer thread)."""
    prompts = state.prompts
    if prompts is None or prompts.tokenizer is not engine.tokenizer:
        prompts = state.prompts = Prompts(engine.tokenizer, engine.model_info.max_model_len, state.tokenizer_pool)
    return prompts


class _Generation:
    """One engine request from submission to release: text deltas, finish reason, token counts, metrics."""

    def __init__(self, state: ServerState, engine: Engine, request_id: str, prompt_ids: list[int],
                 stream: AsyncIterator, stop: list[str], arrived: float, inflight: InflightGeneration) -> None:
        self.state = state
        self.engine = engine
        self.request_id = request_id
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self._stream = stream
        self._detokenizer = IncrementalDetokenizer(engine.tokenizer, prompt_ids, stop)
        self._arrived = arrived
        self._inflight = inflight
        self._released = False

    @classmethod
    def submit(cls, state: ServerState, engine: Engine, request_id: str, prompt_ids: list[int],
               body: BaseGenerationRequest, prompt_param: str, arrived: float) -> "_Generation":
        """Check the context window, submit to the engine, and map its refusals to HTTP errors."""
        window = engine.model_info.max_model_len
        if not prompt_ids:
            raise bad_request("The prompt is empty; send at least one token", param=prompt_param)
        requested = body.requested_max_tokens()
        if len(prompt_ids) >= window or (requested is not None and len(prompt_ids) + requested > window):
            asked = f"{requested} for max_tokens" if requested is not None else "at least 1 for the completion"
            raise bad_request(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{len(prompt_ids) + (requested or 1)} tokens ({len(prompt_ids)} in the prompt, {asked}). "
                "Please reduce the length of the prompt or max_tokens.",
                param="max_tokens" if requested is not None and len(prompt_ids) < window else prompt_param,
                code="context_length_exceeded")
        max_tokens = requested if requested is not None else window - len(prompt_ids)
        if body.min_tokens > max_tokens:
            raise bad_request(f"min_tokens ({body.min_tokens}) is larger than max_tokens ({max_tokens}); lower "
                              "min_tokens", param="min_tokens")
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos,
        )
        try:
            stream = engine.generate(GenerationRequest(request_id, tuple(prompt_ids), sampling))
        except QueueFullError as exc:
            raise APIError(429, f"The server is at capacity ({exc}); retry after {RETRY_AFTER_SECONDS}s",
                           code="queue_full", headers={"Retry-After": RETRY_AFTER_SECONDS}) from exc
        except EngineDeadError as exc:
            raise APIError(503, f"Service unavailable: {exc}", code="engine_dead") from exc
        except ValueError as exc:  # the engine's own request validation (e.g. a token id outside the vocabulary)
            raise bad_request(f"Invalid request: {exc}", param=prompt_param) from exc
        return cls(state, engine, request_id, prompt_ids, stream, body.stop, arrived, state.track(request_id))

    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.completion_tokens)

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas as they become safe to send; afterwards `finish_reason` is "stop" or "length"."""
        metrics = self.state.metrics
        last_token_at: float | None = None
        try:
            async for output in self._stream:
                if output.token_ids:
                    now = time.perf_counter()
                    count = len(output.token_ids)
                    if last_token_at is None:
                        metrics.ttft.observe(now - self._arrived)
                        # Tokens that came with the first one followed it with no gap: every token after the
                        # first is one inter-token observation, however the outputs were merged.
                        for _ in range(count - 1):
                            metrics.itl.observe(0.0)
                    else:
                        # Several tokens in one output arrived together: spread the gap so the
                        # histogram's mean stays the mean time per token.
                        for _ in range(count):
                            metrics.itl.observe((now - last_token_at) / count)
                    last_token_at = now
                    self.completion_tokens += count
                text = self._detokenizer.add(output.token_ids)
                if not self._detokenizer.stopped and output.finish_reason is not None:
                    if output.finish_reason == "abort":
                        raise self._aborted()
                    text += self._detokenizer.finish()
                    self.finish_reason = "stop" if self._detokenizer.stopped else output.finish_reason
                if self._detokenizer.stopped:
                    self.finish_reason = "stop"
                if text:
                    yield text
                if self.finish_reason is not None:
                    return
            raise self._aborted()  # the stream ended without a finish reason
        except EngineDeadError as exc:
            raise APIError(503, f"Service unavailable: {exc}", code="engine_dead") from exc
        finally:
            await self.release()

    def _aborted(self) -> APIError:
        if self._inflight.cut:
            reason = "the server is shutting down and cut this generation at the end of its drain period"
        else:
            reason = "the engine aborted this generation (it is shutting down)"
        return APIError(503, f"Service unavailable: {reason}; retry the request", code="aborted")

    async def release(self) -> None:
        """Close the engine stream (aborting the request unless it finished) and forget it. Idempotent."""
        if self._released:
            return
        self._released = True
        self.state.untrack(self.request_id)
        close = getattr(self._stream, "aclose", None)
        if close is None:
            self.engine.abort(self.request_id)
            return
        try:
            await close()
        except asyncio.CancelledError:  # cancelled again while closing (client gone, server stopping)
            self.engine.abort(self.request_id)  # the abort must still happen
            raise


async def _collect_unless_disconnected(request: Request, generation: _Generation) -> str:
    """Run a non-streaming generation, aborting it if the client disconnects before it is done."""
    watch = DisconnectWatch(request.receive)
    try:
        return await _join(generation.deltas())
    except asyncio.CancelledError:
        if not watch.client_left():
            raise  # cancelled by the server itself (too), not only by the client leaving
        raise APIError(CLIENT_CLOSED_REQUEST, "Client closed the request", code="client_closed_request") from None
    finally:
        watch.stop()
        await generation.release()


async def _join(deltas: AsyncIterator[str]) -> str:
    return "".join([delta async for delta in deltas])


def _sse(generation: _Generation, chunks: "_Chunks") -> StreamingResponse:
    """Stream the generation's JSON chunks as server-sent events, ending with `data: [DONE]`."""
    async def events() -> AsyncIterator[str]:
        try:
            for chunk in chunks.first():
                yield f"data: {chunk}\n\n"
            async for delta in generation.deltas():
                yield chunks.event(delta)
            for chunk in chunks.last():
                yield f"data: {chunk}\n\n"
        except APIError as exc:
            # The 200 and earlier chunks are already sent: the error goes in the stream, as OpenAI does.
            yield f"data: {json.dumps(error_body(exc.status_code, exc.message, exc.param, exc.code))}\n\n"
        except Exception:
            logger.exception("generation failed mid-stream", extra={"engine_request_id": generation.request_id})
            body = error_body(500, "Internal server error; it was logged", code="internal_error")
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    # The background task runs even when the client leaves before the first chunk (the generator then
    # never starts, and its own cleanup would not run).
    return _EventStream(events(), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                        background=BackgroundTask(generation.release))


class _EventStream(StreamingResponse):
    """A StreamingResponse that notices the client leaving through one plain asyncio task.

    Under an ASGI server older than spec 2.4 (uvicorn declares 2.3), Starlette streams from a child task of an anyio
    task group and listens for the disconnect in the parent: a task group, a cancel scope and a task per request,
    14% of the HTTP process's CPU per request as measured (docs/BENCHMARKS.md). Here the response streams in the
    request's own task and a watcher task cancels it when the client leaves, which ends the stream the same way:
    the generation's `finally` aborts its engine request, and the background task still runs."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec_version = scope.get("asgi", {}).get("spec_version", "2.0")
        if tuple(map(int, spec_version.split("."))) >= (2, 4):  # the server reports the disconnect through send
            await super().__call__(scope, receive, send)
            return
        watch = DisconnectWatch(receive)
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not watch.client_left():
                raise  # cancelled by the server itself (too), not only by the client leaving
        finally:
            watch.stop()  # before the background task, which a late cancellation would otherwise hit
        if self.background is not None:
            await self.background()


class _Chunks:
    """The JSON chunks of one streamed response, which share an envelope (id, object, created, model, usage): `first`
    (chat's role chunk), one per text delta, then `last`.

    A text delta is the only part of most chunks that changes, so its chunk is rendered once with a placeholder and
    each delta is spliced in, JSON-escaped: the same bytes as encoding the whole chunk, at a fraction of the cost
    (see docs/BENCHMARKS.md, HTTP layer)."""

    _PLACEHOLDER = "\u0000delta\u0000"

    def __init__(self, generation: _Generation, body: BaseGenerationRequest, model: str, object_name: str,
                 delta_fields: Callable[[str], dict], last: dict, first: dict | None = None) -> None:
        self._generation = generation
        self._include_usage = body.include_usage
        self._fixed = {"id": generation.request_id, "object": object_name, "created": int(time.time()),
                       "model": model}
        self._delta_fields = delta_fields
        self._first_fields = first
        self._last_fields = last
        template = _json(self.choice(delta_fields(self._PLACEHOLDER), None))
        parts = template.split(_json(self._PLACEHOLDER))
        self._around_delta = (parts[0], parts[1]) if len(parts) == 2 else None
        self._around_event = ("data: " + parts[0], parts[1] + "\n\n") if len(parts) == 2 else None

    def first(self) -> list[str]:
        return [] if self._first_fields is None else [_json(self.choice(self._first_fields, None))]

    def delta(self, text: str) -> str:
        """The chunk carrying one text delta."""
        if self._around_delta is None:  # the placeholder also occurs elsewhere (say, in the model name)
            return _json(self.choice(self._delta_fields(text), None))
        before, after = self._around_delta
        return before + _json_string(text) + after

    def event(self, text: str) -> str:
        """The server-sent event of `delta(text)`."""
        if self._around_event is None:
            return f"data: {self.delta(text)}\n\n"
        before, after = self._around_event
        return before + _json_string(text) + after

    def last(self) -> list[str]:
        """The chunk with the finish reason, then the usage chunk when the client asked for one."""
        chunks = [_json(self.choice(self._last_fields, self._generation.finish_reason))]
        if self._include_usage:
            # With include_usage, OpenAI sends "usage": null on every chunk and the totals on one last chunk.
            chunks.append(_json({**self._fixed, "choices": [], "usage": self._generation.usage().model_dump()}))
        return chunks

    def choice(self, fields: dict, finish_reason: str | None) -> dict:
        choice = {"index": 0, **fields, "logprobs": None, "finish_reason": finish_reason}
        return {**self._fixed, "choices": [choice], **({"usage": None} if self._include_usage else {})}


# json.dumps(value, ensure_ascii=False) builds a new encoder on every call; these are made once. `_json_string` is
# the encoder's own C escaping of one string, quotes included.
_json = json.JSONEncoder(ensure_ascii=False).encode
_json_string = json.encoder.encode_basestring
