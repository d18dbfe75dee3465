"""A CPU stand-in for `torch.ops.aten._flash_attention_forward`'s variable-length form, for testing the engine's
flash plumbing (cache layout, cumulative offsets, per-sequence lengths, grouped-query folding) without a GPU.

It computes what the kernel computes, one sequence at a time with plain matmuls, and refuses what the kernel
refuses (PyTorch's flash_api.cpp `mha_varlen_fwd`): a last dimension that is not contiguous, offsets or lengths
that are not contiguous int32 of the right shape, query heads not a multiple of KV heads. It also asserts what
the kernel silently relies on: `max_q` / `max_k` bound every sequence, and every sequence's K/V rows lie inside
`key`. Sequence b's keys are rows cu_seq_k[b] .. cu_seq_k[b] + seqused_k[b]; causal masking is aligned to the
bottom-right corner, as in flash-attention 2.1 and later.
"""
from __future__ import annotations

import torch


def _check_offsets(name: str, tensor: torch.Tensor, size: int) -> None:
    assert tensor.dtype == torch.int32, f"{name} must have dtype int32, not {tensor.dtype}"
    assert tensor.is_contiguous(), f"{name} must be contiguous"
    assert tuple(tensor.shape) == (size,), f"{name} must have shape ({size},), not {tuple(tensor.shape)}"


def flash_varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, dropout_p, is_causal,
                           return_debug_mask, *, scale=None, seqused_k=None, **unused):
    assert not unused, f"unexpected arguments {sorted(unused)}"
    assert dropout_p == 0.0 and not return_debug_mask
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        assert tensor.dim() == 3, f"{name} must be [total, heads, head_dim], not {tuple(tensor.shape)}"
        assert tensor.stride(-1) == 1, f"{name} must have a contiguous last dimension"
    assert key.shape == value.shape and key.dtype == value.dtype == query.dtype
    assert query.shape[2] == key.shape[2] and query.shape[1] % key.shape[1] == 0
    batch = cu_seq_q.numel() - 1
    _check_offsets("cu_seq_q", cu_seq_q, batch + 1)
    _check_offsets("cu_seq_k", cu_seq_k, batch + 1)
    if seqused_k is not None:
        _check_offsets("seqused_k", seqused_k, batch)
    group = query.shape[1] // key.shape[1]
    scale = query.shape[2] ** -0.5 if scale is None else scale
    out = torch.zeros_like(query)
    for b in range(batch):
        q_first, q_last = int(cu_seq_q[b]), int(cu_seq_q[b + 1])
        k_first = int(cu_seq_k[b])
        k_count = int(seqused_k[b]) if seqused_k is not None else int(cu_seq_k[b + 1]) - k_first
        q_count = q_last - q_first
        assert 0 < q_count <= max_q, f"sequence {b}: {q_count} query rows, max_q {max_q}"
        assert 0 < k_count <= max_k, f"sequence {b}: {k_count} keys, max_k {max_k}"
        assert 0 <= k_first and k_first + k_count <= key.shape[0], f"sequence {b}: keys outside the key tensor"
        q = query[q_first:q_last].transpose(0, 1).float()  # [heads, q, dim]
        k = key[k_first : k_first + k_count].transpose(0, 1).float().repeat_interleave(group, dim=0)
        v = value[k_first : k_first + k_count].transpose(0, 1).float().repeat_interleave(group, dim=0)
        scores = q @ k.transpose(1, 2) * scale
        if is_causal and max_q > 1:
            rows = torch.arange(q_count)[:, None]
            cols = torch.arange(k_count)[None, :]
            scores = scores.masked_fill(cols > rows + (k_count - q_count), float("-inf"))
        out[q_first:q_last] = (scores.softmax(-1) @ v).transpose(0, 1).to(query.dtype)
    empty = torch.empty(0)
    return out, empty, empty, empty, empty
