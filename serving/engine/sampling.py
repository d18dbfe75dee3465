"""Batched next-token sampling on the device.

Sampling never waits for the device (its few host-to-device copies are from pinned memory), so the engine can keep
the tokens on the device and launch the next step before reading them back.

One call samples a token for every row of a logits batch: greedy rows (temperature 0) take the argmax;
the others sample from temperature-scaled, top-p-filtered probabilities. Sampling uses the
exponential-race form (argmax of p / E with E ~ Exp(1)), which needs no normalisation and lets each
seeded request draw its noise from its own `torch.Generator`, so a seeded request gives the same tokens
whatever else shares its batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from serving.engine.transfer import to_device


@dataclass(frozen=True)
class RowSampling:
    """How to sample one row of a logits batch."""

    temperature: float
    top_p: float
    generator: torch.Generator | None
    """The request's own generator when it has a seed; None draws from the global generator."""
    banned_token_ids: tuple[int, ...] = ()
    """Tokens that must not be sampled at this step (EOS and stop tokens before min_tokens: `StopRule`)."""


def sample_tokens(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    """Sample one token id per row of float32 `logits` [batch, vocab]; returns a long tensor [batch]."""
    logits = _ban_tokens(logits, rows)
    greedy_tokens = logits.argmax(dim=-1)
    if all(row.temperature == 0 for row in rows):
        return greedy_tokens
    device = logits.device
    temperatures = to_device(torch.tensor([row.temperature for row in rows], dtype=torch.float32), device)
    greedy = temperatures == 0
    probs = torch.softmax(logits / torch.where(greedy, 1.0, temperatures).unsqueeze(1), dim=-1)
    if any(row.top_p < 1.0 for row in rows):
        top_p = to_device(torch.tensor([row.top_p for row in rows], dtype=torch.float32), device)
        probs = _top_p_filter(probs, top_p)
    noise = torch.empty_like(probs).exponential_()
    for index, row in enumerate(rows):
        if row.generator is not None:
            noise[index].exponential_(generator=row.generator)
    sampled_tokens = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, greedy_tokens, sampled_tokens)


def _ban_tokens(logits: torch.Tensor, rows: Sequence[RowSampling]) -> torch.Tensor:
    row_index = [index for index, row in enumerate(rows) for _ in row.banned_token_ids]
    if not row_index:
        return logits
    token_index = [token for row in rows for token in row.banned_token_ids]
    banned = to_device(torch.tensor([row_index, token_index]), logits.device)
    return logits.index_put((banned[0], banned[1]), torch.full((), float("-inf"), device=logits.device))


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token outside the smallest set whose mass reaches top_p (the top token always stays). Works in
    `probs` and its sorted copy, in place, so a full batch's sampling peaks low
    (`serving.engine.model_runner.SAMPLING_BYTES_PER_LOGIT`)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1).sub_(sorted_probs)
    sorted_probs.masked_fill_(mass_before > top_p.unsqueeze(1), 0.0)
    return probs.zero_().scatter_(-1, order, sorted_probs)
