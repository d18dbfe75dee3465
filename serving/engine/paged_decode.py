"""Decode attention that reads K/V in place through the block tables: a Triton kernel (split-K flash decoding).

PyTorch's flash kernel takes one contiguous K/V, so with the paged cache a decode step had to gather every row's
KV bucket into a copy first: per layer it read and wrote the bucket and then read it again, about three times the
bytes attention needs (docs/ENGINE_NOTES.md, v8 and v9). This kernel reads each row's blocks where they lie and only
up to the row's own length.

One program per (row, KV head, split): it loads the KV head's query heads ([GROUP_PAD, HEAD_DIM], padded to the
16 rows a tensor-core product needs), walks its share of the row's tokens TILE at a time, each token's block looked
up in the row's block table, and keeps a running max and sum (online softmax) so that scores are never written out.
When rows x KV heads are too few to fill the GPU (small batches, long contexts) each row's tokens are split across
several programs, each writing its normalised partial output and log-sum-exp; the partials are then merged in
float32 (a few small tensor ops: they are [B, heads, splits, head_dim]).

Every launch is fixed by the shapes of its tensors and by Python ints from the decode bucket, so a decode step that
calls it is captured into a CUDA graph like any other; the Triton compilation happens at the first (warm-up) call.

This module imports Triton, so `serving.engine.attention` imports it only when the kernel is asked for. The kernel is
jitted at its first call, for the mode Triton is in then: under `TRITON_INTERPRET=1` the same kernel runs on CPU
tensors in Triton's interpreter, which is how the CPU test suite checks it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import triton
import triton.language as tl

MIN_SPLIT_TOKENS = 256
"""A split covers at least this many tokens of the bucket: shorter ones cost more in merging than they gain."""


@dataclass(frozen=True)
class DecodeLaunch:
    """The launch shape of one decode bucket: how many programs share a row's tokens, each covering `split_len`."""

    num_splits: int
    split_len: int
    tile: int


def plan_launch(batch: int, num_kv_heads: int, kv_len: int, head_dim: int, multiprocessors: int) -> DecodeLaunch:
    """Split each row's K/V across programs only when rows x KV heads leave multiprocessors idle: aim for two
    programs per multiprocessor, never a split shorter than MIN_SPLIT_TOKENS."""
    tile = 64 if head_dim <= 128 else 32
    programs = batch * num_kv_heads
    splits = 1
    if programs < multiprocessors:
        splits = min(math.ceil(2 * multiprocessors / programs), max(1, kv_len // MIN_SPLIT_TOKENS))
    split_len = math.ceil(math.ceil(kv_len / splits) / tile) * tile
    return DecodeLaunch(num_splits=math.ceil(kv_len / split_len), split_len=split_len, tile=tile)


# The kernel's parameters are Any to mypy: Triton types them at each launch (pointers from the tensors, ints
# specialised by value), and a type annotation Triton knows (`tl.int32`, "*fp16", anything naming const) would change
# the compiled kernel, where `Any` is one it ignores. Inside, every value is a Triton tensor of Triton's untyped API.
def _paged_decode_kernel(
    q_ptr: Any, k_ptr: Any, v_ptr: Any, tables_ptr: Any, lengths_ptr: Any, out_ptr: Any, lse_ptr: Any,
    scale: Any,
    stride_q_row: Any, stride_q_head: Any,
    stride_k_block: Any, stride_k_token: Any, stride_k_head: Any,
    stride_table_row: Any,
    stride_out_row: Any, stride_out_head: Any, stride_out_split: Any,
    stride_lse_row: Any, stride_lse_head: Any,
    split_len: Any,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
) -> None:
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lengths_ptr + row)
    start = split * split_len
    end = tl.minimum(start + split_len, length)

    group = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    group_ok = group < GROUP
    dims_ok = dims < HEAD_DIM
    heads = kv_head * GROUP + group
    query = tl.load(q_ptr + row * stride_q_row + heads[:, None] * stride_q_head + dims[None, :],
                    mask=group_ok[:, None] & dims_ok[None, :], other=0.0)

    best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    offsets = tl.arange(0, TILE)
    for tile_start in range(start, end, TILE):
        positions = tile_start + offsets
        valid = positions < end
        blocks = tl.load(tables_ptr + row * stride_table_row + positions // BLOCK_SIZE, mask=valid, other=0)
        token_rows = (blocks.to(tl.int64) * stride_k_block + (positions % BLOCK_SIZE) * stride_k_token
                      + kv_head * stride_k_head)
        load_mask = valid[:, None] & dims_ok[None, :]
        keys = tl.load(k_ptr + token_rows[:, None] + dims[None, :], mask=load_mask, other=0.0)
        scores = tl.dot(query, tl.trans(keys)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        rescale = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best[:, None])
        total = total * rescale + tl.sum(weights, 1)
        values = tl.load(v_ptr + token_rows[:, None] + dims[None, :], mask=load_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(weights.to(values.dtype), values)
        best = new_best

    # A split past the row's length saw nothing: output 0 with log-sum-exp -inf, which the merge weighs at 0.
    seen = total > 0
    safe_total = tl.where(seen, total, 1.0)
    tl.store(out_ptr + row * stride_out_row + heads[:, None] * stride_out_head + split * stride_out_split
             + dims[None, :], acc / safe_total[:, None], mask=group_ok[:, None] & dims_ok[None, :])
    tl.store(lse_ptr + row * stride_lse_row + heads * stride_lse_head + split,
             tl.where(seen, best + tl.log(safe_total), float("-inf")), mask=group_ok)


@cache
def _kernel(interpret: bool) -> Any:
    """The jitted kernel, one per mode: Triton decides at `jit` time whether a function runs on the GPU or in its
    interpreter."""
    return triton.jit(_paged_decode_kernel)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return bool(triton.knobs.runtime.interpret)


def paged_decode(query: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, block_tables: torch.Tensor,
                 lengths: torch.Tensor, scale: float, launch: DecodeLaunch) -> torch.Tensor:
    """Attention of one query token per row over that row's cached tokens.

    `query` [B, heads, head_dim]; `k_blocks`/`v_blocks` one layer's cache [blocks, block_size, kv_heads, head_dim]
    (contiguous); `block_tables` int64 [B, W], row b's tokens in blocks block_tables[b, 0..]; `lengths` int32 [B],
    row b's valid tokens (at least 1, at most W x block_size). Returns [B, heads, head_dim] in the query's dtype.
    """
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_blocks.shape
    group = num_heads // num_kv_heads
    splits = launch.num_splits
    query = query.contiguous()
    if splits == 1:
        out = torch.empty(batch, num_heads, 1, head_dim, dtype=query.dtype, device=query.device)
    else:
        out = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=query.device)
    kernel = _kernel(interpreting())
    kernel[(batch, num_kv_heads, splits)](
        query, k_blocks, v_blocks, block_tables, lengths, out, lse,
        scale,
        query.stride(0), query.stride(1),
        k_blocks.stride(0), k_blocks.stride(1), k_blocks.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        launch.split_len,
        GROUP=group, GROUP_PAD=max(16, _next_power_of_two(group)), HEAD_DIM=head_dim,
        DIM_PAD=_next_power_of_two(head_dim), BLOCK_SIZE=block_size, TILE=launch.tile,
        num_warps=4,
    )
    if splits == 1:
        return out[:, :, 0]
    # Merge the splits: each partial is normalised over its own tokens, so weigh it by its share of the total mass.
    weights = torch.exp(lse - lse.amax(dim=2, keepdim=True))
    merged = (out * weights.unsqueeze(-1)).sum(dim=2) / weights.sum(dim=2).unsqueeze(-1)
    return merged.to(query.dtype)


def _next_power_of_two(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()
