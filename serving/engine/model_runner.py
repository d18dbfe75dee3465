"""Our forward pass over a Hugging Face decoder, with a paged KV cache.

HF's modules do everything that varies between architectures (weights, norms, MLP activation, RoPE
variants such as llama3 scaling, tied embeddings, Qwen3's q/k norms); only attention and the cache
are ours. The cache holds, per layer, K and V as [num_blocks + 1, block_size, kv_heads, head_dim]: blocks of a
pool that the scheduler's `BlockManager` hands out, a sequence's position p in block `block_table[p // block_size]`
(the last block is scratch, written by decode rows no request uses and never read). Token-major, as flash kernels
read it; activations stay token-major too ([batch, tokens, heads, head_dim]), so K/V go in without a transpose.

- `prefill` runs chunks of several prompts in one forward pass, each writing through its own block table; a
  chunk attends causally to its cached prefix (its own, or a prefix another request left in the cache) and itself.
- `decode_step` is one batched step over rows 0..B-1 and fixed-shape tensors: a batch-size bucket, `kv_len` (a
  bucketed bound on the longest live sequence, `kv_len_bucket`, a whole number of blocks) and a block table of
  kv_len / block_size columns per row, so few shapes occur and each can be captured once as a CUDA graph
  (`serving.engine.cuda_graphs`); the block table is one of the graph's inputs.
- A decode step hands attention (`serving.engine.attention`) each layer's blocks and the rows' block tables: the
  Triton kernel reads the blocks in place, the flash and SDPA forms gather them into [B, kv_len, ...] first
  (PyTorch's flash kernel has no block-table form); see docs/ENGINE_NOTES.md. A prefill pass hands it each chunk's
  K/V up to its end, gathered through the block tables (`index_select`) and packed.
- `decode` can take some rows' tokens from tensors still on the device (the tokens a step in flight, or a prefill
  pass, chose), so the engine can launch a step before reading the last one back. Every host-to-device copy is from
  pinned memory and launched before the pass: neither waits for the device.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import torch

from serving.engine.attention import DECODE_GATHER_TOKENS, Attention, AttentionShape, ChunkSpan, SdpaAttention
from serving.engine.block_manager import DEFAULT_BLOCK_SIZE
from serving.engine.interface import ModelLoadError
from serving.engine.scheduler import PrefillChunk
from serving.engine.transfer import to_device

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

logger = logging.getLogger("serving.engine")

KV_LEN_BUCKET = 256
"""Decode attends over the cache rounded up to a multiple of this (up to KV_LEN_LINEAR_MAX)..."""
KV_LEN_LINEAR_MAX = 2048
"""...and beyond it to the next power of two: at most 2x the attention reads, and a handful of shapes
(graphs) even for a 128k context."""
PREFILL_GATHER_TOKENS = 256 * 1024
"""A prefill pass gathers each chunk's K/V up to the chunk's end (all its attention reads) per layer; the scheduler
keeps the ends of a pass's chunks within this many tokens together (`Scheduler.max_prefill_context_tokens`), except
for the pass's first chunk, which alone can reach max_model_len. The KV budget keeps the larger of the two out."""
MIN_DEFAULT_MODEL_LEN = 4096
"""When the cache cannot give every slot the model's full context, keep at least this much per slot
(or the model's own limit) and run fewer slots instead."""


@dataclass(frozen=True)
class KVCachePlan:
    num_slots: int
    """Decode rows: the most requests that run together (rows cost no KV memory)."""
    max_model_len: int
    num_blocks: int = 0
    """KV blocks in the pool; 0 (the default) gives every row its full context."""
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if not self.num_blocks:
            object.__setattr__(self, "num_blocks", self.num_slots * -(-self.max_model_len // self.block_size))


def kv_len_bucket(length: int, max_model_len: int) -> int:
    """The cache length a decode step attends over when its longest sequence holds `length` tokens."""
    if length <= KV_LEN_LINEAR_MAX:
        bucket = -(-length // KV_LEN_BUCKET) * KV_LEN_BUCKET
    else:
        bucket = 1 << (length - 1).bit_length()
    return min(max(bucket, KV_LEN_BUCKET), max_model_len)


def kv_len_buckets(max_model_len: int) -> list[int]:
    """Every value `kv_len_bucket` can return for this cache, ascending."""
    buckets, length = [], 1
    while True:
        bucket = kv_len_bucket(length, max_model_len)
        buckets.append(bucket)
        if bucket >= max_model_len:
            return buckets
        length = bucket + 1


def model_context_len(hf_config: PreTrainedConfig) -> int:
    """The longest context the runner handles exactly for this model.

    Attention here is always full; with sequences no longer than the sliding window, full and
    sliding-window attention are the same computation, so models that use a window are capped to it.
    """
    length = int(hf_config.max_position_embeddings)
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if window and (layer_types is None or "sliding_attention" in layer_types):
        length = min(length, int(window))
    return length


def kv_bytes_per_token(hf_config: PreTrainedConfig, dtype: torch.dtype) -> int:
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * head_dim * element


def kv_cache_budget_bytes(device: torch.device, hf_config: PreTrainedConfig, dtype: torch.dtype, *,
                          memory_utilization: float, num_slots: int, max_prefill_tokens: int, max_model_len: int,
                          decode_graphs: bool = False) -> int:
    """Bytes the KV cache may take, measured after the weights are on the device."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        reserve = (512 << 20) + activation_reserve_bytes(hf_config, dtype, num_slots=num_slots,
                                                         max_prefill_tokens=max_prefill_tokens,
                                                         max_model_len=max_model_len, decode_graphs=decode_graphs)
        return int(total * memory_utilization - (total - free) - reserve)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * memory_utilization)


SAMPLING_BYTES_PER_LOGIT = 36
"""Bytes per float32 logit of a full decode batch: the step's logits (4) and, at the peak of sampling them
(`serving.engine.sampling.sample_tokens` with bans, temperature, top_p and seeds), the copy a selection of rows
makes (4), the banned copy (4), the probabilities (4), top-p's sorted values and int64 order (12), the mass before
each (4) and the mask (1): 33, with 3 to spare. A GPU test measures it."""


def activation_reserve_bytes(hf_config: PreTrainedConfig, dtype: torch.dtype, *, num_slots: int,
                             max_prefill_tokens: int, max_model_len: int, decode_graphs: bool) -> int:
    """Memory kept out of the KV cache for activations: one prefill pass's (its chunks' tokens, and the K/V it gathers
    for attention: PREFILL_GATHER_TOKENS, or one chunk at the end of a longer context), and the decode logits with
    what sampling them takes at its peak; with decode graphs also their private pool (the largest step's activations,
    the K/V a gathering decode copies, and logits) and static logits.

    Prefill attention runs in the flash kernel (no score matrix), so its activations scale with chunk
    tokens, not tokens^2.
    """
    element = torch.empty((), dtype=dtype).element_size()
    slots = max(num_slots, 1)
    per_token = (8 * hf_config.hidden_size + 4 * hf_config.intermediate_size) * element
    # K/V gathered through the block tables, one layer at a time: by a gathering decode, one group of rows at a time,
    # and by a prefill pass. Eager, the two never live at once; with graphs the pool keeps the decode's apart.
    layer_token = kv_bytes_per_token(hf_config, dtype) // hf_config.num_hidden_layers
    decode_gather = DECODE_GATHER_TOKENS * layer_token
    prefill_gather = max(PREFILL_GATHER_TOKENS, max_model_len) * layer_token
    gathers = decode_gather + prefill_gather if decode_graphs else max(decode_gather, prefill_gather)
    reserve = max_prefill_tokens * per_token + slots * hf_config.vocab_size * SAMPLING_BYTES_PER_LOGIT + gathers
    if decode_graphs:
        reserve += slots * (per_token + hf_config.vocab_size * (element + 4 + 4)) + (64 << 20)
    return reserve


def plan_kv_cache(*, bytes_per_token: int, budget_bytes: int, num_slots: int, max_model_len: int,
                  max_model_len_is_default: bool, block_size: int = DEFAULT_BLOCK_SIZE) -> KVCachePlan:
    """Blocks for the budget: as many as every row at full context would take, or what the budget holds. Requests
    are admitted by blocks, so a budget smaller than that runs as many rows as short requests allow; it only has to
    hold one sequence of the context, which a default context is shortened to fit first (not below 4096)."""
    capacity_tokens = max(budget_bytes, 0) // bytes_per_token
    blocks_per_seq = -(-max_model_len // block_size)
    if num_slots * blocks_per_seq * block_size <= capacity_tokens:
        return KVCachePlan(num_slots, max_model_len, num_slots * blocks_per_seq, block_size)
    planned_len = max_model_len
    if max_model_len_is_default:
        floor = min(max_model_len, MIN_DEFAULT_MODEL_LEN)
        planned_len = max(floor, min(max_model_len, capacity_tokens // block_size * block_size))
    num_blocks = capacity_tokens // block_size
    if num_blocks < -(-planned_len // block_size):
        raise ModelLoadError(
            f"the KV cache for one sequence of {planned_len} tokens needs "
            f"{planned_len * bytes_per_token / 2**30:.2f} GiB but only {max(budget_bytes, 0) / 2**30:.2f} GiB "
            "is left after the weights; lower max_model_len, raise gpu_memory_utilization, or use a larger GPU"
        )
    logger.warning(
        "KV cache budget %.2f GiB holds %d blocks of %d tokens, not %d rows x %d tokens: requests are admitted as "
        "their blocks fit (context %d)", budget_bytes / 2**30, num_blocks, block_size, num_slots, max_model_len,
        planned_len,
    )
    return KVCachePlan(num_slots, planned_len, num_blocks, block_size)


GraphedDecode = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""`graphs(inputs [3, B], block_tables [B, kv_len / block_size], kv_len) -> float32 logits [B, vocab]`: decode steps
replayed from CUDA graphs (`serving.engine.cuda_graphs.DecodeGraphs`), or what stands in for them."""


class _SelfAttention(Protocol):
    """What the runner uses of an HF decoder layer's attention module: its projections and shape (the module's own
    forward is never called)."""

    q_proj: torch.nn.Module
    k_proj: torch.nn.Module
    v_proj: torch.nn.Module
    o_proj: torch.nn.Module
    head_dim: int
    scaling: float


class _NormedAttention(_SelfAttention, Protocol):
    """An attention module that normalises queries and keys per head before RoPE (Qwen3's)."""

    q_norm: torch.nn.Module
    k_norm: torch.nn.Module


class _DecoderLayer(Protocol):
    self_attn: _SelfAttention
    input_layernorm: torch.nn.Module
    post_attention_layernorm: torch.nn.Module
    mlp: torch.nn.Module


class _Decoder(Protocol):
    embed_tokens: torch.nn.Module
    layers: Iterable[_DecoderLayer]
    norm: torch.nn.Module
    rotary_emb: torch.nn.Module


class _CausalLM(Protocol):
    """The parts of an HF causal LM (`LlamaForCausalLM` and kin) the runner calls."""

    model: _Decoder
    lm_head: torch.nn.Module
    config: PreTrainedConfig


class ModelRunner:
    """Runs prefill chunks and batched decode steps of one HF causal LM over its own KV cache."""

    def __init__(self, model: torch.nn.Module, plan: KVCachePlan,
                 attention: Callable[[AttentionShape], Attention] = SdpaAttention) -> None:
        # torch's Module.__getattr__ types every submodule Tensor | Module: read the model as the parts called here.
        causal_lm = cast(_CausalLM, model)
        decoder = causal_lm.model
        self.model = model
        self.embed_tokens = decoder.embed_tokens
        self.layers = list(decoder.layers)
        self.norm = decoder.norm
        self.lm_head = causal_lm.lm_head
        self.rotary_emb = decoder.rotary_emb
        first_attention = self.layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(first_attention, name):
                raise ModelLoadError(f"{type(first_attention).__name__} has no {name}; this architecture is not "
                                     "a Llama-style decoder the engine can run")
        # Each architecture's own RoPE application (identical today for the supported ones, but the
        # module that defines the attention is the authority).
        self._apply_rotary = sys.modules[type(first_attention).__module__].apply_rotary_pos_emb
        self.head_dim = first_attention.head_dim
        self.scaling = first_attention.scaling
        self.num_kv_heads: int = causal_lm.config.num_key_value_heads
        self.vocab_size: int = causal_lm.config.vocab_size
        self.num_slots = plan.num_slots
        self.max_model_len = plan.max_model_len
        self.num_blocks = plan.num_blocks
        self.block_size = plan.block_size
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

        cache_shape = (len(self.layers), self.num_blocks + 1, self.block_size, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
        self.scratch_block = self.num_blocks
        """Written by decode rows no request uses; no block table a request holds names it."""
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.max_kv_len = self.max_blocks_per_seq * self.block_size
        """The longest K/V a decode step reads: the context, rounded up to whole blocks."""
        self.attention_shape = AttentionShape(
            num_heads=causal_lm.config.num_attention_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            scale=self.scaling, num_slots=self.num_slots, max_model_len=self.max_kv_len, device=self.device,
            block_size=self.block_size,
        )
        self.attention = attention(self.attention_shape)
        self.batch_buckets = _batch_buckets(self.num_slots)
        self.kv_len_buckets = kv_len_buckets(self.max_kv_len)
        self.graphs: GraphedDecode | None = None

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[PrefillChunk]) -> torch.Tensor | None:
        """Run prompt chunks of several requests in one forward pass; return float32 logits [n, vocab] of the
        last token of each chunk that wants them (in order), or None when none does.

        Tokens of all chunks are packed into one row, so projections, norms, MLP and the K/V writes run once
        for the step whatever the number of prompts; attention reads each chunk's own blocks.
        """
        inputs, gather, wanted_rows, plan = self.prefill_inputs(chunks)
        hidden = self.embed_tokens(inputs[0:1])
        cos, sin = self.rotary_emb(hidden, inputs[1:2])
        heads = (self.num_kv_heads, self.head_dim)
        for index, layer in enumerate(self.layers):
            residual = hidden
            query, key, value = self._project_qkv(layer.self_attn, layer.input_layernorm(hidden), cos, sin)
            k_flat, v_flat = self.k_cache[index].view(-1, *heads), self.v_cache[index].view(-1, *heads)
            k_flat[inputs[2]] = key[0]
            v_flat[inputs[2]] = value[0]
            attention = self.attention.prefill(query[0], k_flat.index_select(0, gather),
                                               v_flat.index_select(0, gather), plan)
            hidden = residual + layer.self_attn.o_proj(attention.unsqueeze(0))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        if wanted_rows is None:
            return None
        return self.lm_head(self.norm(hidden[0].index_select(0, wanted_rows))).float()

    def prefill_inputs(self, chunks: Sequence[PrefillChunk]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, object]:
        """The host side of a prefill pass, on the device: the chunks' tokens, positions and cache rows (where each
        token's K/V go) packed as [3, T]; the cache rows of every chunk's K/V up to its end, chunk after chunk (what
        attention reads); the rows whose logits are wanted (or None); attention's plan for the chunks."""
        size = self.block_size
        token_ids = [token for chunk in chunks for token in chunk.token_ids]
        positions: list[int] = []
        written: list[int] = []
        gather: list[int] = []
        kv_starts: list[int] = []
        for chunk in chunks:
            table = chunk.block_table
            positions += range(chunk.start, chunk.end)
            written += [table[p // size] * size + p % size for p in range(chunk.start, chunk.end)]
            kv_starts.append(len(gather))
            # Whole blocks, cut at the chunk's end.
            gather += [row for block in table[: -(-chunk.end // size)]
                       for row in range(block * size, block * size + size)][: chunk.end]
        offsets = list(itertools.accumulate((len(chunk.token_ids) for chunk in chunks), initial=0))
        wanted = [last - 1 for chunk, last in zip(chunks, offsets[1:]) if chunk.want_logits]
        total = len(token_ids)
        # Every host-to-device copy before the pass is launched, as one copy: one after it would wait for the pass.
        host = to_device(torch.tensor(token_ids + positions + written + gather + wanted, dtype=torch.long),
                         self.device)
        inputs = host[: 3 * total].view(3, total)
        gather_rows = host[3 * total : 3 * total + len(gather)]
        wanted_rows = host[3 * total + len(gather) :] if wanted else None
        plan = self.attention.prefill_plan([
            ChunkSpan(kv_start, first, last, chunk.start, chunk.end)
            for chunk, first, last, kv_start in zip(chunks, offsets, offsets[1:], kv_starts)
        ])
        return inputs, gather_rows, wanted_rows, plan

    def decode(self, slots: list[int], token_ids: list[int], positions: list[int],
               carried: tuple[Sequence[torch.Tensor], list[int]] | None = None,
               block_tables: Sequence[Sequence[int]] = ()) -> torch.Tensor:
        """One decode step for the given rows (slots); returns float32 logits [len(slots), vocab] in that order.
        `block_tables[i]` is the i-th row's blocks, covering its position.

        Inputs are laid out by slot over the smallest bucket covering the highest slot; rows of slots
        not decoding feed token 0 at position 0 of the scratch block, which no sequence reads.

        With `carried` = (sources, rows), the i-th slot's token is row `rows[i]` of the device tensors `sources`
        taken end to end, where `rows[i]` >= 0 (`token_ids[i]` is then ignored): tokens a step still in flight
        chose, gathered on the device, so the step can be launched before they are read back.
        """
        batch = next(size for size in self.batch_buckets if size > max(slots))
        kv_len = kv_len_bucket(max(positions) + 1, self.max_kv_len)
        size = self.block_size
        width = kv_len // size
        scratch = self.scratch_block
        full = len(slots) == batch and slots == list(range(batch))  # the engine passes slots in order
        if full:
            written = [table[p // size] * size + p % size for table, p in zip(block_tables, positions)]
            rows = [token_ids, positions, written]
            tables = [list(table[:width]) + [scratch] * (width - len(table)) for table in block_tables]
        else:
            rows = [[0] * batch, [0] * batch, [scratch * size] * batch]
            tables = [[scratch] * width for _ in range(batch)]
            for slot, token, position, table in zip(slots, token_ids, positions, block_tables):
                rows[0][slot] = token
                rows[1][slot] = position
                rows[2][slot] = table[position // size] * size + position % size
                tables[slot] = list(table[:width]) + [scratch] * (width - len(table))
        if carried is not None:
            # Row r's token is entry r of (sources..., this step's host tokens): a carried row points into the
            # sources, every other row at its own host token.
            sources, source_rows = carried
            offset = sum(source.shape[0] for source in sources)
            gather = list(range(offset, offset + batch))
            for slot, row in zip(slots, source_rows):
                if row >= 0:
                    gather[slot] = row
            rows.append(gather)
        if not full:
            rows.append(slots + [0] * (batch - len(slots)))
        # One copy, before the step is launched (see `to_device`): the rows, then the block tables.
        count = len(rows) * batch
        host = to_device(torch.tensor([value for row in rows for value in row]
                                      + [block for table in tables for block in table], dtype=torch.long),
                         self.device)
        packed = host[:count].view(len(rows), batch)
        table_rows = host[count:].view(batch, width)
        inputs = packed[:3]
        if carried is not None:
            tokens = torch.cat([*sources, packed[0]]).index_select(0, packed[3])
            inputs = torch.stack([tokens, packed[1], packed[2]])
        logits = (self.graphs if self.graphs is not None else self._decode_eager)(inputs, table_rows, kv_len)
        return logits if full else logits[packed[-1, : len(slots)]]

    def use_graphs(self, graphs: GraphedDecode | None) -> None:
        """Route decode steps through `graphs` (a `serving.engine.cuda_graphs.DecodeGraphs`), or eager (None)."""
        self.graphs = graphs

    def _decode_eager(self, inputs: torch.Tensor, block_tables: torch.Tensor, kv_len: int) -> torch.Tensor:
        return self.decode_step(inputs[0], inputs[1], inputs[2], block_tables, kv_len)

    def use_attention(self, attention: Attention) -> None:
        """Read the cache through `attention` from now on (decode graphs captured before must be recaptured)."""
        self.attention = attention

    @torch.inference_mode()
    def decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, cache_rows: torch.Tensor,
                    block_tables: torch.Tensor, kv_len: int) -> torch.Tensor:
        """The fixed-shape decode step: row i feeds input_ids[i] at positions[i], its K/V written to row
        cache_rows[i] of the layer's blocks viewed flat, and attends over the blocks block_tables[i]
        ([B, kv_len / block_size])."""
        hidden = self.embed_tokens(input_ids.unsqueeze(1))
        cos, sin = self.rotary_emb(hidden, positions.unsqueeze(1))
        lengths = (positions + 1).to(torch.int32)
        plan = self.attention.decode_plan(lengths, block_tables, kv_len)
        heads = (self.num_kv_heads, self.head_dim)
        for index, layer in enumerate(self.layers):
            residual = hidden
            query, key, value = self._project_qkv(layer.self_attn, layer.input_layernorm(hidden), cos, sin)
            k_blocks, v_blocks = self.k_cache[index], self.v_cache[index]
            k_blocks.view(-1, *heads)[cache_rows] = key[:, 0]
            v_blocks.view(-1, *heads)[cache_rows] = value[:, 0]
            attention = self.attention.decode(query[:, 0], k_blocks, v_blocks, plan)
            hidden = residual + layer.self_attn.o_proj(attention.unsqueeze(1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.lm_head(self.norm(hidden[:, 0])).float()

    def _project_qkv(self, attention: _SelfAttention, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token-major [batch, tokens, heads, head_dim] queries, keys and values, RoPE applied."""
        batch, length, _ = hidden.shape
        shape = (batch, length, -1, self.head_dim)
        query = attention.q_proj(hidden).view(shape)
        key = attention.k_proj(hidden).view(shape)
        value = attention.v_proj(hidden).view(shape)
        if hasattr(attention, "q_norm"):
            normed = cast(_NormedAttention, attention)
            query, key = normed.q_norm(query), normed.k_norm(key)
        query, key = self._apply_rotary(query, key, cos, sin, unsqueeze_dim=2)
        return query, key, value


def _batch_buckets(num_slots: int) -> list[int]:
    buckets = [1]
    while buckets[-1] < num_slots:
        buckets.append(min(buckets[-1] * 2, num_slots))
    return buckets
