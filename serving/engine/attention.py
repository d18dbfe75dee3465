"""Attention over the engine's KV cache, in two interchangeable implementations behind one small interface.

K and V are token-major ([tokens, kv_heads, head_dim]), the layout flash kernels read. The cache itself is paged
(`serving.engine.model_runner`); the runner gathers each step's K/V through the block tables and hands an
`Attention` the contiguous form: a decode step's [B, kv_len, kv_heads, head_dim] (row b's first `lengths[b]` tokens
valid), a prefill pass's K/V of every chunk up to its end, packed chunk after chunk. The model runner writes K/V; an
`Attention` only reads them.

- `SdpaAttention` (any device, any dtype): `F.scaled_dot_product_attention`. A decode step attends over the
  batch's KV-length bucket under a length mask, so every row reads K/V up to the longest row's bucket; a prefill
  pass runs one attention call per prompt chunk.
- `FlashAttention` (CUDA, float16/bfloat16, compute capability 8.0+): PyTorch's flash kernel in its
  variable-length form with `seqused_k`, each row's own length. A decode step reads only each row's valid K/V
  (no padding waste: at the benchmark's spread of lengths, 1.7x fewer K/V bytes at batch 256), and a prefill pass
  runs every chunk's attention in one kernel call.

In decode both read K/V once per KV head, never once per query head: SDPA with each KV head's query heads folded
into that head's query rows; the flash kernel does the same fold itself for single-token queries of grouped-query
models, and then also splits each sequence's K/V across thread blocks when the batch is too small to fill the GPU
(a model with as many KV heads as query heads gets neither, and needs neither fold).

`select_attention` picks the implementation when the engine loads: `auto` takes flash where the kernel applies and
its results agree with SDPA's on a check run at load (random data of the model's head shape, rows of different
lengths, slots out of order), otherwise SDPA, with the reason logged.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from serving.engine.interface import ModelLoadError
from serving.engine.transfer import to_device

logger = logging.getLogger("serving.engine")

AttentionChoice = Literal["auto", "flash", "sdpa"]

FLASH_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionShape:
    """What an attention implementation needs to know about the model and its cache."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    num_slots: int
    """Decode rows (the largest batch)."""
    max_model_len: int
    """The longest K/V a decode step reads (the context in whole blocks)."""
    device: torch.device

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class ChunkSpan:
    """One prompt chunk of a prefill pass: query rows first..last of the packed pass, positions start..end of its
    sequence (the chunk's own tokens are the last last - first of them), whose K/V (positions 0..end) are rows
    kv_start..kv_start + end of the pass's packed K/V."""

    kv_start: int
    first: int
    last: int
    start: int
    end: int


class Attention(Protocol):
    """Attention over the cache. Plans are built once per step (outside the layer loop) and reused by every
    layer; a decode plan holds only tensors computed on the device, so a decode step can be a CUDA graph."""

    name: str
    shape: AttentionShape

    def decode_plan(self, lengths: torch.Tensor, kv_len: int) -> object:
        """`lengths` int32 [B]: valid cache tokens of row i, including the token just written;
        `kv_len` >= every length, the step's KV bucket."""

    def decode(self, query: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, plan: object) -> torch.Tensor:
        """`query` [B, heads, head_dim], `k_layer`/`v_layer` contiguous [B, kv_len, kv_heads, head_dim]
        -> [B, heads * head_dim]."""

    def prefill_plan(self, spans: Sequence[ChunkSpan]) -> object:
        ...

    def prefill(self, query: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, plan: object) -> torch.Tensor:
        """`query` [T, heads, head_dim] (every chunk's tokens, packed), `k_layer`/`v_layer` every chunk's K/V up to
        its end, packed (`ChunkSpan.kv_start`) -> [T, heads * head_dim]; each chunk attends causally to its K/V up to
        its own end."""


class SdpaAttention:
    """`F.scaled_dot_product_attention` over the batch's KV bucket (masked) and per prefill chunk."""

    name = "sdpa"

    def __init__(self, shape: AttentionShape) -> None:
        self.shape = shape
        self._positions = torch.arange(shape.max_model_len, device=shape.device)

    def decode_plan(self, lengths: torch.Tensor, kv_len: int) -> object:
        mask = self._positions[:kv_len].unsqueeze(0) < lengths.unsqueeze(1)
        return mask[:, None, None, :], kv_len

    def decode(self, query: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, plan: object) -> torch.Tensor:
        mask, kv_len = plan
        s = self.shape
        batch = query.shape[0]
        # [B, heads, dim] -> [B, kv_heads, group, dim]: heads are grouped as HF's repeat_kv lays them out.
        attended = F.scaled_dot_product_attention(
            query.reshape(batch, s.num_kv_heads, s.group, s.head_dim),
            k_layer[:batch, :kv_len].transpose(1, 2),
            v_layer[:batch, :kv_len].transpose(1, 2),
            attn_mask=mask,
            scale=s.scale,
        )
        return attended.reshape(batch, -1)

    def prefill_plan(self, spans: Sequence[ChunkSpan]) -> object:
        # A first chunk is plain causal attention. A later chunk also sees its cached prefix: causal aligned to the
        # bottom-right corner, which CUDA runs in the flash kernel without building a mask.
        return [(span, None if span.start == 0 else causal_lower_right(span.last - span.first, span.end))
                for span in spans]

    def prefill(self, query: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, plan: object) -> torch.Tensor:
        attended = []
        for span, mask in plan:
            out = F.scaled_dot_product_attention(
                query[span.first : span.last].transpose(0, 1).unsqueeze(0),
                k_layer[span.kv_start : span.kv_start + span.end].transpose(0, 1).unsqueeze(0),
                v_layer[span.kv_start : span.kv_start + span.end].transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None,
                scale=self.shape.scale,
                enable_gqa=True,
            )
            attended.append(out[0].transpose(0, 1))
        packed = attended[0] if len(attended) == 1 else torch.cat(attended)
        return packed.reshape(query.shape[0], -1)


FlashForward = Callable[..., tuple]
"""`torch.ops.aten._flash_attention_forward`'s calling convention (variable-length form)."""


class FlashAttention:
    """The flash kernel's variable-length form over the step's K/V viewed as [rows, kv_heads, dim]: sequence b
    starts at row `cu_seq_k[b]` and has `seqused_k[b]` valid tokens."""

    name = "flash"

    def __init__(self, shape: AttentionShape, forward: FlashForward | None = None) -> None:
        self.shape = shape
        self._forward = forward or torch.ops.aten._flash_attention_forward
        # Decode: one query token per row.
        self._decode_cu_q = torch.arange(shape.num_slots + 1, dtype=torch.int32, device=shape.device)

    def decode_plan(self, lengths: torch.Tensor, kv_len: int) -> object:
        batch = lengths.shape[0]
        cu_q = self._decode_cu_q[: batch + 1]
        # Row b's K/V start at b * kv_len of the gathered [B, kv_len, ...] (a device op: graphs capture it).
        return cu_q, cu_q * kv_len, lengths, kv_len

    def decode(self, query: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, plan: object) -> torch.Tensor:
        cu_q, cu_k, lengths, kv_len = plan
        s = self.shape
        # One query token per sequence (max_q 1), grouped-query heads unfolded: given that, the kernel folds each KV
        # head's query heads into one block's rows itself and picks a split of the K/V across thread blocks
        # (flash_api.cpp, mha_varlen_fwd: seqlenq_ngroups_swapped), which a pre-folded query would forgo.
        out = self._forward(
            query,
            k_layer.view(-1, s.num_kv_heads, s.head_dim),
            v_layer.view(-1, s.num_kv_heads, s.head_dim),
            cu_q, cu_k, 1, kv_len, 0.0, False, False,
            scale=s.scale, seqused_k=lengths,
        )[0]
        return out.reshape(query.shape[0], -1)

    def prefill_plan(self, spans: Sequence[ChunkSpan]) -> object:
        s = self.shape
        table = to_device(torch.tensor(
            [[span.first for span in spans] + [spans[-1].last],
             [span.kv_start for span in spans] + [spans[-1].kv_start + spans[-1].end],
             [span.end for span in spans] + [0]],
            dtype=torch.int32,
        ), s.device)
        max_q = max(span.last - span.first for span in spans)
        return table[0], table[1], table[2, :-1], max_q, max(span.end for span in spans)

    def prefill(self, query: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, plan: object) -> torch.Tensor:
        cu_q, cu_k, ends, max_q, max_k = plan
        s = self.shape
        # Causal in the flash kernel is aligned to the bottom-right corner: a chunk's i-th token sees its K/V up to
        # position end - chunk length + i, so a later chunk also sees its cached prefix.
        out = self._forward(
            query,
            k_layer.view(-1, s.num_kv_heads, s.head_dim),
            v_layer.view(-1, s.num_kv_heads, s.head_dim),
            cu_q, cu_k, max_q, max_k, 0.0, True, False,
            scale=s.scale, seqused_k=ends,
        )[0]
        return out.reshape(query.shape[0], -1)


def flash_unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the flash kernel cannot serve this model here, or None if it can."""
    if device.type != "cuda":
        return f"it needs a CUDA device (the engine runs on {device.type})"
    if dtype not in FLASH_DTYPES:
        return f"it needs float16 or bfloat16 (the engine runs in {str(dtype).removeprefix('torch.')})"
    if head_dim % 8 or head_dim > 256:
        return f"it needs a head dimension that is a multiple of 8, at most 256 (this model's is {head_dim})"
    if torch.cuda.get_device_capability(device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(device)
        return f"it needs compute capability 8.0 or newer (this GPU has {major}.{minor})"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no flash attention kernel"
    return None


def disagreement(candidate: Callable[[AttentionShape], Attention], shape: AttentionShape,
                 dtype: torch.dtype) -> str | None:
    """Build `candidate` and SDPA for a small cache of this model's head shape (at most 4 slots x 1024 tokens, a few
    MiB, so the check needs no memory the KV cache was promised), run both on the same random data and say how they
    differ, or None when they agree within the dtype's rounding. The data: decode rows of 1 to 640 tokens under a KV
    bucket shorter than the slots (a long row is split across thread blocks by the flash kernel), and prefill chunks
    from different slots, out of slot order, a first chunk and a later one."""
    s = dataclasses.replace(shape, num_slots=min(shape.num_slots, 4), max_model_len=min(shape.max_model_len, 1024))
    implementation, reference = candidate(s), SdpaAttention(s)
    device = s.device
    generator = torch.Generator(device=device).manual_seed(0)
    slots, length = s.num_slots, min(s.max_model_len, 640)
    layer_shape = (s.num_slots, s.max_model_len, s.num_kv_heads, s.head_dim)
    k_layer = torch.zeros(layer_shape, dtype=dtype, device=device)
    v_layer = torch.zeros(layer_shape, dtype=dtype, device=device)
    k_layer[:, :length] = torch.randn(slots, length, s.num_kv_heads, s.head_dim, generator=generator,
                                      device=device, dtype=dtype)
    v_layer[:, :length] = torch.randn(slots, length, s.num_kv_heads, s.head_dim, generator=generator,
                                      device=device, dtype=dtype)
    lengths = torch.tensor([1, length, min(37, length), max(length // 2, 1)][:slots], dtype=torch.int32,
                           device=device)
    query = torch.randn(slots, s.num_heads, s.head_dim, generator=generator, device=device, dtype=dtype)
    kv_len = min(s.max_model_len, -(-length // 256) * 256)
    head, tail = max(length // 4, 1), min(3, length)
    chunk_slots = (slots - 1, 0)
    spans = [ChunkSpan(kv_start=0, first=0, last=head, start=0, end=head),
             ChunkSpan(kv_start=head, first=head, last=head + tail, start=length - tail, end=length)]
    packed = torch.randn(spans[-1].last, s.num_heads, s.head_dim, generator=generator, device=device, dtype=dtype)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    # The contiguous forms the runner gathers: [B, kv_len, ...] for decode, each chunk's K/V packed for prefill.
    k_step, v_step = k_layer[:, :kv_len].contiguous(), v_layer[:, :kv_len].contiguous()
    k_packed = torch.cat([k_layer[slot, :span.end] for slot, span in zip(chunk_slots, spans)])
    v_packed = torch.cat([v_layer[slot, :span.end] for slot, span in zip(chunk_slots, spans)])
    for what, run in (
        ("decode", lambda impl: impl.decode(query, k_step, v_step, impl.decode_plan(lengths, kv_len))),
        ("prefill", lambda impl: impl.prefill(packed, k_packed, v_packed, impl.prefill_plan(spans))),
    ):
        try:
            got, expected = run(implementation).float(), run(reference).float()
        except Exception as exc:  # noqa: BLE001 - a kernel that refuses the inputs is a reason not to use it
            return f"its {what} raised {type(exc).__name__}: {exc}"
        if got.shape != expected.shape:
            return f"its {what} gave shape {tuple(got.shape)} where {reference.name} gives {tuple(expected.shape)}"
        error = (got - expected).abs().max().item()
        if not error <= tolerance:  # also catches NaN
            return f"its {what} differs from {reference.name}'s by up to {error:.3g} (tolerance {tolerance:g})"
    return None


def select_attention(choice: AttentionChoice, shape: AttentionShape, dtype: torch.dtype,
                     flash_forward: FlashForward | None = None) -> Attention:
    """The attention implementation for this model and device: `sdpa`, `flash` (a ModelLoadError saying why if it
    cannot be used), or `auto` (flash when it applies and agrees with SDPA, otherwise SDPA)."""
    sdpa = SdpaAttention(shape)
    if choice == "sdpa":
        logger.info("attention: sdpa (chosen)")
        return sdpa
    reason = None if flash_forward is not None else flash_unavailable_reason(shape.device, dtype, shape.head_dim)
    if reason is None:
        reason = disagreement(lambda small: FlashAttention(small, flash_forward), shape, dtype)
        if reason is None:
            logger.info("attention: flash (variable-length, reads only each sequence's own K/V)")
            return FlashAttention(shape, flash_forward)
    if choice == "flash":
        raise ModelLoadError(f"attention (ATTENTION_BACKEND) is flash, but the flash kernel cannot be used: {reason}; "
                             "set it to auto or sdpa")
    # Where the kernel applies but disagrees, something is wrong with it or with how it is called: say so loudly.
    log = logger.warning if reason.startswith("its ") else logger.info
    log("attention: sdpa (flash is not used: %s)", reason)
    return sdpa
