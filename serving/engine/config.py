"""Engine settings: one frozen dataclass, validated on construction, defaults in one place.

The server builds an `EngineConfig` from its own settings (env, CLI) and hands it to
`LLMEngine.from_model_dir`; nothing in the engine reads the environment itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from serving.engine.block_manager import BLOCK_SIZES, DEFAULT_BLOCK_SIZE

Attention = Literal["auto", "triton", "flash", "sdpa"]
ATTENTION_CHOICES: tuple[Attention, ...] = ("auto", "triton", "flash", "sdpa")
Device = Literal["auto", "cuda", "cpu"]
DType = Literal["auto", "bfloat16", "float16", "float32"]

# How long a thread holding the GIL runs before one waiting for it gets it (Python's default: 5 ms). The engine
# thread needs the GIL briefly between device steps, so a short interval keeps other threads (the HTTP event loop,
# the pipe to it) from stretching every step (see docs/BENCHMARKS.md).
GIL_SWITCH_INTERVAL_S = 0.0005

DEFAULT_MAX_NUM_SEQS_GPU = 64
DEFAULT_MAX_NUM_SEQS_CPU = 8


@dataclass(frozen=True)
class EngineConfig:
    """How the engine uses its device. Every field has a production default."""

    device: Device = "auto"
    """`auto` picks CUDA when available and otherwise falls back to CPU (with a warning); `cuda` fails
    when no GPU is visible; `cpu` is for tests and development."""
    dtype: DType = "auto"
    """Weights, activations and KV cache. `auto` is bfloat16 on CUDA and float32 on CPU (CPU half-precision
    matmuls are slow and poorly supported)."""
    max_num_seqs: int | None = None
    """Rows: the most requests that run (prefill or decode) together. None picks 64 on a GPU and 8 on CPU.
    The KV cache holds at most max_num_seqs x max_model_len tokens, in blocks; when the memory budget holds fewer,
    requests are admitted as their blocks fit (short requests still fill every row), a default max_model_len is
    shortened to what the budget holds if need be (not below 4096), and the result is logged."""
    max_model_len: int | None = None
    """Prompt plus generated tokens per request. None takes the model's `max_position_embeddings`
    (the sliding window, if the model uses one), lowered to what the KV cache can hold for every slot."""
    max_waiting: int = 256
    """Requests queued for a free slot; one more raises QueueFullError (the server answers 429)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the device's memory the engine may use for weights, activations and KV cache together.
    On CPU the same fraction of the available RAM bounds the KV cache."""
    max_prefill_tokens_per_step: int = 2048
    """Chunked-prefill budget: prompt tokens processed per engine step, so a long prompt delays running
    streams by at most one chunk's compute per decode step."""
    cuda_graphs: bool = True
    """On a GPU, capture the decode step as CUDA graphs (one per batch-size and KV-length bucket) when the
    engine loads, and replay them: small batches stop paying Python and launch overhead per step. Capture
    takes seconds and some memory (the largest step's activations, counted in the KV-cache budget); if it
    fails, decoding stays eager and the reason is logged. Ignored on CPU."""
    overlap: bool | None = None
    """Overlap the engine thread's work with the device: a step is launched before the previous one's greedy tokens
    are read back (fed with them on the device, as new prompts' first tokens are), and a step's outputs are sent
    while the next step runs.
    None: on CUDA, where the device runs asynchronously; on CPU every step runs to completion when launched, so
    overlapping would only hold each output back by a step. Off is the way back to one step at a time."""
    attention: Attention = "auto"
    """How attention reads the KV cache (`serving.engine.attention`). `triton`: decode by our Triton kernel, which
    reads each sequence's blocks in place up to its length, prefill by flash (CUDA, float16/bfloat16, compute
    capability 8.0+); `flash`: the flash kernel's variable-length form for both, decode over the rows' blocks
    gathered into one copy first; `sdpa`: PyTorch's scaled_dot_product_attention over the batch's KV-length bucket,
    gathered the same way (any device). `auto` takes triton where it applies and agrees with SDPA on a check run at
    load, else flash on the same terms, otherwise SDPA; if decode graphs cannot be captured with the chosen one, it
    captures them with SDPA. An explicit `triton` or `flash` that cannot be used fails the load, saying why."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Tokens per KV-cache block: the unit requests are given cache in, and that the prefix cache reuses (only
    full blocks are shared). A power of two up to 256."""
    num_kv_blocks: int | None = None
    """The KV pool's size in blocks, instead of what the memory budget gives (tests and benchmarks compare layouts
    at the same KV memory with it). It must hold one sequence of max_model_len."""
    enable_prefix_caching: bool = True
    """Keep the K/V of full blocks after their request ends, named by their tokens and prefix, and let a new request
    whose prompt starts the same reuse them instead of prefilling them again (least recently used evicted first).
    Outputs are the same either way."""
    warmup_tokens: int = 8
    """Length of the warm-up request's prompt and of its output, run by `start()` before the engine reports
    ready (first-call allocations and kernel selection happen then, not on a client's request). 0 skips it."""

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device: {self.device!r} is not one of 'auto', 'cuda', 'cpu'")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype: {self.dtype!r} is not one of 'auto', 'bfloat16', 'float16', 'float32'")
        _require_positive("max_num_seqs", self.max_num_seqs, allow_none=True)
        _require_positive("max_model_len", self.max_model_len, allow_none=True)
        _require_positive("max_waiting", self.max_waiting)
        _require_positive("num_kv_blocks", self.num_kv_blocks, allow_none=True)
        _require_positive("max_prefill_tokens_per_step", self.max_prefill_tokens_per_step)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization: {self.gpu_memory_utilization} must be in (0, 1]")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention: {self.attention!r} is not one of "
                             f"{', '.join(repr(choice) for choice in ATTENTION_CHOICES)}")
        if self.overlap not in (None, True, False):
            raise ValueError(f"overlap: {self.overlap!r} must be true, false or unset (auto)")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs: {self.cuda_graphs!r} must be true or false")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size: {self.block_size!r} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching: {self.enable_prefix_caching!r} must be true or false")
        if self.warmup_tokens < 0:
            raise ValueError(f"warmup_tokens: {self.warmup_tokens} must be 0 (no warm-up) or more")


def _require_positive(name: str, value: int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: {value!r} must be a positive integer")
