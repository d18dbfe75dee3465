"""The paged KV cache end to end, on CPU float32 against `transformers`: sequences across block boundaries, a
deliberately tiny pool that forces preemption, prefix-cache hits that must change nothing but the work done, and a
differential random mix (shared prefixes, aborts, eviction under memory pressure) against one request at a time.

The block manager's and the scheduler's rules alone are in `test_block_manager.py`.
"""
from __future__ import annotations

import asyncio
import random

import pytest

from serving.engine import EngineConfig, LLMEngine, SamplingParams
from serving.engine.interface import ModelLoadError
from tests.serving.test_engine import (  # noqa: F401 - fixtures
    _random_mix,
    _ReadyNow,
    _run_mix,
    assert_mix_matches,
    collect,
    greedy,
    greedy_tokens,
    guard_kv_len,
    hf_greedy,
    hf_model,
    make_engine,
    random_prompt,
    request,
)

SHARED = random_prompt(40, seed=500)
"""A system prompt several requests start with: 2.5 blocks of 16, 10 of 4."""


def watch_prefill(engine: LLMEngine) -> list[tuple[int, int]]:
    """Record (start, end) of every prefill chunk the engine runs."""
    chunks: list[tuple[int, int]] = []
    prefill = engine.runner.prefill

    def watched(plan_chunks):
        chunks.extend((chunk.start, chunk.end) for chunk in plan_chunks)
        return prefill(plan_chunks)

    engine.runner.prefill = watched
    return chunks


def run_one_by_one(engine: LLMEngine, cases) -> list[tuple[list[int], str | None]]:
    """Start the engine and run each (request id, prompt, params) to its end before the next is sent."""

    async def main():
        await engine.start()
        return [await collect(engine.generate(request(name, prompt, params))) for name, prompt, params in cases]

    return asyncio.run(main())


def test_sequences_across_block_boundaries_match_hf_greedy(make_engine, hf_model):
    """Blocks of 4: prompts that end just before, on and just after a block's end, decoding through several blocks,
    joining a batch together."""
    engine = make_engine(max_num_seqs=6, block_size=4, max_prefill_tokens_per_step=8)
    cases = [(random_prompt(length, seed=600 + length), max_tokens)
             for length, max_tokens in [(3, 14), (4, 9), (5, 12), (8, 1), (15, 18), (17, 6)]]
    results = asyncio.run(greedy_tokens(engine, cases))
    for (prompt, max_tokens), tokens in zip(cases, results):
        assert tokens == hf_greedy(hf_model, prompt, max_tokens)


def test_a_cached_prefix_is_not_prefilled_again_and_changes_no_token(make_engine, hf_model):
    engine = make_engine(max_num_seqs=2, block_size=4, warmup_tokens=0)
    chunks = watch_prefill(engine)
    first, second = SHARED + random_prompt(5, seed=501), SHARED + random_prompt(7, seed=502)
    cases = [("first", first, greedy(12, ignore_eos=True)), ("second", second, greedy(12, ignore_eos=True)),
             ("again", first, greedy(12, ignore_eos=True))]
    results = run_one_by_one(engine, cases)
    for (_, prompt, params), (tokens, _) in zip(cases, results):
        assert tokens == hf_greedy(hf_model, prompt, params.max_tokens)
    # The first request prefills all of its 45 tokens, the second only past the shared 40, the third past its own
    # first 44 (its 45th token is computed again, for its logits).
    assert chunks == [(0, 45), (40, 47), (44, 45)]
    stats = engine.stats()
    assert stats.prefix_cache_queried_tokens_total == 45 + 47 + 45
    assert stats.prefix_cache_hit_tokens_total == 40 + 44


def test_seeded_sampling_and_greedy_are_the_same_with_prefix_caching_off_and_on(make_engine):
    cases = [(name, SHARED + random_prompt(3, seed=510 + index), params)
             for index, (name, params) in enumerate([
                 ("sampled", SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7)),
                 ("sampled-again", SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7)),
                 ("min-tokens", greedy(10, min_tokens=6)),
             ])]
    cases.append(("repeat", cases[0][1], cases[0][2]))
    off = run_one_by_one(make_engine(block_size=4, enable_prefix_caching=False), cases)
    on_engine = make_engine(block_size=4)
    on = run_one_by_one(on_engine, cases)
    assert on == off and on[0] == on[3]
    assert on_engine.stats().prefix_cache_hit_tokens_total >= 3 * 40


def test_a_pool_too_small_for_the_batch_preempts_and_every_request_still_gets_hfs_tokens(make_engine, hf_model):
    """12 blocks of 4 tokens for 4 requests that need up to 12 each: they are admitted while their prompts fit and
    preempted (recomputed later) as they grow; none fails or hangs, and each gets exactly HF's tokens."""
    engine = make_engine(max_num_seqs=4, block_size=4, num_kv_blocks=12, max_model_len=48)
    cases = [(random_prompt(length, seed=700 + length), max_tokens)
             for length, max_tokens in [(9, 30), (14, 25), (5, 35), (20, 20)]]
    results = asyncio.run(greedy_tokens(engine, cases))
    for (prompt, max_tokens), tokens in zip(cases, results):
        assert tokens == hf_greedy(hf_model, prompt, max_tokens)
    stats = engine.stats()
    assert stats.preemptions_total > 0 and stats.kv_cache_usage == 0.0


def test_seeded_sampling_under_preemption_matches_a_pool_with_room(make_engine):
    cases = [(f"s{index}", random_prompt(length, seed=720 + index),
              SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=0.95, seed=index, ignore_eos=True))
             for index, (length, max_tokens) in enumerate([(9, 30), (14, 25), (5, 35), (20, 20)])]

    def run(**overrides):
        engine = make_engine(max_num_seqs=4, block_size=4, max_model_len=48, **overrides)

        async def main():
            await engine.start()
            streams = [engine.generate(request(name, prompt, params)) for name, prompt, params in cases]
            return await asyncio.gather(*(collect(stream) for stream in streams))

        return asyncio.run(main()), engine.stats().preemptions_total

    roomy, none = run()
    tight, preempted = run(num_kv_blocks=12)
    assert none == 0 and preempted > 0 and tight == roomy


def test_a_pool_that_cannot_hold_one_sequence_is_refused_at_load(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="num_kv_blocks 3 x block_size 16 holds fewer tokens than one sequence"):
        LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(device="cpu", max_model_len=64, num_kv_blocks=3))
    with pytest.raises(ValueError, match="block_size: 12 is not one of"):
        EngineConfig(block_size=12)


@pytest.mark.parametrize("seed,slots,blocks,block_size", [(10, 4, 14, 8), (11, 6, 40, 4), (12, 3, 24, 4),
                                                           (13, 8, 10, 16)])
def test_a_random_mix_with_shared_prefixes_under_memory_pressure_matches_one_request_at_a_time(
        tiny_model_dir, seed, slots, blocks, block_size):
    """Differential: requests of every kind, half of them starting with one of two shared prefixes, into a pool too
    small for them (preemption, and cached prefixes evicted to make room), with prefix caching, run ahead as on CUDA,
    arriving at random moments, some aborted; each gets exactly what it gets alone, one step at a time, without
    prefix caching (an aborted one a prefix of it)."""
    rng = random.Random(seed)
    prefixes = [random_prompt(24, seed=seed * 7), random_prompt(33, seed=seed * 7 + 1)]
    requests = []
    for item in _random_mix(seed, 28, max_model_len=80):
        prompt = item.prompt_token_ids
        if rng.random() < 0.5:
            prompt = tuple(rng.choice(prefixes)) + prompt[:10]
        if len(prompt) + item.sampling.max_tokens <= 80:
            requests.append(request(item.request_id, prompt, item.sampling))

    def make(**overrides):
        engine = LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(device="cpu", dtype="float32", max_model_len=80,
                                                                       **overrides))
        guard_kv_len(engine.runner)
        asyncio.run(engine.start())
        return engine

    reference = make(overlap=False, max_num_seqs=1, enable_prefix_caching=False)
    try:
        alone = _run_mix(reference, requests)
    finally:
        asyncio.run(reference.shutdown())
    engine = make(overlap=True, max_num_seqs=slots, max_prefill_tokens_per_step=16, block_size=block_size,
                  num_kv_blocks=max(blocks, -(-80 // block_size)))
    aborts: set[str] = set()
    try:
        results = _run_mix(engine, requests, rng, aborts)
        stats = engine.stats()
    finally:
        asyncio.run(engine.shutdown())
    assert_mix_matches(requests, results, aborts, alone)
    assert stats.prefix_cache_hit_tokens_total > 0  # and, with these pools, preemptions:
    assert stats.preemptions_total > 0


def test_a_decode_step_gathering_in_groups_of_rows_matches_hf_greedy(make_engine, hf_model, monkeypatch):
    """A bound of 256 gathered tokens per group: every row of a 256-token bucket is attended in a group of its own,
    as a full batch over a long context's bucket would be; the tokens are HF's."""
    monkeypatch.setattr("serving.engine.attention.DECODE_GATHER_TOKENS", 256)
    engine = make_engine(max_num_seqs=4, block_size=8)
    cases = [(random_prompt(length, seed=800 + length), max_tokens)
             for length, max_tokens in [(5, 20), (30, 9), (12, 16)]]
    results = asyncio.run(greedy_tokens(engine, cases))
    for (prompt, max_tokens), tokens in zip(cases, results):
        assert tokens == hf_greedy(hf_model, prompt, max_tokens)
