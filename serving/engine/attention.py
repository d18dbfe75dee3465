"""Attention over the engine's paged KV cache, in interchangeable implementations behind one small interface.

K and V are token-major ([tokens, kv_heads, head_dim]), the layout flash kernels read. The cache is paged
(`serving.engine.model_runner`): per layer [blocks, block_size, kv_heads, head_dim], a sequence's position p in block
`block_table[p // block_size]`. A decode step hands an `Attention` the layer's blocks and the rows' block tables; a
prefill pass hands it each chunk's K/V up to its end, gathered and packed chunk after chunk. The model runner writes
K/V; an `Attention` only reads them.

- `SdpaAttention` (any device, any dtype): `F.scaled_dot_product_attention`. A decode step gathers the rows' blocks
  into [B, kv_len, ...] (the batch's KV-length bucket) and attends under a length mask, so every row reads K/V up to
  the longest row's bucket; a prefill pass runs one attention call per prompt chunk.
- `FlashAttention` (CUDA, float16/bfloat16, compute capability 8.0+): PyTorch's flash kernel in its
  variable-length form with `seqused_k`, each row's own length. It takes one contiguous K/V, so a decode step
  gathers the rows' blocks first, as SDPA does, and then reads only each row's valid K/V; a prefill pass runs every
  chunk's attention in one kernel call.
- `TritonAttention` (CUDA, float16/bfloat16, compute capability 8.0+, Triton): decode by our kernel
  (`serving.engine.paged_decode`), which reads each row's blocks in place, only up to its length: no gather, no
  copy of the cache. Prefill as flash does (or SDPA where flash cannot run).

The gathering forms copy every row's KV bucket once per layer and step before reading it again: at large batches
that copy costs more than the attention itself (docs/ENGINE_NOTES.md, v8), which is why the kernel exists. In decode
all three read K/V once per KV head, never once per query head: SDPA with each KV head's query heads folded into that
head's query rows; the flash kernel does the same fold itself for single-token queries of grouped-query models, and
then also splits each sequence's K/V across thread blocks when the batch is too small to fill the GPU; the Triton
kernel gives each (row, KV head) one program holding that head's query heads, and splits the row's tokens across
programs the same way.

`select_attention` picks the implementation when the engine loads: `auto` takes triton where it applies and its
results agree with SDPA's on a check run at load (random data of the model's head shape, rows of different lengths,
blocks out of order, chunks out of order), else flash under the same check, else SDPA, with the reasons logged.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

from serving.engine.config import Attention as AttentionChoice
from serving.engine.interface import ModelLoadError
from serving.engine.transfer import to_device

if TYPE_CHECKING:  # the module imports Triton: at run time only when TritonAttention is built
    from serving.engine.paged_decode import DecodeLaunch

logger = logging.getLogger("serving.engine")


FLASH_DTYPES = (torch.float16, torch.bfloat16)

DECODE_GATHER_TOKENS = 256 * 1024
"""A gathering decode copies at most this many tokens' K/V (per layer) at a time out of the blocks: rows are
attended in groups of DECODE_GATHER_TOKENS // kv_len, so a full batch over a long context's bucket does not need a
copy of K/V as large as the cache itself. The largest group is kept out of the KV budget
(`serving.engine.model_runner.activation_reserve_bytes`)."""


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
    block_size: int = 16
    """Tokens per cache block (the engine's `block_size`)."""

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
    layer; a decode plan holds only tensors computed on the device, so a decode step can be a CUDA graph.

    Each implementation's plans have their own types (`SdpaDecodePlan`, `FlashPrefillPlan`, ...); here they are
    `Any`, since a caller only hands a plan back to the implementation that made it."""

    name: str
    shape: AttentionShape

    def decode_plan(self, lengths: torch.Tensor, block_tables: torch.Tensor, kv_len: int) -> Any:
        """`lengths` int32 [B]: valid cache tokens of row i, including the token just written; `block_tables` int64
        [B, kv_len / block_size]: row i's blocks; `kv_len` >= every length, the step's KV bucket."""

    def decode(self, query: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, plan: Any
               ) -> torch.Tensor:
        """`query` [B, heads, head_dim], `k_blocks`/`v_blocks` one layer's cache [blocks, block_size, kv_heads,
        head_dim] -> [B, heads * head_dim]."""

    def prefill_plan(self, spans: Sequence[ChunkSpan]) -> Any:
        ...

    def prefill(self, query: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, plan: Any) -> torch.Tensor:
        """`query` [T, heads, head_dim] (every chunk's tokens, packed), `k_layer`/`v_layer` every chunk's K/V up to
        its end, packed (`ChunkSpan.kv_start`) -> [T, heads * head_dim]; each chunk attends causally to its K/V up to
        its own end."""


GroupPlan = TypeVar("GroupPlan")
"""A gathering implementation's plan for one group of rows."""


class GatherGroup(NamedTuple, Generic[GroupPlan]):
    """Rows first..last of a decode step, gathered and attended together."""

    first: int
    last: int
    tables: torch.Tensor
    """The rows' block tables [last - first, kv_len / block_size]."""
    plan: GroupPlan


class GatheredPlan(NamedTuple, Generic[GroupPlan]):
    """A gathering decode step's plan: the KV bucket and the groups of rows."""

    kv_len: int
    groups: list[GatherGroup[GroupPlan]]


class GatheringDecode(Generic[GroupPlan]):
    """Decode for implementations that read one contiguous K/V: the rows' blocks are gathered into
    [rows, kv_len, kv_heads, head_dim] (in groups of at most DECODE_GATHER_TOKENS tokens) and handed to
    `decode_gathered`."""

    shape: AttentionShape

    def gathered_plan(self, lengths: torch.Tensor, kv_len: int) -> GroupPlan:
        raise NotImplementedError

    def decode_gathered(self, query: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, plan: GroupPlan
                        ) -> torch.Tensor:
        """`query` [B, heads, head_dim], `k_layer`/`v_layer` contiguous [B, kv_len, kv_heads, head_dim], row b's
        first lengths[b] tokens valid -> [B, heads * head_dim]."""
        raise NotImplementedError

    def decode_plan(self, lengths: torch.Tensor, block_tables: torch.Tensor, kv_len: int
                    ) -> GatheredPlan[GroupPlan]:
        batch = lengths.shape[0]
        group = max(1, DECODE_GATHER_TOKENS // kv_len)
        groups = [(first, min(first + group, batch)) for first in range(0, batch, group)]
        return GatheredPlan(kv_len, [GatherGroup(first, last, block_tables[first:last],
                                                 self.gathered_plan(lengths[first:last], kv_len))
                                     for first, last in groups])

    def decode(self, query: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
               plan: GatheredPlan[GroupPlan]) -> torch.Tensor:
        kv_len, groups = plan
        heads = k_blocks.shape[2:]
        attended = [
            self.decode_gathered(query[first:last], k_blocks[tables].view(last - first, kv_len, *heads),
                                 v_blocks[tables].view(last - first, kv_len, *heads), group_plan)
            for first, last, tables, group_plan in groups
        ]
        return attended[0] if len(attended) == 1 else torch.cat(attended)


class SdpaDecodePlan(NamedTuple):
    """SDPA's plan for a group of gathered rows."""

    mask: torch.Tensor
    """[rows, 1, 1, kv_len]: True where a row's token is valid."""
    kv_len: int


class SdpaPrefillChunk(NamedTuple):
    """SDPA's plan for one prompt chunk (a prefill plan is a list of them)."""

    span: ChunkSpan
    mask: CausalBias | None
    """None for a first chunk (plain causal); a later one's causal mask aligned to the bottom-right corner."""


class SdpaAttention(GatheringDecode[SdpaDecodePlan]):
    """`F.scaled_dot_product_attention` over the batch's KV bucket (masked) and per prefill chunk."""

    name = "sdpa"

    def __init__(self, shape: AttentionShape) -> None:
        self.shape = shape
        self._positions = torch.arange(shape.max_model_len, device=shape.device)

    def gathered_plan(self, lengths: torch.Tensor, kv_len: int) -> SdpaDecodePlan:
        mask = self._positions[:kv_len].unsqueeze(0) < lengths.unsqueeze(1)
        return SdpaDecodePlan(mask[:, None, None, :], kv_len)

    def decode_gathered(self, query: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
                        plan: SdpaDecodePlan) -> torch.Tensor:
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

    def prefill_plan(self, spans: Sequence[ChunkSpan]) -> list[SdpaPrefillChunk]:
        # A first chunk is plain causal attention. A later chunk also sees its cached prefix: causal aligned to the
        # bottom-right corner, which CUDA runs in the flash kernel without building a mask.
        return [SdpaPrefillChunk(span, None if span.start == 0
                                 else causal_lower_right(span.last - span.first, span.end))
                for span in spans]

    def prefill(self, query: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
                plan: list[SdpaPrefillChunk]) -> torch.Tensor:
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


class FlashDecodePlan(NamedTuple):
    """The flash kernel's plan for a group of gathered rows: one query token per row, row b's K/V from
    `cu_k[b]`, `lengths[b]` of them valid."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    lengths: torch.Tensor
    kv_len: int


class FlashPrefillPlan(NamedTuple):
    """The flash kernel's plan for a prefill pass: chunk i's queries from `cu_q[i]`, its K/V from `cu_k[i]`, `ends[i]`
    of them; the longest chunk and the longest K/V."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    ends: torch.Tensor
    max_q: int
    max_k: int


class FlashAttention(GatheringDecode[FlashDecodePlan]):
    """The flash kernel's variable-length form over the step's K/V viewed as [rows, kv_heads, dim]: sequence b
    starts at row `cu_seq_k[b]` and has `seqused_k[b]` valid tokens."""

    name = "flash"

    def __init__(self, shape: AttentionShape, forward: FlashForward | None = None) -> None:
        self.shape = shape
        self._forward = forward or torch.ops.aten._flash_attention_forward
        # Decode: one query token per row.
        self._decode_cu_q = torch.arange(shape.num_slots + 1, dtype=torch.int32, device=shape.device)

    def gathered_plan(self, lengths: torch.Tensor, kv_len: int) -> FlashDecodePlan:
        batch = lengths.shape[0]
        cu_q = self._decode_cu_q[: batch + 1]
        # Row b's K/V start at b * kv_len of the gathered [B, kv_len, ...] (a device op: graphs capture it).
        return FlashDecodePlan(cu_q, cu_q * kv_len, lengths, kv_len)

    def decode_gathered(self, query: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
                        plan: FlashDecodePlan) -> torch.Tensor:
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

    def prefill_plan(self, spans: Sequence[ChunkSpan]) -> FlashPrefillPlan:
        s = self.shape
        table = to_device(torch.tensor(
            [[span.first for span in spans] + [spans[-1].last],
             [span.kv_start for span in spans] + [spans[-1].kv_start + spans[-1].end],
             [span.end for span in spans] + [0]],
            dtype=torch.int32,
        ), s.device)
        max_q = max(span.last - span.first for span in spans)
        return FlashPrefillPlan(table[0], table[1], table[2, :-1], max_q, max(span.end for span in spans))

    def prefill(self, query: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor,
                plan: FlashPrefillPlan) -> torch.Tensor:
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


class TritonDecodePlan(NamedTuple):
    """The Triton kernel's plan for a decode step: the rows' lengths and block tables as the step has them, and the
    bucket's launch shape."""

    lengths: torch.Tensor
    block_tables: torch.Tensor
    launch: DecodeLaunch


class TritonAttention:
    """Decode by the Triton kernel that reads the blocks in place (`serving.engine.paged_decode`); prefill by
    `prefill_with` (flash on CUDA where it applies, else SDPA)."""

    name = "triton"

    def __init__(self, shape: AttentionShape, prefill_with: Attention, multiprocessors: int | None = None) -> None:
        from serving.engine import paged_decode  # imports Triton: only when this implementation is built

        self.shape = shape
        self._kernel = paged_decode
        self._prefill = prefill_with
        if multiprocessors is None:
            multiprocessors = (torch.cuda.get_device_properties(shape.device).multi_processor_count
                               if shape.device.type == "cuda" else 1)
        self._multiprocessors = multiprocessors

    def decode_plan(self, lengths: torch.Tensor, block_tables: torch.Tensor, kv_len: int) -> TritonDecodePlan:
        s = self.shape
        launch = self._kernel.plan_launch(lengths.shape[0], s.num_kv_heads, kv_len, s.head_dim, self._multiprocessors)
        return TritonDecodePlan(lengths, block_tables, launch)

    def decode(self, query: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, plan: TritonDecodePlan
               ) -> torch.Tensor:
        lengths, block_tables, launch = plan
        out = self._kernel.paged_decode(query, k_blocks, v_blocks, block_tables, lengths, self.shape.scale, launch)
        return out.reshape(query.shape[0], -1)

    def prefill_plan(self, spans: Sequence[ChunkSpan]) -> Any:
        """`prefill_with`'s plan."""
        return self._prefill.prefill_plan(spans)

    def prefill(self, query: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, plan: Any) -> torch.Tensor:
        return self._prefill.prefill(query, k_layer, v_layer, plan)


def triton_interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (`TRITON_INTERPRET=1`: how the CPU tests run ours)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the Triton decode kernel cannot serve this model here, or None if it can."""
    if not (triton_interpreting() and device.type == "cpu") and (reason := _half_precision_gpu_reason(device, dtype)):
        return reason
    if head_dim > 256:
        return f"it needs a head dimension of at most 256 (this model's is {head_dim})"
    try:
        import serving.engine.paged_decode  # noqa: F401 - whether Triton imports
    except ImportError as exc:
        return f"Triton cannot be imported ({exc})"
    return None


def _half_precision_gpu_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """What both GPU kernels (flash and Triton) need: a CUDA device of compute capability 8.0+, float16/bfloat16."""
    if device.type != "cuda":
        return f"it needs a CUDA device (the engine runs on {device.type})"
    if dtype not in FLASH_DTYPES:
        return f"it needs float16 or bfloat16 (the engine runs in {str(dtype).removeprefix('torch.')})"
    if torch.cuda.get_device_capability(device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(device)
        return f"it needs compute capability 8.0 or newer (this GPU has {major}.{minor})"
    return None


def flash_unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the flash kernel cannot serve this model here, or None if it can."""
    if reason := _half_precision_gpu_reason(device, dtype):
        return reason
    if head_dim % 8 or head_dim > 256:
        return f"it needs a head dimension that is a multiple of 8, at most 256 (this model's is {head_dim})"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no flash attention kernel"
    return None


def disagreement(candidate: Callable[[AttentionShape], Attention], shape: AttentionShape,
                 dtype: torch.dtype) -> str | None:
    """Build `candidate` and SDPA for a small cache of this model's head shape (at most 4 rows x 1024 tokens, a few
    MiB, so the check needs no memory the KV cache was promised), run both on the same random data and say how they
    differ, or None when they agree within the dtype's rounding. The data: decode rows of 1 to 640 tokens under a KV
    bucket shorter than the context, their blocks shuffled through the pool (a long row is split across thread blocks
    by the flash and Triton kernels), and prefill chunks from different rows, out of row order, a first chunk and a
    later one."""
    s = dataclasses.replace(shape, num_slots=min(shape.num_slots, 4), max_model_len=min(shape.max_model_len, 1024))
    implementation, reference = candidate(s), SdpaAttention(s)
    device = s.device
    generator = torch.Generator(device=device).manual_seed(0)
    rows, length, size = s.num_slots, min(s.max_model_len, 640), s.block_size
    width = -(-s.max_model_len // size)
    # The pool: every row's blocks and a spare one, handed out in a random order (+1: block 0 is never used).
    num_blocks = rows * width + 2
    k_blocks = torch.randn(num_blocks, size, s.num_kv_heads, s.head_dim, generator=generator, device=device,
                           dtype=dtype)
    v_blocks = torch.randn(num_blocks, size, s.num_kv_heads, s.head_dim, generator=generator, device=device,
                           dtype=dtype)
    order = torch.randperm(num_blocks - 2, generator=generator, device=device) + 1
    tables = order.view(rows, width)
    lengths = torch.tensor([1, length, min(37, length), max(length // 2, 1)][:rows], dtype=torch.int32,
                           device=device)
    query = torch.randn(rows, s.num_heads, s.head_dim, generator=generator, device=device, dtype=dtype)
    kv_len = min(s.max_model_len, -(-length // 256) * 256)
    step_tables = tables[:, : -(-kv_len // size)]
    head, tail = max(length // 4, 1), min(3, length)
    chunk_rows = (rows - 1, 0)
    spans = [ChunkSpan(kv_start=0, first=0, last=head, start=0, end=head),
             ChunkSpan(kv_start=head, first=head, last=head + tail, start=length - tail, end=length)]
    packed = torch.randn(spans[-1].last, s.num_heads, s.head_dim, generator=generator, device=device, dtype=dtype)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2

    def row_kv(blocks: torch.Tensor, row: int, end: int) -> torch.Tensor:
        return blocks[tables[row]].flatten(0, 1)[:end]

    # Prefill reads each chunk's K/V up to its end, gathered and packed, as the runner hands it over.
    k_packed = torch.cat([row_kv(k_blocks, row, span.end) for row, span in zip(chunk_rows, spans)])
    v_packed = torch.cat([row_kv(v_blocks, row, span.end) for row, span in zip(chunk_rows, spans)])
    for what, run in (
        ("decode", lambda impl: impl.decode(query, k_blocks, v_blocks, impl.decode_plan(lengths, step_tables, kv_len))),
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
    """The attention implementation for this model and device: `sdpa`; `flash` or `triton` (a ModelLoadError saying
    why if it cannot be used); or `auto`: triton when it applies and agrees with SDPA, else flash on the same terms,
    else SDPA. `flash_forward` stands in for the flash kernel (the CPU tests)."""
    sdpa = SdpaAttention(shape)
    if choice == "sdpa":
        logger.info("attention: sdpa (chosen)")
        return sdpa
    flash_reason = None if flash_forward is not None else flash_unavailable_reason(shape.device, dtype,
                                                                                   shape.head_dim)
    if flash_reason is None:
        flash_reason = disagreement(lambda small: FlashAttention(small, flash_forward), shape, dtype)

    def prefill_for(small: AttentionShape) -> Attention:
        return FlashAttention(small, flash_forward) if flash_reason is None else SdpaAttention(small)

    if choice in ("auto", "triton"):
        triton_reason = triton_unavailable_reason(shape.device, dtype, shape.head_dim)
        if triton_reason is None:
            triton_reason = disagreement(lambda small: TritonAttention(small, prefill_for(small)), shape, dtype)
        if triton_reason is None:
            prefill = "flash" if flash_reason is None else "sdpa"
            logger.info("attention: triton (decode reads the paged cache in place; %s prefill)", prefill)
            return TritonAttention(shape, prefill_for(shape))
        if choice == "triton":
            raise ModelLoadError(f"attention (ATTENTION_BACKEND) is triton, but the Triton decode kernel cannot be "
                                 f"used: {triton_reason}; set it to auto, flash or sdpa")
        log = logger.warning if triton_reason.startswith("its ") else logger.info
        log("attention: the Triton decode kernel is not used: %s", triton_reason)
    if flash_reason is None:
        logger.info("attention: flash (variable-length, reads only each sequence's own K/V)")
        return FlashAttention(shape, flash_forward)
    if choice == "flash":
        raise ModelLoadError(f"attention (ATTENTION_BACKEND) is flash, but the flash kernel cannot be used: "
                             f"{flash_reason}; set it to auto or sdpa")
    # Where the kernel applies but disagrees, something is wrong with it or with how it is called: say so loudly.
    log = logger.warning if flash_reason.startswith("its ") else logger.info
    log("attention: sdpa (flash is not used: %s)", flash_reason)
    return sdpa
