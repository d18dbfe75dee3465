"""Capacity and safety arithmetic: GPU memory, quota, rollout, /dev/shm, startup budget. Pure functions.

Everything here works from stack config alone, before any resource exists, so the failures that otherwise show
only after `pulumi up` (a model that does not fit crash-loops, an HPA that can never reach its maximum, a rollout
that waits forever for a spare GPU, a startup probe that kills a pod still loading weights) stop preview instead.

Per GPU, a replica with tensor-parallel size TP needs
    weights / TP  +  KV cache / TP  +  overhead
where KV cache = 2 (K and V) x layers x kvHeads x headDim x kvBytes x maxContextTokens x maxConcurrentSequences
and overhead = 2 GiB (CUDA context, cuBLAS workspaces, captured graphs) + 5% of the per-GPU weights
(activations of one prefill chunk). It must fit in gpuMemoryGiB x gpuMemoryUtilization.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30
BASE_OVERHEAD_BYTES = 2 * GIB
ACTIVATION_FRACTION = 0.05
WARMUP_SECONDS = 60
"""Process start, CUDA init, warm-up generation and graph capture, on top of reading the weights."""
STARTUP_SAFETY = 1.5
"""The startup probe budget covers the load estimate with this margin (storage is slower when shared)."""

WEIGHT_BYTES = {"bfloat16": 2.0, "float16": 2.0, "float8": 1.0, "int4": 0.5}
KV_BYTES = {"bfloat16": 2.0, "float16": 2.0, "float8": 1.0, "int4": 2.0}
"""int4 is weight-only quantization (AWQ/GPTQ): the KV cache stays 16-bit."""


@dataclass(frozen=True)
class Architecture:
    """The numbers of a model architecture that memory depends on."""

    parameters_billion: float
    layers: int
    kv_heads: int
    head_dim: int
    attention_heads: int | None = None
    """Tensor parallelism must divide this (when known)."""
    max_context_tokens: int | None = None
    """The model's own context limit (when known)."""


PRESETS: dict[str, Architecture] = {
    "llama-3.1-8b": Architecture(8.03, 32, 8, 128, 32, 131072),
    "llama-3.1-70b": Architecture(70.6, 80, 8, 128, 64, 131072),
    "llama-3.1-405b": Architecture(405.9, 126, 8, 128, 128, 131072),
    "llama-3.2-1b": Architecture(1.24, 16, 8, 64, 32, 131072),
    "llama-3.2-3b": Architecture(3.21, 28, 8, 128, 24, 131072),
    "qwen2.5-7b": Architecture(7.62, 28, 4, 128, 28, 32768),
    "qwen2.5-72b": Architecture(72.7, 80, 8, 128, 64, 32768),
    "mistral-7b": Architecture(7.25, 32, 8, 128, 32, 32768),
}


@dataclass(frozen=True)
class Sizing:
    arch: Architecture
    dtype: str
    max_context_tokens: int
    max_concurrent_sequences: int
    kv_cache_dtype: str | None = None
    """The engine's KV-cache dtype (vLLM `--kv-cache-dtype`): fp8* is 1 byte, auto 2 (16-bit activations);
    unset: as the weight dtype implies (KV_BYTES)."""


def weight_bytes(s: Sizing) -> float:
    return round(s.arch.parameters_billion * 1e9) * WEIGHT_BYTES[s.dtype]


def kv_bytes_per_token(s: Sizing) -> float:
    """K and V for one token across all layers."""
    return 2 * s.arch.layers * s.arch.kv_heads * s.arch.head_dim * kv_value_bytes(s)


def kv_value_bytes(s: Sizing) -> float:
    if s.kv_cache_dtype is None:
        return KV_BYTES[s.dtype]
    return 1.0 if s.kv_cache_dtype.startswith("fp8") else 2.0


def kv_cache_bytes(s: Sizing) -> float:
    return kv_bytes_per_token(s) * s.max_context_tokens * s.max_concurrent_sequences


def overhead_bytes(s: Sizing, tp: int) -> float:
    return BASE_OVERHEAD_BYTES + ACTIVATION_FRACTION * weight_bytes(s) / tp


def per_gpu_bytes(s: Sizing, tp: int) -> float:
    return weight_bytes(s) / tp + kv_cache_bytes(s) / tp + overhead_bytes(s, tp)


def usable_bytes(gpu_memory_gib: float, utilization: float) -> float:
    return gpu_memory_gib * GIB * utilization


def kv_budget_bytes(s: Sizing, tp: int, usable: float) -> float:
    """What is left per GPU for the KV cache once weights and overhead are placed."""
    return usable - weight_bytes(s) / tp - overhead_bytes(s, tp)


def max_sequences_that_fit(s: Sizing, tp: int, usable: float) -> int:
    """Largest maxConcurrentSequences at this context length (0 when even one does not fit)."""
    per_seq = kv_bytes_per_token(s) * s.max_context_tokens / tp
    return max(0, math.floor(kv_budget_bytes(s, tp, usable) / per_seq))


def kv_blocks(s: Sizing, tp: int, usable: float, block_size: int) -> int:
    """Blocks of `block_size` tokens the paged KV cache holds per GPU in what weights and overhead leave."""
    per_block = kv_bytes_per_token(s) * block_size / tp
    return max(0, math.floor(kv_budget_bytes(s, tp, usable) / per_block))


def sequences_in_blocks(blocks: int, tokens: int, block_size: int) -> int:
    """Sequences of `tokens` tokens (prompt plus output) that `blocks` blocks hold, each in whole blocks of its own."""
    return blocks // math.ceil(tokens / block_size)


def max_context_that_fits(s: Sizing, tp: int, usable: float) -> int:
    """Largest maxContextTokens at this many concurrent sequences (0 when none fits)."""
    per_token = kv_bytes_per_token(s) * s.max_concurrent_sequences / tp
    return max(0, math.floor(kv_budget_bytes(s, tp, usable) / per_token))


def valid_tp_sizes(arch: Architecture, limit: int) -> list[int]:
    """Tensor-parallel sizes to consider: powers of two up to `limit` that divide the attention heads."""
    sizes, tp = [], 1
    while tp <= limit:
        if arch.attention_heads is None or arch.attention_heads % tp == 0:
            sizes.append(tp)
        tp *= 2
    return sizes


def smallest_tp_that_fits(s: Sizing, usable: float, limit: int) -> int | None:
    for tp in valid_tp_sizes(s.arch, limit):
        if per_gpu_bytes(s, tp) <= usable:
            return tp
    return None


MAX_NODES_PER_REPLICA = 8
"""Largest multi-node group the plan suggests (pipeline parallel across nodes)."""


def smallest_layout_that_fits(s: Sizing, usable: float, gpus_per_node: int | None) -> tuple[int, int] | None:
    """(GPUs per pod, nodes) of the smallest layout whose per-GPU memory fits: tensor parallel inside one node
    first, then whole nodes (tensor parallel = the node's GPUs, pipeline parallel across nodes)."""
    per_node = gpus_per_node or 8
    tp = smallest_tp_that_fits(s, usable, per_node)
    if tp is not None:
        return tp, 1
    if gpus_per_node is None or (s.arch.attention_heads and s.arch.attention_heads % per_node):
        return None
    for nodes in range(2, MAX_NODES_PER_REPLICA + 1):
        if nodes <= s.arch.layers and per_gpu_bytes(s, per_node * nodes) <= usable:
            return per_node, nodes
    return None


def load_seconds(s: Sizing, storage_read_mbps: float) -> float:
    """Estimated time from container start to ready: reading every weight byte, plus warm-up."""
    return weight_bytes(s) / (storage_read_mbps * 1e6) + WARMUP_SECONDS


def startup_failure_threshold(needed_seconds: float, period_seconds: int, floor: int) -> int:
    """Failures the startup probe may count so that it covers `needed_seconds` with the safety margin."""
    return max(floor, math.ceil(needed_seconds * STARTUP_SAFETY / period_seconds))


def shm_bytes(gpus: int) -> int:
    """Default /dev/shm for tensor-parallel pods: NCCL and the workers exchange through it; 64 MB crashes."""
    return min(16, 2 * gpus) * GIB if gpus > 1 else 0


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"
