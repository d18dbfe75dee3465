"""Our forward pass over a Hugging Face decoder, with a preallocated static KV cache.

HF's modules do everything that varies between architectures (weights, norms, MLP activation, RoPE
variants such as llama3 scaling, tied embeddings, Qwen3's q/k norms); only attention and the cache
are ours. The cache holds, per layer, K and V as [num_slots, max_model_len, kv_heads, head_dim]: one
slot per running request, so a request's cache is a contiguous prefix of its slot, token-major as
flash kernels read it. Activations stay token-major too ([batch, tokens, heads, head_dim]), so K/V
go into the cache without a transpose.

- `prefill` runs chunks of several prompts in one forward pass, each written into its own slot; a
  chunk attends causally to its cached prefix and itself, so long prompts can be split across steps.
- `decode_step` is one batched step for slots 0..B-1 over fixed-shape tensors: a batch-size bucket
  and `kv_len`, a bucketed bound on the longest live sequence (`kv_len_bucket`), so few shapes occur
  and each can be captured once as a CUDA graph (`serving.engine.cuda_graphs`).
- `decode` can take some rows' tokens from tensors still on the device (the tokens a step in flight, or a prefill
  pass, chose), so the engine can launch a step before reading the last one back. Every host-to-device copy is from
  pinned memory and launched before the pass: neither waits for the device.
- Attention itself is `serving.engine.attention`'s: SDPA over the KV bucket, or the flash kernel's
  variable-length form reading only each sequence's own K/V; both fold grouped-query heads so K/V
  are read once per KV head.
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from serving.engine.attention import Attention, AttentionShape, ChunkSpan, SdpaAttention
from serving.engine.interface import ModelLoadError
from serving.engine.scheduler import PrefillChunk
from serving.engine.transfer import to_device

logger = logging.getLogger("serving.engine")

KV_LEN_BUCKET = 256
"""Decode attends over the cache rounded up to a multiple of this (up to KV_LEN_LINEAR_MAX)..."""
KV_LEN_LINEAR_MAX = 2048
"""...and beyond it to the next power of two: at most 2x the attention reads, and a handful of shapes
(graphs) even for a 128k context."""
MIN_DEFAULT_MODEL_LEN = 4096
"""When the cache cannot give every slot the model's full context, keep at least this much per slot
(or the model's own limit) and run fewer slots instead."""


@dataclass(frozen=True)
class KVCachePlan:
    num_slots: int
    max_model_len: int


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


def model_context_len(hf_config) -> int:
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


def kv_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * head_dim * element


def kv_cache_budget_bytes(device: torch.device, hf_config, dtype: torch.dtype, *, memory_utilization: float,
                          num_slots: int, max_prefill_tokens: int, decode_graphs: bool = False) -> int:
    """Bytes the KV cache may take, measured after the weights are on the device."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        reserve = (512 << 20) + activation_reserve_bytes(hf_config, dtype, num_slots=num_slots,
                                                         max_prefill_tokens=max_prefill_tokens,
                                                         decode_graphs=decode_graphs)
        return int(total * memory_utilization - (total - free) - reserve)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * memory_utilization)


SAMPLING_BYTES_PER_LOGIT = 36
"""Bytes per float32 logit of a full decode batch: the step's logits (4) and, at the peak of sampling them
(`serving.engine.sampling.sample_tokens` with bans, temperature, top_p and seeds), the copy a selection of rows
makes (4), the banned copy (4), the probabilities (4), top-p's sorted values and int64 order (12), the mass before
each (4) and the mask (1): 33, with 3 to spare. A GPU test measures it."""


def activation_reserve_bytes(hf_config, dtype: torch.dtype, *, num_slots: int, max_prefill_tokens: int,
                             decode_graphs: bool) -> int:
    """Memory kept out of the KV cache for activations: one prefill chunk's, and the decode logits with what
    sampling them takes at its peak; with decode graphs also their private pool (the largest step's activations and
    logits) and static logits.

    Prefill attention runs in the flash kernel (no score matrix), so its activations scale with chunk
    tokens, not tokens^2.
    """
    element = torch.empty((), dtype=dtype).element_size()
    slots = max(num_slots, 1)
    per_token = (8 * hf_config.hidden_size + 4 * hf_config.intermediate_size) * element
    reserve = max_prefill_tokens * per_token + slots * hf_config.vocab_size * SAMPLING_BYTES_PER_LOGIT
    if decode_graphs:
        reserve += slots * (per_token + hf_config.vocab_size * (element + 4 + 4)) + (64 << 20)
    return reserve


def plan_kv_cache(*, bytes_per_token: int, budget_bytes: int, num_slots: int, max_model_len: int,
                  max_model_len_is_default: bool) -> KVCachePlan:
    """Fit num_slots x max_model_len into the budget: shorten a default context first, then drop slots."""
    capacity_tokens = max(budget_bytes, 0) // bytes_per_token
    if num_slots * max_model_len <= capacity_tokens:
        return KVCachePlan(num_slots, max_model_len)
    planned_len = max_model_len
    if max_model_len_is_default:
        floor = min(max_model_len, MIN_DEFAULT_MODEL_LEN)
        planned_len = max(floor, min(max_model_len, capacity_tokens // num_slots))
    planned_slots = min(num_slots, capacity_tokens // planned_len)
    if planned_slots < 1:
        raise ModelLoadError(
            f"the KV cache for one sequence of {planned_len} tokens needs "
            f"{planned_len * bytes_per_token / 2**30:.2f} GiB but only {max(budget_bytes, 0) / 2**30:.2f} GiB "
            "is left after the weights; lower max_model_len, raise gpu_memory_utilization, or use a larger GPU"
        )
    logger.warning(
        "KV cache budget %.2f GiB holds %d tokens, not %d slots x %d tokens: running %d slots x %d tokens",
        budget_bytes / 2**30, capacity_tokens, num_slots, max_model_len, planned_slots, planned_len,
    )
    return KVCachePlan(planned_slots, planned_len)


class ModelRunner:
    """Runs prefill chunks and batched decode steps of one HF causal LM over its own KV cache."""

    def __init__(self, model: torch.nn.Module, plan: KVCachePlan,
                 attention: Callable[[AttentionShape], Attention] = SdpaAttention) -> None:
        decoder = model.model
        self.model = model
        self.embed_tokens = decoder.embed_tokens
        self.layers = list(decoder.layers)
        self.norm = decoder.norm
        self.lm_head = model.lm_head
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
        self.num_kv_heads = model.config.num_key_value_heads
        self.vocab_size = model.config.vocab_size
        self.num_slots = plan.num_slots
        self.max_model_len = plan.max_model_len
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

        cache_shape = (len(self.layers), self.num_slots, self.max_model_len, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
        self._slot_rows = torch.arange(self.num_slots, device=self.device)
        self.attention_shape = AttentionShape(
            num_heads=model.config.num_attention_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            scale=self.scaling, num_slots=self.num_slots, max_model_len=self.max_model_len, device=self.device,
        )
        self.attention = attention(self.attention_shape)
        self.batch_buckets = _batch_buckets(self.num_slots)
        self.kv_len_buckets = kv_len_buckets(self.max_model_len)
        self.scratch_position = self.max_model_len - 1
        self.graphs = None

    @property
    def capacity_tokens(self) -> int:
        return self.num_slots * self.max_model_len

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[PrefillChunk]) -> torch.Tensor | None:
        """Run prompt chunks of several slots in one forward pass; return float32 logits [n, vocab] of the
        last token of each chunk that wants them (in order), or None when none does.

        Tokens of all chunks are packed into one row, so projections, norms, MLP and the K/V writes run once
        for the step whatever the number of prompts; attention reads each chunk's own slot.
        """
        inputs, wanted_rows, plan = self.prefill_inputs(chunks)
        hidden = self.embed_tokens(inputs[0:1])
        cos, sin = self.rotary_emb(hidden, inputs[1:2])
        for index, layer in enumerate(self.layers):
            residual = hidden
            query, key, value = self._project_qkv(layer.self_attn, layer.input_layernorm(hidden), cos, sin)
            self.k_cache[index][inputs[2], inputs[1]] = key[0]
            self.v_cache[index][inputs[2], inputs[1]] = value[0]
            attention = self.attention.prefill(query[0], self.k_cache[index], self.v_cache[index], plan)
            hidden = residual + layer.self_attn.o_proj(attention.unsqueeze(0))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        if wanted_rows is None:
            return None
        return self.lm_head(self.norm(hidden[0].index_select(0, wanted_rows))).float()

    def prefill_inputs(self, chunks: Sequence[PrefillChunk]) -> tuple[torch.Tensor, torch.Tensor | None, object]:
        """The host side of a prefill pass: the chunks' tokens, positions and slots packed into one [3, T] row on the
        device, the rows whose logits are wanted (or None), and attention's plan for the chunks."""
        token_ids = [token for chunk in chunks for token in chunk.token_ids]
        positions = [position for chunk in chunks for position in range(chunk.start, chunk.end)]
        slots = [chunk.slot for chunk in chunks for _ in chunk.token_ids]
        offsets = list(itertools.accumulate((len(chunk.token_ids) for chunk in chunks), initial=0))
        wanted = [last - 1 for chunk, last in zip(chunks, offsets[1:]) if chunk.want_logits]
        # Every host-to-device copy before the pass is launched: one after it would wait for the pass.
        inputs = to_device(torch.tensor([token_ids, positions, slots], dtype=torch.long), self.device)
        wanted_rows = to_device(torch.tensor(wanted, dtype=torch.long), self.device) if wanted else None
        plan = self.attention.prefill_plan([
            ChunkSpan(chunk.slot, first, last, chunk.start, chunk.end)
            for chunk, first, last in zip(chunks, offsets, offsets[1:])
        ])
        return inputs, wanted_rows, plan

    def decode(self, slots: list[int], token_ids: list[int], positions: list[int],
               carried: tuple[Sequence[torch.Tensor], list[int]] | None = None) -> torch.Tensor:
        """One decode step for the given slots; returns float32 logits [len(slots), vocab] in that order.

        Inputs are laid out by slot over the smallest bucket covering the highest slot; rows of slots
        not decoding write their K/V to the last cache position, which no sequence ever reads (the
        final token of a full-length sequence is sampled, never fed back).

        With `carried` = (sources, rows), the i-th slot's token is row `rows[i]` of the device tensors `sources`
        taken end to end, where `rows[i]` >= 0 (`token_ids[i]` is then ignored): tokens a step still in flight
        chose, gathered on the device, so the step can be launched before they are read back.
        """
        batch = next(size for size in self.batch_buckets if size > max(slots))
        kv_len = kv_len_bucket(max(positions) + 1, self.max_model_len)
        full = len(slots) == batch and slots == list(range(batch))  # the engine passes slots in order
        if full:
            rows = [token_ids, positions]
        else:
            rows = [[0] * batch, [self.scratch_position] * batch]
            for slot, token, position in zip(slots, token_ids, positions):
                rows[0][slot] = token
                rows[1][slot] = position
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
        # One copy, before the step is launched (see `to_device`).
        host = to_device(torch.tensor(rows, dtype=torch.long), self.device)
        inputs = host[:2]
        if carried is not None:
            tokens = torch.cat([*sources, host[0]]).index_select(0, host[2])
            inputs = torch.stack([tokens, host[1]])
        logits = (self.graphs if self.graphs is not None else self._decode_eager)(inputs, kv_len)
        return logits if full else logits[host[-1, : len(slots)]]

    def use_graphs(self, graphs) -> None:
        """Route decode steps through `graphs` (a `serving.engine.cuda_graphs.DecodeGraphs`), or eager (None)."""
        self.graphs = graphs

    def _decode_eager(self, inputs: torch.Tensor, kv_len: int) -> torch.Tensor:
        return self.decode_step(inputs[0], inputs[1], kv_len)

    def use_attention(self, attention: Attention) -> None:
        """Read the cache through `attention` from now on (decode graphs captured before must be recaptured)."""
        self.attention = attention

    @torch.inference_mode()
    def decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """The fixed-shape decode step: row i is slot i, feeding input_ids[i] at positions[i]."""
        batch = input_ids.shape[0]
        rows = self._slot_rows[:batch]
        hidden = self.embed_tokens(input_ids.unsqueeze(1))
        cos, sin = self.rotary_emb(hidden, positions.unsqueeze(1))
        # Rows of slots not decoding sit at the scratch position: they attend to one token, not a whole slot.
        lengths = torch.where(positions == self.scratch_position, 1, positions + 1).to(torch.int32)
        plan = self.attention.decode_plan(lengths, kv_len)
        for index, layer in enumerate(self.layers):
            residual = hidden
            query, key, value = self._project_qkv(layer.self_attn, layer.input_layernorm(hidden), cos, sin)
            self.k_cache[index][rows, positions] = key[:, 0]
            self.v_cache[index][rows, positions] = value[:, 0]
            attention = self.attention.decode(query[:, 0], self.k_cache[index], self.v_cache[index], plan)
            hidden = residual + layer.self_attn.o_proj(attention.unsqueeze(1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.lm_head(self.norm(hidden[:, 0])).float()

    def _project_qkv(self, attention, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Token-major [batch, tokens, heads, head_dim] queries, keys and values, RoPE applied."""
        batch, length, _ = hidden.shape
        shape = (batch, length, -1, self.head_dim)
        query = attention.q_proj(hidden).view(shape)
        key = attention.k_proj(hidden).view(shape)
        value = attention.v_proj(hidden).view(shape)
        if hasattr(attention, "q_norm"):
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key = self._apply_rotary(query, key, cos, sin, unsqueeze_dim=2)
        return query, key, value


def _batch_buckets(num_slots: int) -> list[int]:
    buckets = [1]
    while buckets[-1] < num_slots:
        buckets.append(min(buckets[-1] * 2, num_slots))
    return buckets
