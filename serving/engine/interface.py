"""The engine's one narrow interface: the HTTP layer talks to the engine only through these types.

The HTTP layer never touches tensors; the engine never sees HTTP. A request goes in as token ids with
sampling parameters and comes back as an async stream of `TokenOutput`s; stopping that stream early
(the consumer closes it, or its task is cancelled) aborts the request and frees its slot.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Literal, NamedTuple, Protocol

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. Validated by the HTTP layer before it reaches the engine."""

    max_tokens: int
    """Upper bound on generated tokens (the `length` finish reason)."""
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    seed: int | None = None
    """Per-request generator seed: the same seed and prompt give the same tokens."""
    min_tokens: int = 0
    """End-of-sequence tokens are suppressed until this many tokens were generated."""
    ignore_eos: bool = False
    """Never stop on end-of-sequence tokens (benchmarks force exact output lengths this way)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation with finish reason `stop` (besides the model's EOS ids)."""


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams


class TokenOutput(NamedTuple):
    """New tokens for one request since its previous output; the last one carries `finish_reason`.

    The token that ends a sequence with `stop` (an EOS id or one of `stop_token_ids`) is not included, so
    the outputs concatenate to exactly the completion's tokens; the last output may have no tokens.
    A named tuple: the engine builds one per running request per step (a frozen dataclass costs 1.6x as much)."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and health; cheap to take from any thread."""

    waiting: int
    """Requests admitted but not yet running (queued for a free slot)."""
    running: int
    """Requests holding a slot (prefilling or decoding)."""
    max_running: int
    """Slot count: the most requests that decode together."""
    kv_cache_usage: float
    """Fraction (0..1) of the KV cache's blocks held by running requests."""
    kv_cache_capacity_tokens: int
    prompt_tokens_total: int
    generation_tokens_total: int
    loop_alive: bool
    """False once the engine loop thread has died (liveness fails)."""
    device: str
    """`cuda:0` or `cpu`."""
    prefix_cache_queried_tokens_total: int = 0
    """Prompt tokens looked up in the prefix cache when their requests were admitted."""
    prefix_cache_hit_tokens_total: int = 0
    """Of those, tokens found cached (not prefilled again)."""
    preemptions_total: int = 0
    """Requests preempted (to be recomputed) because KV blocks ran out."""
    attention: str = ""
    """How the engine reads its KV cache: `triton`, `flash` or `sdpa` (`serving.engine.attention`; the load log says
    why it is not the first of these); empty for an engine without one."""
    kv_block_size: int = 0
    """Tokens per KV-cache block (0: no paged cache)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the HTTP layer needs to know about the loaded model."""

    max_model_len: int
    """Prompt plus generated tokens must fit in this many positions."""
    vocab_size: int
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    dtype: str = "float32"
    device: str = "cpu"


def check_request(request: GenerationRequest, model_info: ModelInfo) -> None:
    """Raise ValueError, saying what is wrong, for a request this model cannot run (every engine checks this on
    submit, before anything is queued)."""
    prompt, params = request.prompt_token_ids, request.sampling
    max_len, vocab = model_info.max_model_len, model_info.vocab_size
    if not prompt:
        raise ValueError("the prompt is empty; send at least one token")
    if params.max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {params.max_tokens}")
    if len(prompt) + params.max_tokens > max_len:
        raise ValueError(
            f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) is "
            f"{len(prompt) + params.max_tokens} tokens, more than this model's context of {max_len}; "
            "shorten the prompt or lower max_tokens"
        )
    # An out-of-range id would fail inside the embedding on the loop thread and kill the engine.
    for name, ids in (("prompt", prompt), ("stop_token_ids", params.stop_token_ids)):
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"{name} holds token id {bad!r}, outside this model's vocabulary [0, {vocab})")
    if params.temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or more, got {params.temperature}")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.min_tokens < 0:
        raise ValueError(f"min_tokens must be 0 or more, got {params.min_tokens}")


class EngineError(Exception):
    """Base of errors the engine raises to its caller."""


class QueueFullError(EngineError):
    """The waiting queue is at its limit: the HTTP layer answers 429 with Retry-After."""


class EngineDeadError(EngineError):
    """The engine loop has died: the HTTP layer answers 503 and liveness fails."""


class ModelLoadError(EngineError):
    """The model directory is unusable; the message says what is wrong and what to do."""


class Engine(Protocol):
    """What every engine implements (the real one, and test doubles)."""

    model_info: ModelInfo
    tokenizer: object
    """A `transformers` tokenizer (encode/decode, chat template)."""

    async def start(self) -> None:
        """Start the engine loop and run one warm-up generation; returns when ready to serve."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenOutput]:
        """Submit a request and stream its tokens. Raises ValueError for an invalid request (empty prompt, a token
        id outside the vocabulary, prompt plus max_tokens over the context), QueueFullError or EngineDeadError on
        submit. Closing the iterator early aborts the request and frees its slot."""

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op when unknown or finished)."""

    def stats(self) -> EngineStats:
        ...

    async def shutdown(self) -> None:
        """Abort everything still running and stop the loop."""
