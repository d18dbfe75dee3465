"""LLMEngine against `transformers` on tiny random models (CPU, float32), plus one GPU bf16 check.

Greedy outputs must equal HF `generate(do_sample=False)` token for token under every batching
situation the engine creates (concurrency, joining mid-batch, aborts, chunked prefill), and one decode
step's logits must equal HF's eager forward. pytest-asyncio is not used: each test drives its own
`asyncio.run`.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import threading
import time
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM

from serving.engine import (
    EngineConfig,
    EngineDeadError,
    GenerationRequest,
    LLMEngine,
    QueueFullError,
    SamplingParams,
)
from serving.engine.cuda_graphs import DecodeGraphs, capture_decode_graphs
from serving.engine.model_runner import (
    KVCachePlan,
    PrefillChunk,
    activation_reserve_bytes,
    kv_len_bucket,
    kv_len_buckets,
    model_context_len,
    plan_kv_cache,
)
from serving.engine.sampling import RowSampling, sample_tokens

EOS = 4  # <|im_end|> in the tiny tokenizer
EOS_PROMPT = (5, 6, 7, 8, 9)
"""Greedy decoding of this prompt emits EOS as its 6th token on the tiny model."""
EOS_PROMPT_GREEDY = [205, 180, 107, 373, 275, EOS, 2, 367, 148, 108]


# ----------------------------------------------------------------------------- helpers and fixtures


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


def request(request_id: str, prompt, params: SamplingParams) -> GenerationRequest:
    return GenerationRequest(request_id, tuple(prompt), params)


async def collect(stream) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    reason = None
    async for output in stream:
        tokens += output.token_ids
        reason = output.finish_reason
    return tokens, reason


async def greedy_tokens(engine, cases, *, shutdown: bool = False) -> list[list[int]]:
    """Start the engine, run every (prompt, max_tokens) case at once, greedy with ignore_eos; each case's tokens.
    With `shutdown`, the engine is shut down afterwards whatever happens."""
    await engine.start()
    try:
        streams = [engine.generate(request(f"r{i}", prompt, greedy(max_tokens, ignore_eos=True)))
                   for i, (prompt, max_tokens) in enumerate(cases)]
        return [tokens for tokens, _ in await asyncio.gather(*(collect(stream) for stream in streams))]
    finally:
        if shutdown:
            await engine.shutdown()


def random_prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, 384, (length,), generator=generator).tolist()


def load_hf(model_dir) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True, attn_implementation="eager"
    ).eval()
    model.generation_config.eos_token_id = None  # compare exact lengths; EOS is tested separately
    return model


def hf_greedy(model, prompt, max_new_tokens: int, **kwargs) -> list[int]:
    with torch.no_grad():
        output = model.generate(torch.tensor([list(prompt)]), do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=2, **kwargs)
    return output[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return load_hf(tiny_model_dir)


@pytest.fixture(params=[False, True], ids=["one-step-at-a-time", "overlap"])
def make_engine(tiny_model_dir, request):
    """Engines on CPU, float32. Every test runs twice: stepping one step at a time (CPU's default) and with the
    overlap of host and device work that CUDA gets by default (run-ahead decode steps, outputs sent a step later)."""
    engines: list[LLMEngine] = []

    def make(model_dir=None, **overrides) -> LLMEngine:
        overrides.setdefault("overlap", request.param)
        config = EngineConfig(device="cpu", dtype="float32", **overrides)
        engine = LLMEngine.from_model_dir(model_dir or tiny_model_dir, config)
        guard_kv_len(engine.runner)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        asyncio.run(engine.shutdown())


def guard_kv_len(runner) -> None:
    """Every decode step must attend over a KV bucket holding each row's whole sequence (a step one token short would
    still give the tiny model's argmax most of the time, and the flash kernel would be handed lengths beyond its
    bound): checked in every step, eager or recorded as a graph, failing the loop if not."""
    decode_step = runner.decode_step

    def checked(input_ids, positions, cache_rows, block_tables, kv_len):
        assert int(positions.max()) < kv_len, f"position {int(positions.max())} outside kv_len {kv_len}"
        assert block_tables.shape[1] * runner.block_size == kv_len, "a block table that does not cover kv_len"
        return decode_step(input_ids, positions, cache_rows, block_tables, kv_len)

    runner.decode_step = checked


def slot_table(runner, slot: int) -> list[int]:
    """A block table for a runner driven by hand: slot's share of the pool, in reverse, so that a sequence's blocks
    are neither contiguous nor in order."""
    per = runner.max_blocks_per_seq
    return list(range((slot + 1) * per - 1, slot * per - 1, -1))


def chunk(runner, slot: int, token_ids, start: int, want_logits: bool = False) -> PrefillChunk:
    return PrefillChunk(slot, token_ids, start, want_logits, slot_table(runner, slot))


def record_decode_batches(engine: LLMEngine, delay_s: float = 0.0) -> list[list[int]]:
    """Record the slots of every decode step; a small delay keeps streams alive long enough to overlap."""
    batches: list[list[int]] = []
    original = engine.runner.decode

    def decode(slots, token_ids, positions, carried=None, block_tables=()):
        batches.append(list(slots))
        if delay_s:
            time.sleep(delay_s)
        return original(slots, token_ids, positions, carried, block_tables)

    engine.runner.decode = decode
    return batches


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# ----------------------------------------------------------------------------- greedy equivalence


def test_single_request_matches_hf_greedy(make_engine, hf_model):
    engine = make_engine()
    prompt = random_prompt(12, seed=1)

    async def main():
        await engine.start()
        return await collect(engine.generate(request("one", prompt, greedy(24, ignore_eos=True))))

    tokens, reason = asyncio.run(main())
    assert tokens == hf_greedy(hf_model, prompt, 24)
    assert reason == "length"


def test_concurrent_requests_of_different_lengths_match_hf_greedy(make_engine, hf_model):
    engine = make_engine(max_num_seqs=4)
    cases = [(random_prompt(length, seed=length), max_tokens)
             for length, max_tokens in [(3, 30), (9, 7), (17, 25), (40, 12), (64, 19), (1, 16)]]

    async def main():
        await engine.start()
        streams = [engine.generate(request(f"r{i}", prompt, greedy(max_tokens, ignore_eos=True)))
                   for i, (prompt, max_tokens) in enumerate(cases)]
        return await asyncio.gather(*(collect(stream) for stream in streams))

    batches = record_decode_batches(engine)
    results = asyncio.run(main())
    for (prompt, max_tokens), (tokens, reason) in zip(cases, results):
        assert tokens == hf_greedy(hf_model, prompt, max_tokens)
        assert reason == "length"
    # Six requests over four slots: decode really batched them, and never beyond the slot count.
    assert max(len(batch) for batch in batches) == 4


def test_request_joining_mid_batch_matches_hf_greedy(make_engine, hf_model):
    engine = make_engine()
    first_prompt, late_prompt = random_prompt(10, seed=2), random_prompt(21, seed=3)

    async def main():
        await engine.start()
        first = engine.generate(request("first", first_prompt, greedy(120, ignore_eos=True)))
        first_tokens: list[int] = []
        async for output in first:
            first_tokens += output.token_ids
            if len(first_tokens) >= 5:
                break
        late = asyncio.create_task(collect(engine.generate(request("late", late_prompt, greedy(20, ignore_eos=True)))))
        rest, _ = await collect(first)
        return first_tokens + rest, (await late)[0]

    batches = record_decode_batches(engine, delay_s=0.002)
    first_tokens, late_tokens = asyncio.run(main())
    assert first_tokens == hf_greedy(hf_model, first_prompt, 120)
    assert late_tokens == hf_greedy(hf_model, late_prompt, 20)
    assert any(len(batch) == 2 for batch in batches), "the late request never decoded alongside the first"


def test_abort_mid_stream_leaves_other_requests_exact(make_engine, hf_model):
    engine = make_engine()
    prompts = [random_prompt(length, seed=10 + length) for length in (6, 13, 30)]

    async def main():
        await engine.start()
        kept = [asyncio.create_task(collect(engine.generate(request(f"keep{i}", prompt, greedy(60, ignore_eos=True)))))
                for i, prompt in enumerate(prompts)]
        victim = engine.generate(request("victim", random_prompt(8, seed=99), greedy(200, ignore_eos=True)))
        received = 0
        async for output in victim:
            received += len(output.token_ids)
            if received >= 3:
                break
        await victim.aclose()
        results = [await task for task in kept]
        await wait_until(lambda: engine.stats().running == 0)
        return received, results

    record_decode_batches(engine, delay_s=0.002)
    received, results = asyncio.run(main())
    assert received < 200
    for prompt, (tokens, reason) in zip(prompts, results):
        assert tokens == hf_greedy(hf_model, prompt, 60)
        assert reason == "length"
    assert engine.stats().generation_tokens_total < 3 * 60 + 200


def test_long_prompt_prefilled_in_chunks_matches_hf_greedy(make_engine, hf_model):
    engine = make_engine(max_prefill_tokens_per_step=16)
    long_prompt, short_prompt = random_prompt(150, seed=4), random_prompt(5, seed=5)
    chunk_sizes: list[int] = []
    original_prefill = engine.runner.prefill

    def prefill(chunks):
        chunk_sizes.append(sum(len(chunk.token_ids) for chunk in chunks))
        return original_prefill(chunks)

    engine.runner.prefill = prefill

    async def main():
        await engine.start()
        chunk_sizes.clear()
        short = engine.generate(request("short", short_prompt, greedy(30, ignore_eos=True)))
        long = engine.generate(request("long", long_prompt, greedy(20, ignore_eos=True)))
        return await asyncio.gather(collect(short), collect(long))

    (short_tokens, _), (long_tokens, _) = asyncio.run(main())
    assert long_tokens == hf_greedy(hf_model, long_prompt, 20)
    assert short_tokens == hf_greedy(hf_model, short_prompt, 30)
    assert max(chunk_sizes) == 16 and sum(chunk_sizes) == 155  # 150 + 5 prompt tokens, in 16-token chunks


def test_decode_step_logits_match_hf_eager_forward(make_engine, hf_model):
    engine = make_engine(max_num_seqs=4)
    runner = engine.runner
    prompts = {0: random_prompt(7, seed=6), 2: random_prompt(33, seed=7), 3: random_prompt(2, seed=8)}
    next_tokens = {slot: hf_greedy(hf_model, prompt, 1)[0] for slot, prompt in prompts.items()}
    for start in range(0, 33, 12):  # chunked prefill, chunks of several prompts in one forward pass
        runner.prefill([chunk(runner, slot, prompt[start:start + 12], start)
                        for slot, prompt in prompts.items() if start < len(prompt)])
    # Slot 1 is mid-prefill: the decode step's padding row for it must not corrupt its cache.
    half_prefilled = random_prompt(20, seed=9)
    runner.prefill([chunk(runner, 1, half_prefilled[:10], 0)])

    slots = sorted(prompts)
    logits = runner.decode(slots, [next_tokens[s] for s in slots], [len(prompts[s]) for s in slots],
                             block_tables=[slot_table(runner, s) for s in slots])
    with torch.no_grad():
        for row, slot in enumerate(slots):
            expected = hf_model(torch.tensor([prompts[slot] + [next_tokens[slot]]])).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)
        finished = runner.prefill([chunk(runner, 1, half_prefilled[10:], 10, want_logits=True)])
        torch.testing.assert_close(finished[0], hf_model(torch.tensor([half_prefilled])).logits[0, -1],
                                   rtol=1e-4, atol=1e-4)


def test_one_prefill_pass_over_several_prompts_matches_hf_logits(make_engine, hf_model):
    """First chunks, later chunks and finishing chunks of different prompts share one forward pass."""
    runner = make_engine(max_num_seqs=4).runner
    prompts = {0: random_prompt(30, seed=20), 1: random_prompt(5, seed=21), 3: random_prompt(17, seed=22)}
    runner.prefill([chunk(runner, 0, prompts[0][:20], 0), chunk(runner, 3, prompts[3][:4], 0)])
    logits = runner.prefill([chunk(runner, 3, prompts[3][4:], 4, want_logits=True),
                             chunk(runner, 0, prompts[0][20:25], 20),
                             chunk(runner, 1, prompts[1], 0, want_logits=True)])
    assert runner.prefill([chunk(runner, 0, prompts[0][25:], 25)]) is None
    with torch.no_grad():
        for row, slot in enumerate((3, 1)):
            expected = hf_model(torch.tensor([prompts[slot]])).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4)
        # Slot 0's cache holds its whole prompt: the next decode step continues it exactly.
        next_token = hf_greedy(hf_model, prompts[0], 1)[0]
        decoded = runner.decode([0], [next_token], [30], block_tables=[slot_table(runner, 0)])
        torch.testing.assert_close(decoded[0], hf_model(torch.tensor([prompts[0] + [next_token]])).logits[0, -1],
                                   rtol=1e-4, atol=1e-4)


def _tiny_variant(tiny_model_dir, target, config_class: str, model_class: str, **config_overrides):
    """Another architecture with the tiny tokenizer: exercises q/k norms, attention bias, rope scaling, tying."""
    import transformers

    base = transformers.AutoConfig.from_pretrained(tiny_model_dir)
    config = getattr(transformers, config_class)(
        vocab_size=base.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
        bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id,
        **config_overrides,
    )
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, target / name)
    return target


@pytest.mark.parametrize(
    "config_class, model_class, overrides",
    [
        ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
        ("Qwen2Config", "Qwen2ForCausalLM", {}),
        ("LlamaConfig", "LlamaForCausalLM", {
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 32},
        }),
        ("MistralConfig", "MistralForCausalLM", {"sliding_window": 128}),
    ],
    ids=["qwen3-qk-norm", "qwen2-attention-bias", "llama3-rope-tied", "mistral-sliding-window"],
)
def test_other_architectures_match_hf_greedy(make_engine, tiny_model_dir, tmp_path, config_class, model_class,
                                             overrides):
    model_dir = _tiny_variant(tiny_model_dir, tmp_path / "variant", config_class, model_class, **overrides)
    engine = make_engine(model_dir=model_dir, max_prefill_tokens_per_step=8)
    reference = load_hf(model_dir)
    prompts = [random_prompt(19, seed=20), random_prompt(4, seed=21)]

    async def main():
        await engine.start()
        streams = [engine.generate(request(f"r{i}", p, greedy(16, ignore_eos=True))) for i, p in enumerate(prompts)]
        return await asyncio.gather(*(collect(stream) for stream in streams))

    results = asyncio.run(main())
    for prompt, (tokens, _) in zip(prompts, results):
        assert tokens == hf_greedy(reference, prompt, 16)
    if "sliding_window" in overrides:
        assert engine.model_info.max_model_len == 128  # capped to the window, where full attention is exact


# ----------------------------------------------------------------------------- sampling and finish reasons


def test_seeded_sampling_is_reproducible_and_seed_dependent(make_engine):
    engine = make_engine()
    prompt = random_prompt(6, seed=30)

    def sampled(request_id: str, seed: int | None) -> GenerationRequest:
        return request(request_id, prompt, SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=seed,
                                                          ignore_eos=True))

    async def main():
        await engine.start()
        alone = await collect(engine.generate(sampled("alone", 1)))
        # The same seed inside a busy batch must give the same tokens as alone.
        batch = await asyncio.gather(*(collect(engine.generate(sampled(f"b{i}", seed)))
                                       for i, seed in enumerate([1, 2, None, 1])))
        greedy_tokens = await collect(engine.generate(request("greedy", prompt, greedy(20, ignore_eos=True))))
        return alone[0], [tokens for tokens, _ in batch], greedy_tokens[0]

    alone, (same_1, seed_2, unseeded, same_1_again), greedy_tokens = asyncio.run(main())
    assert len(alone) == 20
    assert alone == same_1 == same_1_again
    assert seed_2 != alone
    assert alone != greedy_tokens and unseeded != greedy_tokens


def test_min_tokens_suppresses_eos_like_hf(make_engine, tiny_model_dir):
    engine = make_engine()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, local_files_only=True)

    async def main():
        await engine.start()
        plain = await collect(engine.generate(request("plain", EOS_PROMPT, greedy(30))))
        held = await collect(engine.generate(request("held", EOS_PROMPT, greedy(30, min_tokens=10))))
        return plain, held

    (plain_tokens, plain_reason), (held_tokens, held_reason) = asyncio.run(main())
    # Without min_tokens, EOS at the 6th token ends the stream and is not part of the output.
    assert (plain_tokens, plain_reason) == (EOS_PROMPT_GREEDY[:5], "stop")
    hf_tokens = hf_greedy(reference, EOS_PROMPT, 30, min_new_tokens=10, eos_token_id=EOS)
    assert EOS not in held_tokens[:10] and len(held_tokens) >= 10
    assert held_tokens == [t for t in hf_tokens if t != EOS]
    assert held_reason == ("stop" if hf_tokens[-1] == EOS else "length")


@pytest.mark.parametrize("prompt", [[288], [99, 72, 134, 337, 57], [273], list(EOS_PROMPT)],
                         ids=["eos-first", "eos-second", "eos-third", "eos-sixth"])
def test_min_tokens_bans_eos_up_to_exactly_its_index_like_hf_in_a_shared_batch(make_engine, hf_model, prompt):
    """Prompts whose greedy EOS comes at index 0, 1, 2 and 5, each with min_tokens 1, 2, 3 and 6 in one batch beside
    another stream: the ban lifts at exactly HF's index, for the prefill's first token and for decoded ones, on the
    host and (overlap) on the device."""
    engine = make_engine(max_num_seqs=4)
    floors = [1, 2, 3, 6]

    async def main():
        await engine.start()
        streams = [engine.generate(request(f"m{floor}", prompt, greedy(12, min_tokens=floor))) for floor in floors]
        streams.append(engine.generate(request("other", random_prompt(9, seed=1), greedy(20, ignore_eos=True))))
        return await asyncio.gather(*(collect(stream) for stream in streams))

    results = asyncio.run(main())
    for floor, (tokens, _) in zip(floors, results):
        expected = hf_greedy(hf_model, prompt, 12, min_new_tokens=floor, eos_token_id=EOS)
        assert tokens == [token for token in expected if token != EOS], floor


def test_ignore_eos_generates_exactly_max_tokens_through_eos(make_engine):
    engine = make_engine()

    async def main():
        await engine.start()
        return await collect(engine.generate(request("r", EOS_PROMPT, greedy(10, ignore_eos=True))))

    assert asyncio.run(main()) == (EOS_PROMPT_GREEDY, "length")


def test_stop_token_ids_and_max_tokens_set_finish_reasons(make_engine):
    engine = make_engine()
    stop_token = EOS_PROMPT_GREEDY[2]

    async def main():
        await engine.start()
        stopped = await collect(engine.generate(request("stop", EOS_PROMPT, greedy(30, stop_token_ids=(stop_token,)))))
        capped = await collect(engine.generate(request("cap", EOS_PROMPT, greedy(3))))
        return stopped, capped

    stopped, capped = asyncio.run(main())
    assert stopped == (EOS_PROMPT_GREEDY[:2], "stop")
    assert capped == (EOS_PROMPT_GREEDY[:3], "length")


def test_sampler_top_p_and_banned_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 4.9]])
    generator = torch.Generator().manual_seed(0)
    # A tiny top_p keeps only the most likely token, so sampling at any temperature is the argmax.
    tight = [RowSampling(temperature=5.0, top_p=1e-6, generator=generator)] * 2
    for _ in range(20):
        assert sample_tokens(logits, tight).tolist() == [1, 0]
    banned = [RowSampling(temperature=0.0, top_p=1.0, generator=None, banned_token_ids=(1,)),
              RowSampling(temperature=0.0, top_p=1.0, generator=None, banned_token_ids=(0, 3))]
    assert sample_tokens(logits, banned).tolist() == [2, 1]


# ----------------------------------------------------------------------------- queueing, aborts, failures


def test_queue_full_raises_at_submit_and_queued_requests_still_complete(make_engine):
    engine = make_engine(max_num_seqs=1, max_waiting=2, warmup_tokens=0)

    async def main():
        # Not started yet, so nothing leaves the waiting queue.
        first = engine.generate(request("a", EOS_PROMPT, greedy(4)))
        second = engine.generate(request("b", EOS_PROMPT, greedy(4)))
        with pytest.raises(QueueFullError, match="2 requests are already waiting"):
            engine.generate(request("c", EOS_PROMPT, greedy(4)))
        assert engine.stats().waiting == 2
        await engine.start()
        return await asyncio.gather(collect(first), collect(second))

    assert asyncio.run(main()) == [(EOS_PROMPT_GREEDY[:4], "length")] * 2


@pytest.mark.parametrize("how", ["aclose", "abort", "cancel", "garbage-collected"])
def test_stopping_a_stream_early_frees_its_slot(make_engine, how):
    engine = make_engine(max_num_seqs=2)

    async def main():
        await engine.start()
        params = greedy(200, ignore_eos=True)
        stream = engine.generate(request("r", random_prompt(8, seed=40), params))
        if how == "aclose":
            await stream.__anext__()
            await stream.aclose()
        elif how == "abort":
            await stream.__anext__()
            engine.abort("r")
            tokens, reason = await collect(stream)
            assert reason == "abort"
        elif how == "cancel":
            task = asyncio.create_task(collect(stream))
            await wait_until(lambda: engine.stats().running == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await wait_until(lambda: engine.stats().running == 1)
            del stream
            gc.collect()
        await wait_until(lambda: engine.stats().running == 0)
        stats = engine.stats()
        assert stats.kv_cache_usage == 0.0 and stats.waiting == 0
        assert stats.generation_tokens_total < 200
        # The id is free again and the engine still serves.
        return await collect(engine.generate(request("r", EOS_PROMPT, greedy(3))))

    record_decode_batches(engine, delay_s=0.002)
    assert asyncio.run(main()) == (EOS_PROMPT_GREEDY[:3], "length")


def test_kv_cache_accounting_follows_every_token_through_joins_stops_aborts_and_chunks(make_engine):
    """The block manager keeps its count of blocks in use as they change (not recounted each step): at every emission
    it equals the blocks the running sequences' tables hold, through chunked prefill, EOS stops, length stops, aborts
    mid-prefill and mid-decode, and requests joining; and it is 0 when all is done."""
    engine = make_engine(max_num_seqs=3, max_prefill_tokens_per_step=16)
    scheduler = engine.scheduler
    checked = []  # (kept count, recounted) at every emission; compared after the run, not in the loop thread
    original_emit = engine._emit

    def emit(seqs):
        checked.append((scheduler.cache.num_used_blocks,
                        len({block for seq in scheduler.running for block in seq.block_table})))
        return original_emit(seqs)

    engine._emit = emit
    prefill = engine.runner.prefill
    cached_when_aborted = []

    def prefill_then_abort(chunks):
        # From the loop thread, once part of this prompt is in the cache: an abort in the middle of its prefill.
        seq = engine._live.get("aborted-in-prefill")
        if seq is not None and 0 < seq.num_cached < len(seq.prompt) and not cached_when_aborted:
            cached_when_aborted.append(seq.num_cached)
            engine.abort("aborted-in-prefill")
        return prefill(chunks)

    engine.runner.prefill = prefill_then_abort

    async def main():
        await engine.start()
        streams = [engine.generate(request("eos", EOS_PROMPT, greedy(30))),
                   engine.generate(request("long", random_prompt(70, seed=90), greedy(12, ignore_eos=True))),
                   engine.generate(request("aborted-in-prefill", random_prompt(90, seed=91), greedy(5))),
                   engine.generate(request("aborted-decoding", random_prompt(5, seed=92), greedy(200, ignore_eos=True))),
                   engine.generate(request("joins", random_prompt(20, seed=93), greedy(9, ignore_eos=True)))]
        decoding = asyncio.create_task(collect(streams[3]))
        await wait_until(lambda: len(engine._live.get("aborted-decoding").output_ids) >= 3)
        engine.abort("aborted-decoding")
        results = await asyncio.gather(*(collect(stream) for i, stream in enumerate(streams) if i != 3))
        return results + [await decoding]

    results = asyncio.run(main())
    assert [reason for _, reason in results] == ["stop", "length", "abort", "length", "abort"]
    assert cached_when_aborted and 0 < cached_when_aborted[0] < 90
    assert [kept for kept, _ in checked] == [recounted for _, recounted in checked]
    assert max(kept for kept, _ in checked) > 0 and scheduler.cache.num_used_blocks == 0
    assert engine.stats().kv_cache_usage == 0.0


def test_a_finished_requests_last_output_arrives_when_every_other_request_is_aborted_before_the_next_step(
        make_engine):
    """A request ends in a step after which another keeps decoding, so its last output waits to go out during the
    next step; that other request is aborted before there is one. The last output must not wait for new work."""
    engine = make_engine(max_num_seqs=2)
    update = engine.scheduler.update

    def update_then_abort_b(rows, sampled):  # in the loop thread, within the step in which "a" ends
        ended = update(rows, sampled)
        if any(seq.request_id == "a" and seq.finished for seq in rows):
            engine.abort("b")
        return ended

    engine.scheduler.update = update_then_abort_b

    async def main():
        await engine.start()
        # "b" first: were "a" first, the loop could run its three steps before "b" is submitted (a busy machine
        # can take the GIL from this thread that long), and aborting a "b" not yet known would do nothing.
        b = engine.generate(request("b", random_prompt(4, seed=2), greedy(200, ignore_eos=True)))
        a = engine.generate(request("a", random_prompt(4, seed=1), greedy(3, ignore_eos=True)))
        return await asyncio.wait_for(asyncio.gather(collect(a), collect(b)), 10)

    (a_tokens, a_reason), (_, b_reason) = asyncio.run(main())
    assert len(a_tokens) == 3 and a_reason == "length" and b_reason == "abort"


def test_loop_crash_fails_pending_and_new_requests(make_engine, caplog):
    engine = make_engine()

    def broken_decode(slots, token_ids, positions, carried=None, block_tables=()):
        raise RuntimeError("injected decode failure")

    async def main():
        await engine.start()
        assert engine.stats().loop_alive
        engine.runner.decode = broken_decode
        streams = [engine.generate(request(f"r{i}", EOS_PROMPT, greedy(5))) for i in range(3)]
        for stream in streams:
            with pytest.raises(EngineDeadError, match="injected decode failure"):
                await collect(stream)
        await wait_until(lambda: not engine.stats().loop_alive)
        with pytest.raises(EngineDeadError, match="has died"):
            engine.generate(request("late", EOS_PROMPT, greedy(5)))

    with caplog.at_level(logging.ERROR, logger="serving.engine"):
        asyncio.run(main())
    crash_logs = [record for record in caplog.records if record.exc_info]
    assert len(crash_logs) == 1 and "injected decode failure" in caplog.text
    assert engine.stats().loop_alive is False


def test_invalid_requests_are_rejected_with_clear_messages(make_engine):
    engine = make_engine(max_model_len=64)

    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            engine.generate(request("empty", (), greedy(4)))
        with pytest.raises(ValueError, match=r"prompt \(60 tokens\) plus max_tokens \(5\) is 65 tokens, more than "
                                             r"this model's context of 64"):
            engine.generate(request("long", [5] * 60, greedy(5)))
        with pytest.raises(ValueError, match=r"token id 384, outside this model's vocabulary \[0, 384\)"):
            engine.generate(request("oov", [5, 384], greedy(5)))
        with pytest.raises(ValueError, match="already running"):
            engine.generate(request("dup", [5], greedy(5)))
            engine.generate(request("dup", [5], greedy(5)))

    asyncio.run(main())
    assert engine.model_info.max_model_len == 64 and engine.stats().kv_cache_capacity_tokens == 8 * 64  # 8 rows of the context, in blocks


def test_shutdown_ends_streams_with_abort_and_rejects_new_requests(make_engine):
    engine = make_engine()

    async def main():
        await engine.start()
        stream = engine.generate(request("r", random_prompt(8, seed=41), greedy(200, ignore_eos=True)))
        await stream.__anext__()
        await engine.shutdown()
        _, reason = await collect(stream)
        assert reason == "abort"
        with pytest.raises(EngineDeadError, match="shutting down"):
            engine.generate(request("late", EOS_PROMPT, greedy(2)))
        assert not engine.stats().loop_alive

    record_decode_batches(engine, delay_s=0.002)
    asyncio.run(main())


# ----------------------------------------------------------------------------- sizing


def test_kv_cache_plan_takes_blocks_for_every_row_at_full_context_or_what_the_budget_holds():
    fits = plan_kv_cache(bytes_per_token=1, budget_bytes=64 * 8192 * 2, num_slots=64, max_model_len=8192,
                         max_model_len_is_default=True)
    assert fits == KVCachePlan(64, 8192, num_blocks=64 * 512, block_size=16)  # no more than the rows can use
    # A budget under that keeps every row (requests are admitted by blocks) and the whole default context while
    # one sequence of it fits...
    partial = plan_kv_cache(bytes_per_token=1, budget_bytes=64 * 5000, num_slots=64, max_model_len=131072,
                            max_model_len_is_default=True)
    assert partial == KVCachePlan(64, 131072, num_blocks=20000, block_size=16)
    # ...and shortens a default context to what the budget holds, not below 4096.
    shortened = plan_kv_cache(bytes_per_token=1, budget_bytes=10 * 4096, num_slots=64, max_model_len=131072,
                              max_model_len_is_default=True)
    assert shortened == KVCachePlan(64, 40960, num_blocks=2560, block_size=16)
    explicit = plan_kv_cache(bytes_per_token=1, budget_bytes=3 * 32768, num_slots=64, max_model_len=32768,
                             max_model_len_is_default=False, block_size=32)
    assert explicit == KVCachePlan(64, 32768, num_blocks=3072, block_size=32)
    from serving.engine.interface import ModelLoadError

    with pytest.raises(ModelLoadError, match="lower max_model_len, raise gpu_memory_utilization"):
        plan_kv_cache(bytes_per_token=2**20, budget_bytes=2**30, num_slots=1, max_model_len=2048,
                      max_model_len_is_default=False)


def test_kv_len_buckets_are_few_and_cover_every_length():
    assert kv_len_buckets(1024) == [256, 512, 768, 1024]
    assert kv_len_buckets(1000) == [256, 512, 768, 1000]
    assert kv_len_buckets(131072) == [256 * i for i in range(1, 9)] + [4096, 8192, 16384, 32768, 65536, 131072]
    assert kv_len_buckets(100) == [100]
    for max_len in (100, 1000, 3000, 5000):
        buckets = kv_len_buckets(max_len)
        for length in range(1, max_len + 1):
            bucket = kv_len_bucket(length, max_len)
            assert bucket in buckets and length <= bucket, (max_len, length)
            assert bucket < 2 * max(length, 256), (max_len, length)  # attention never reads over 2x the need


def test_decode_graphs_reserve_memory_outside_the_kv_cache():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, vocab_size=128256)
    eager = activation_reserve_bytes(config, torch.bfloat16, num_slots=256, max_prefill_tokens=2048,
                                     max_model_len=8192, decode_graphs=False)
    graphs = activation_reserve_bytes(config, torch.bfloat16, num_slots=256, max_prefill_tokens=2048,
                                      max_model_len=8192, decode_graphs=True)
    # At least the static float32 logits plus the pool's bf16 and float32 logits of the largest step.
    assert graphs - eager >= 256 * 128256 * (4 + 2 + 4)


def test_the_reserve_holds_a_prefill_chunks_k_v_at_the_end_of_a_context_longer_than_the_bound():
    """A pass's first chunk may read past PREFILL_GATHER_TOKENS alone: at the end of a 1M-token context it gathers
    1M tokens' K/V of a layer, and the reserve grows by exactly what lies beyond the bound."""
    from transformers import LlamaConfig

    from serving.engine.model_runner import PREFILL_GATHER_TOKENS

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, vocab_size=128256, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8)
    layer_token = 2 * 8 * 64 * 2  # K and V of one token in one layer, bf16
    for graphs in (False, True):
        within, long = (activation_reserve_bytes(config, torch.bfloat16, num_slots=64, max_prefill_tokens=2048,
                                                 max_model_len=length, decode_graphs=graphs)
                        for length in (8192, 1 << 20))
        assert long - within == ((1 << 20) - PREFILL_GATHER_TOKENS) * layer_token


def test_the_engine_bounds_a_prefill_passs_k_v_reads(make_engine, monkeypatch, hf_model):
    """Two prompts whose chunks together would read past the bound are prefilled in separate passes; the tokens
    are HF's."""
    import serving.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_GATHER_TOKENS", 40)
    engine = make_engine(max_num_seqs=2, max_prefill_tokens_per_step=64)
    assert engine.scheduler.max_prefill_context_tokens == 40
    passes: list[list[int]] = []
    prefill = engine.runner.prefill

    def recorded(chunks):
        passes.append([chunk.end for chunk in chunks])
        return prefill(chunks)

    engine.runner.prefill = recorded
    cases = [(random_prompt(30, seed=1), 4), (random_prompt(25, seed=2), 4)]
    results = asyncio.run(greedy_tokens(engine, cases))
    for (prompt, max_tokens), tokens in zip(cases, results):
        assert tokens == hf_greedy(hf_model, prompt, max_tokens)
    assert all(sum(ends) <= 40 or len(ends) == 1 for ends in passes)
    assert [30] in passes and [25] in passes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_a_full_batch_stays_within_the_memory_reserved_for_it():
    """The KV cache leaves `SAMPLING_BYTES_PER_LOGIT` per logit of a full batch for sampling: sampling 256 rows of a
    128k vocabulary with every feature on (bans, temperature, top_p, seeds), from a selection of rows, peaks within
    it."""
    from serving.engine.model_runner import SAMPLING_BYTES_PER_LOGIT

    slots, vocab = 256, 128256
    device = torch.device("cuda")
    step_logits = torch.randn(slots, vocab, device=device)  # the decode step's output, already counted elsewhere
    rows = [RowSampling(temperature=0.8, top_p=0.9, banned_token_ids=(1, 2),
                        generator=torch.Generator(device=device).manual_seed(index)) for index in range(slots)]
    index = torch.arange(slots, device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    sample_tokens(step_logits[index], rows)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    # The selection's copy is part of the budget; the step's own logits are not (hence one 4-byte logit less).
    assert peak <= (SAMPLING_BYTES_PER_LOGIT - 4) * slots * vocab, peak / (slots * vocab)


class RecordedDecodeGraphs(DecodeGraphs):
    """DecodeGraphs whose capture records each step as a Python call instead of a CUDA graph, so that on CPU
    everything but the capture itself runs: static input views, one recorded step per bucket, padding rows,
    outputs read back from the static logits buffer."""

    @contextmanager
    def _recorder(self):
        self.replayed: list[int] = []

        def record(step):
            step()

            def replay():
                self.replayed.append(id(step))
                step()

            return replay

        yield record


def test_static_buffer_decoding_matches_hf_greedy_across_buckets(make_engine, tmp_path):
    from tests.serving.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", max_position_embeddings=1024)
    engine = make_engine(model_dir, max_num_seqs=4)
    runner = engine.runner
    graphs = RecordedDecodeGraphs.for_runner(runner)
    graphs.capture()
    assert graphs.shapes == [(b, k) for b in (4, 2, 1) for k in (1024, 768, 512, 256)]
    runner.use_graphs(graphs)
    cases = [(random_prompt(length, seed=80 + length), max_tokens)
             for length, max_tokens in [(3, 40), (300, 260), (17, 30), (1, 9), (64, 50), (9, 5)]]

    results = asyncio.run(greedy_tokens(engine, cases))
    hf = load_hf(model_dir)
    for (prompt, max_tokens), tokens in zip(cases, results):
        assert tokens == hf_greedy(hf, prompt, max_tokens)
    # Every step went through a recorded replay, and several distinct shapes were replayed.
    assert len(graphs.replayed) >= 260 and len(set(graphs.replayed)) >= 3


def test_failed_graph_capture_keeps_decoding_eagerly(make_engine, hf_model, caplog):
    engine = make_engine()  # CPU: capturing a CUDA graph fails here, as it does for a model that syncs
    with caplog.at_level(logging.WARNING, logger="serving.engine"):
        assert capture_decode_graphs(engine.runner) is False
    assert engine.runner.graphs is None
    assert "CUDA graph capture failed, decoding eagerly" in caplog.text
    prompt = random_prompt(12, seed=4)
    assert asyncio.run(greedy_tokens(engine, [(prompt, 10)])) == [hf_greedy(hf_model, prompt, 10)]


def test_context_length_follows_sliding_window_only_when_used():
    from transformers import MistralConfig, Qwen2Config

    assert model_context_len(MistralConfig(max_position_embeddings=32768, sliding_window=4096)) == 4096
    assert model_context_len(MistralConfig(max_position_embeddings=32768, sliding_window=None)) == 32768
    assert model_context_len(Qwen2Config(max_position_embeddings=32768, sliding_window=4096)) == 32768


def test_engine_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_num_seqs: 0 must be a positive integer"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization: 1.5 must be in \(0, 1\]"):
        EngineConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="device: 'tpu' is not one of"):
        EngineConfig(device="tpu")
    with pytest.raises(ValueError, match="cuda_graphs: 'yes' must be true or false"):
        EngineConfig(cuda_graphs="yes")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_engine_logits_on_gpu_are_as_accurate_as_hf_bf16(tiny_model_dir):
    engine = LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=4))
    assert engine.model_info.dtype == "bfloat16" and engine.stats().device.startswith("cuda")
    hf_bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, local_files_only=True,
                                                   attn_implementation="eager").cuda().eval()
    hf_fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, local_files_only=True,
                                                   attn_implementation="eager").cuda().eval()
    prompts = {0: random_prompt(9, seed=50), 1: random_prompt(40, seed=51), 3: random_prompt(3, seed=52)}
    runner = engine.runner
    with torch.no_grad():
        next_tokens = {slot: int(hf_fp32(torch.tensor([p], device="cuda")).logits[0, -1].argmax())
                       for slot, p in prompts.items()}
        runner.prefill([chunk(runner, slot, prompt, 0) for slot, prompt in prompts.items()])
        slots = sorted(prompts)
        ours = runner.decode(slots, [next_tokens[s] for s in slots], [len(prompts[s]) for s in slots],
                             block_tables=[slot_table(runner, s) for s in slots])
        for row, slot in enumerate(slots):
            ids = torch.tensor([prompts[slot] + [next_tokens[slot]]], device="cuda")
            exact = hf_fp32(ids).logits[0, -1].float()
            theirs = hf_bf16(ids).logits[0, -1].float()
            hf_error = (theirs - exact).abs().max().item()
            our_error = (ours[row] - exact).abs().max().item()
            assert our_error <= 2 * hf_error + 0.05, (slot, our_error, hf_error)
            assert ours[row].argmax().item() == exact.argmax().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoding_matches_eager_and_hf_across_joins(tmp_path):
    """Graphs replay the eager step's kernels on static buffers: same tokens as eager and as HF float32 for
    requests of different lengths that join and leave the batch, across batch and KV-length buckets."""
    from tests.serving.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", max_position_embeddings=1024)
    cases = [(random_prompt(length, seed=60 + length), max_tokens)
             for length, max_tokens in [(3, 90), (9, 7), (17, 60), (40, 12), (300, 260), (1, 33), (64, 120)]]

    def run(cuda_graphs: bool):
        engine = LLMEngine.from_model_dir(model_dir, EngineConfig(device="cuda", dtype="float32", max_num_seqs=4,
                                                                  cuda_graphs=cuda_graphs))
        assert (engine.runner.graphs is not None) == cuda_graphs, "graph capture failed (see the warning log)"
        if cuda_graphs:
            assert engine.runner.kv_len_buckets == [256, 512, 768, 1024]
        return asyncio.run(greedy_tokens(engine, cases, shutdown=True))

    graphed, eager = run(True), run(False)
    assert graphed == eager
    hf = load_hf(model_dir)
    for (prompt, max_tokens), tokens in zip(cases, graphed):
        assert tokens == hf_greedy(hf, prompt, max_tokens)


class RecordingSink:
    """An OutputSink that keeps what it is given (from the loop thread); `accept=False` plays a reader that is gone."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.items: list[tuple[object, object]] = []
        self.calls = 0
        self.done = threading.Event()

    def deliver(self, items):
        self.calls += 1
        self.items += items
        if any(getattr(item, "finish_reason", None) for _, item in items):
            self.done.set()
        return self.accept


def test_submit_delivers_to_any_sink_one_call_per_step_the_same_tokens_as_generate(make_engine, hf_model):
    engine = make_engine()
    asyncio.run(engine.start())
    sink = RecordingSink()
    prompts = {"a": random_prompt(9, seed=61), "b": random_prompt(14, seed=62)}
    for handle, prompt in prompts.items():
        engine.submit(request(f"req-{handle}", prompt, greedy(12, ignore_eos=True)), sink, handle)
    deadline = time.monotonic() + 30
    while sum(1 for _, item in sink.items if item.finish_reason) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for handle, prompt in prompts.items():
        outputs = [item for h, item in sink.items if h == handle]
        assert [t for output in outputs for t in output.token_ids] == hf_greedy(hf_model, prompt, 12)
        assert outputs[-1].finish_reason == "length"
    # Both requests decode together: most steps carry both of their outputs in one delivery.
    assert sink.calls < len(sink.items)


def test_a_sink_that_raises_loses_its_own_requests_and_no_one_elses(make_engine, hf_model, caplog):
    engine = make_engine()
    asyncio.run(engine.start())

    class BrokenSink(RecordingSink):
        def deliver(self, items):
            super().deliver(items)
            raise RuntimeError("this reader's queue is broken")

    good, broken = RecordingSink(), BrokenSink()
    prompt = random_prompt(9, seed=71)
    engine.submit(request("broken", random_prompt(7, seed=72), greedy(12, ignore_eos=True)), broken, "broken")
    engine.submit(request("good", prompt, greedy(12, ignore_eos=True)), good, "good")
    assert good.done.wait(30)
    assert [t for _, output in good.items for t in output.token_ids] == hf_greedy(hf_model, prompt, 12)
    deadline = time.monotonic() + 10
    while engine.stats().running:  # the broken sink's request was aborted, its slot freed
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.stats().loop_alive and broken.calls >= 1
    assert "an output sink failed; aborting its 1 requests" in caplog.text
    asyncio.run(engine.shutdown())


def test_greedy_steps_are_launched_before_the_last_ones_tokens_are_read_and_sent(make_engine, hf_model):
    """Host work overlaps the device: the prompt's first token stays on the device and feeds the first decode step
    there, each decode step after it is fed with the previous step's tokens still on the device, before the host
    reads them back; each step's tokens are sent after the next step is launched, and the last ones at once; no step
    is launched past the end. (On CUDA by default; on CPU each step runs to completion when launched, so it is asked
    for here.)"""
    engine = make_engine(overlap=True)
    events: list[tuple] = []
    decode = engine.runner.decode

    def launch(slots, token_ids, positions, carried=None, block_tables=()):
        events.append(("decode", tuple(positions), None if carried is None else tuple(carried[1])))
        return decode(slots, token_ids, positions, carried, block_tables)

    engine.runner.decode = launch

    class EventSink(RecordingSink):
        def deliver(self, items):
            events.append(("deliver", tuple(token for _, output in items for token in output.token_ids),
                           items[-1][1].finish_reason))
            return super().deliver(items)

    sink = EventSink()
    asyncio.run(engine.start())
    events.clear()  # the warm-up's
    prompt = random_prompt(6, seed=5)
    engine.submit(request("r", prompt, greedy(4, ignore_eos=True)), sink, "r")
    assert sink.done.wait(10)
    tokens = [token for _, output in sink.items for token in output.token_ids]
    assert tokens == hf_greedy(hf_model, prompt, 4)
    # The first decode step takes the prefill's token (row 0 of what is in flight); the next two take the last decode
    # step's (row 1 after the prefill's, then row 0); none is launched after the one choosing the 4th token (the
    # last, by length). The first two tokens go out once the third step is launched; the third before the host
    # waits for the last step, which goes out at once.
    assert events == [("decode", (6,), (0,)), ("decode", (7,), (1,)), ("decode", (8,), (0,)),
                      ("deliver", tuple(tokens[:2]), None), ("deliver", (tokens[2],), None),
                      ("deliver", (tokens[3],), "length")]


def test_steps_are_launched_ahead_across_arrivals_and_endings_and_every_request_gets_hf_greedy(make_engine,
                                                                                              hf_model):
    """Under churn (requests ending by length at different steps, new prompts arriving while others decode, one
    aborted mid-stream) no step waits for the last one to be read back: every decode step after the first is fed on
    the device, and every request still gets exactly HF's greedy tokens."""
    engine = make_engine(max_num_seqs=4, overlap=True, max_prefill_tokens_per_step=16)
    fed = []
    decode = engine.runner.decode

    def launch(slots, token_ids, positions, carried=None, block_tables=()):
        fed.append(carried is not None and all(row >= 0 for row in carried[1]))
        return decode(slots, token_ids, positions, carried, block_tables)

    engine.runner.decode = launch
    cases = [(random_prompt(length, seed=200 + index), max_tokens)
             for index, (length, max_tokens) in enumerate([(5, 9), (23, 3), (9, 14), (40, 6), (3, 1), (12, 11),
                                                           (7, 5), (30, 8)])]

    async def main():
        await engine.start()
        fed.clear()
        streams = [engine.generate(request(f"c{index}", prompt, greedy(max_tokens, ignore_eos=True)))
                   for index, (prompt, max_tokens) in enumerate(cases)]
        doomed = engine.generate(request("doomed", random_prompt(6, seed=299), greedy(50, ignore_eos=True)))
        await doomed.__anext__()
        await doomed.aclose()
        return await asyncio.gather(*(collect(stream) for stream in streams))

    results = asyncio.run(main())
    for (prompt, max_tokens), (tokens, reason) in zip(cases, results):
        assert reason == "length" and tokens == hf_greedy(hf_model, prompt, max_tokens)
    # 9 requests on 4 slots: prompts keep arriving while others decode, and no decode step took a token from the host.
    assert len(fed) > 10 and all(fed)


def test_sampled_and_min_tokens_rows_run_ahead_too_and_give_the_stepwise_tokens(make_engine):
    """Sampling (temperature, top_p, a seed) and min_tokens bans run on the device like the argmax: with overlap no
    step waits for the last one to be read back, whatever the rows ask for, and each request gets the tokens it gets
    one step at a time (seeded sampling does not depend on what shares the batch)."""
    cases = [
        ("seeded", random_prompt(7, seed=41), SamplingParams(max_tokens=15, temperature=0.8, top_p=0.9, seed=5,
                                                             ignore_eos=True)),
        ("greedy", random_prompt(11, seed=42), greedy(12, ignore_eos=True)),
        ("held", EOS_PROMPT, greedy(30, min_tokens=10)),
        ("hot", random_prompt(4, seed=43), SamplingParams(max_tokens=9, temperature=1.3, seed=6, ignore_eos=True)),
        ("late", random_prompt(20, seed=44), SamplingParams(max_tokens=8, temperature=0.5, seed=7, min_tokens=3)),
    ]

    def run(overlap: bool):
        engine = make_engine(max_num_seqs=3, overlap=overlap)
        fed = []
        decode = engine.runner.decode

        def launch(slots, token_ids, positions, carried=None, block_tables=()):
            fed.append(carried is not None and all(row >= 0 for row in carried[1]))
            return decode(slots, token_ids, positions, carried, block_tables)

        async def main():
            await engine.start()
            engine.runner.decode = launch
            streams = [engine.generate(request(name, prompt, params)) for name, prompt, params in cases]
            return await asyncio.gather(*(collect(stream) for stream in streams))

        return asyncio.run(main()), fed

    stepwise, fed_stepwise = run(False)
    ahead, fed_ahead = run(True)
    assert ahead == stepwise
    assert len(stepwise[2][0]) >= 10 and EOS not in stepwise[2][0]
    assert not any(fed_stepwise)
    assert len(fed_ahead) > 10 and all(fed_ahead)


def _random_mix(seed: int, count: int, max_model_len: int) -> list[GenerationRequest]:
    """Requests of every kind the loop treats differently: greedy to a length, greedy to EOS, min_tokens, seeded
    sampling, a stop token, one token; prompts from 1 to 50 tokens."""
    import random

    rng = random.Random(seed)
    mix = []
    for index in range(count):
        kind = rng.choice(["greedy", "eos", "min", "sampled", "stop", "one"])
        prompt = (EOS_PROMPT if kind in ("eos", "min") and rng.random() < 0.5
                  else random_prompt(rng.choice([1, 3, 5, 9, 17, 33, 50]), seed=1000 * seed + index))
        max_tokens = rng.randint(1, 30)
        params = {
            "greedy": greedy(max_tokens, ignore_eos=True),
            "eos": greedy(max_tokens),
            "min": greedy(max_tokens, min_tokens=rng.randint(1, 8)),
            "sampled": SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.9, seed=index),
            "stop": greedy(max_tokens, stop_token_ids=(rng.randint(5, 383),)),
            "one": greedy(1),
        }[kind]
        if len(prompt) + params.max_tokens <= max_model_len:
            mix.append(request(f"q{index}", prompt, params))
    return mix


def assert_mix_matches(requests: list[GenerationRequest], results: dict, aborts: set[str], alone: dict) -> None:
    """Each request of a mix gave what it gives run alone (`alone`, from `_run_mix` on a reference engine): the same
    tokens and finish reason, or, aborted, a prefix of those tokens."""
    for item in requests:
        tokens, reason = results[item.request_id]
        if reason == "abort":
            assert item.request_id in aborts and tokens == alone[item.request_id][0][: len(tokens)]
        else:
            assert (tokens, reason) == alone[item.request_id], item.request_id


def _run_mix(engine: LLMEngine, requests: list[GenerationRequest], rng=None, aborts: set | None = None) -> dict:
    """Submit every request (with `rng`: at random moments, aborting some into `aborts`); each one's tokens and
    finish reason. Fails on anything delivered after a request's final output."""
    sink = RecordingSink()
    for item in requests:
        engine.submit(item, sink, item.request_id)
        if rng is not None:
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.01)
            if rng.random() < 0.1:
                victim = rng.choice(requests).request_id
                aborts.add(victim)
                engine.abort(victim)
    deadline = time.monotonic() + 60
    while sum(1 for _, output in sink.items if output.finish_reason) < len(requests):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    results: dict[str, tuple[list[int], str | None]] = {}
    for handle, output in sink.items:
        tokens, reason = results.get(handle, ([], None))
        assert reason is None, f"{handle} got output after its final one"
        results[handle] = (tokens + list(output.token_ids), output.finish_reason)
    return results


class _ReadyNow:
    """A CUDA event of a copy that has finished."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


@pytest.mark.parametrize("cuda_layout", [False, True], ids=["cpu-layout", "cuda-layout"])
@pytest.mark.parametrize("seed,slots", [(0, 2), (1, 5), (2, 3), (3, 1)])
def test_a_random_mix_under_overlap_gives_each_request_its_tokens_one_step_at_a_time(tiny_model_dir, seed, slots,
                                                                                   cuda_layout, monkeypatch):
    """Differential: requests of every kind arriving at random moments, some aborted, decode steps of random
    duration, a small prefill budget; with overlap each request gets exactly what it gets alone, one step at a time
    (an aborted one a prefix of it), and nothing after its final output. With `cuda_layout` the in-flight tokens are
    read back as on CUDA, from a copy once its event says it is done."""
    import random

    from serving.engine import engine as engine_module

    def make(**overrides):
        engine = LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(device="cpu", dtype="float32", max_model_len=96,
                                                                       **overrides))
        guard_kv_len(engine.runner)
        asyncio.run(engine.start())
        return engine

    requests = _random_mix(seed, 24, max_model_len=96)
    reference = make(overlap=False, max_num_seqs=1)
    try:
        alone = _run_mix(reference, requests)
    finally:
        asyncio.run(reference.shutdown())
    if cuda_layout:
        monkeypatch.setattr(engine_module._InFlight, "_copy_back", staticmethod(lambda tokens: (tokens.clone(),
                                                                                             _ReadyNow())))
    engine = make(overlap=True, max_num_seqs=slots, max_prefill_tokens_per_step=16)
    rng = random.Random(seed)
    decode = engine.runner.decode

    def uneven_decode(*args):
        if rng.random() < 0.2:
            time.sleep(0.002)
        return decode(*args)

    engine.runner.decode = uneven_decode
    aborts: set[str] = set()
    try:
        results = _run_mix(engine, requests, rng, aborts)
    finally:
        asyncio.run(engine.shutdown())
    assert_mix_matches(requests, results, aborts, alone)


def test_a_sequence_reaching_the_context_end_while_others_go_on_matches_hf_greedy(make_engine, hf_model):
    """A sequence that fills the context exactly, in a batch that goes on: under run-ahead no row of it is launched
    past its last token (its blocks end at the context's end), and every sequence still gets HF's tokens."""
    engine = make_engine(max_num_seqs=3, max_model_len=64)
    cases = [(random_prompt(40, seed=30), 64 - 40), (random_prompt(5, seed=31), 40), (random_prompt(10, seed=32), 45)]
    results = asyncio.run(greedy_tokens(engine, cases))
    assert [len(tokens) for tokens in results] == [24, 40, 45]
    for (prompt, _), tokens in zip(cases, results):
        assert tokens == hf_greedy(hf_model, prompt, len(tokens))


def test_a_finished_requests_last_output_goes_out_before_the_host_waits_on_the_device(make_engine):
    """When run-ahead stops because a sequence ended, what the last step produced (that sequence's last output
    among it) is sent before the loop blocks reading the step in flight, not after."""
    engine = make_engine(max_num_seqs=2, overlap=True)
    events: list[str] = []
    read_back = engine._read_back

    def read(in_flight, timeout_s=None):
        events.append("read")
        read_back(in_flight, timeout_s)
        if any(seq.request_id == "a" and seq.finished for seqs, _ in in_flight.parts for seq in seqs):
            events.append("a ended")

    engine._read_back = read

    class EventSink(RecordingSink):
        def deliver(self, items):
            events.extend("a final" for handle, output in items if handle == "a" and output.finish_reason)
            return super().deliver(items)

    sink = EventSink()
    asyncio.run(engine.start())
    events.clear()
    engine.submit(request("a", random_prompt(5, seed=3), greedy(3, ignore_eos=True)), sink, "a")
    engine.submit(request("b", random_prompt(5, seed=4), greedy(8, ignore_eos=True)), sink, "b")
    deadline = time.monotonic() + 10
    while len([1 for _, output in sink.items if output.finish_reason]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ended = events.index("a ended")
    assert "a final" in events[ended:]
    reads_after = [index for index in range(ended + 1, len(events)) if events[index] == "read"]
    assert not reads_after or events.index("a final", ended) < reads_after[0]


def test_a_sink_that_refuses_delivery_gets_its_requests_aborted_and_slots_freed(make_engine):
    engine = make_engine(max_num_seqs=1)
    asyncio.run(engine.start())
    gone = RecordingSink(accept=False)
    engine.submit(request("orphan", random_prompt(8, seed=63), greedy(200, ignore_eos=True)), gone, "orphan")
    assert gone.done.wait(10)
    assert gone.items[-1][1].finish_reason == "abort" and len(gone.items) < 10
    # The slot is free again: another request runs to its end.
    sink = RecordingSink()
    engine.submit(request("next", EOS_PROMPT, greedy(3)), sink, "next")
    assert sink.done.wait(10)
    assert [t for _, item in sink.items for t in item.token_ids] == EOS_PROMPT_GREEDY[:3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_run_ahead_on_the_gpu_gives_the_stepwise_tokens_and_launches_without_waiting(tmp_path, monkeypatch):
    """On CUDA with graphs (bf16, flash where it applies): steps fed with the last step's tokens on the device give
    exactly the tokens of one step at a time across staggered joins, endings, KV buckets, seeded sampling and
    min_tokens, and launching a step (prefill, decode, choosing the tokens, the copy back to the host) never
    synchronises with the device: CUDA's sync debug mode turns any synchronising call there into an error, which
    would fail the loop. Every request is submitted before the loop can take any, all fit (8 slots), and none ends
    but by length, so both runs lay out the same batches (bf16 results depend on the batch)."""
    from serving.engine import engine as engine_module
    from tests.serving.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", max_position_embeddings=1024)
    lengths = [(3, 90), (9, 7), (17, 60), (40, 12), (300, 260), (1, 33), (64, 120)]
    cases = [(random_prompt(length, seed=90 + length), greedy(max_tokens, ignore_eos=True))
             for length, max_tokens in lengths]
    cases[1] = (cases[1][0], SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True))
    cases[5] = (cases[5][0], greedy(33, min_tokens=20, ignore_eos=True))  # EOS banned to 20, never an end
    launched_ahead = []

    def without_sync(launch):
        def launch_without_sync(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return launch(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return launch_without_sync

    class InFlightWithoutSync(engine_module._InFlight):
        __slots__ = ()
        __init__ = without_sync(engine_module._InFlight.__init__)

    def run(overlap: bool):
        engine = LLMEngine.from_model_dir(model_dir, EngineConfig(
            device="cuda", dtype="bfloat16", max_num_seqs=8, max_prefill_tokens_per_step=64, overlap=overlap))
        assert engine.runner.graphs is not None, "graph capture failed (see the warning log)"
        prefill, decode = engine.runner.prefill, engine.runner.decode

        def watched_decode(slots, token_ids, positions, carried=None, block_tables=()):
            if carried is not None:
                launched_ahead.append(len(slots))
            return decode(slots, token_ids, positions, carried, block_tables)

        engine.runner.prefill, engine.runner.decode = without_sync(prefill), without_sync(watched_decode)
        if overlap:  # the whole launch, sampling included (stepwise, sampling reads its tokens back at once)
            engine._launch = without_sync(engine._launch)

        async def main():
            await engine.start()
            try:
                with engine._wakeup:  # the loop waits for this lock to take new requests
                    streams = [engine.generate(request(f"r{i}", prompt, params))
                               for i, (prompt, params) in enumerate(cases)]
                return await asyncio.gather(*(collect(stream) for stream in streams))
            finally:
                await engine.shutdown()

        return asyncio.run(main())

    stepwise = run(False)
    assert not launched_ahead
    monkeypatch.setattr(engine_module, "_InFlight", InFlightWithoutSync)
    assert run(True) == stepwise
    assert len(launched_ahead) > 100


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_process_on_the_gpu_gives_the_in_process_engines_tokens(tiny_model_dir):
    """The server's default: CUDA, graphs and all, in a spawned engine process, the same greedy tokens as in-process."""
    from serving.engine.process import EngineClient

    config = EngineConfig(device="cuda", dtype="float32", max_num_seqs=4)
    cases = [(random_prompt(length, seed=80 + length), 20) for length in (3, 17, 40)]
    in_process = asyncio.run(greedy_tokens(LLMEngine.from_model_dir(tiny_model_dir, config), cases, shutdown=True))
    client = EngineClient.spawn(tiny_model_dir, config, log_level="warning")
    assert client.stats().device.startswith("cuda")
    assert asyncio.run(greedy_tokens(client, cases, shutdown=True)) == in_process


class _Hung:
    """The event of a copy on a device that hangs (for 10 s at most, so that a test that fails does not hang)."""

    def __init__(self, seconds: float = 10) -> None:
        self.seconds = seconds

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        time.sleep(self.seconds)


def test_a_dying_loop_gives_up_on_a_hung_device_within_its_bound(make_engine, monkeypatch):
    """When the loop dies with steps in flight on a device that no longer answers, it waits for them no longer than
    its bound, then fails every stream."""
    from serving.engine import engine as engine_module

    engine = make_engine(max_num_seqs=2, overlap=True)
    asyncio.run(engine.start())
    monkeypatch.setattr(engine_module, "_READ_BACK_AFTER_FAILURE_S", 0.3)
    decode = engine.runner.decode
    calls = []

    def hang_then_crash(*args):
        calls.append(1)
        if len(calls) == 5:  # the device hangs in this step: its tokens never come back
            monkeypatch.setattr(engine_module._InFlight, "_copy_back",
                                staticmethod(lambda tokens: (tokens.clone(), _Hung())))
        if len(calls) == 6:
            raise RuntimeError("injected decode failure")
        return decode(*args)

    engine.runner.decode = hang_then_crash

    async def main():
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="injected decode failure"):
            await asyncio.wait_for(collect(engine.generate(request("a", random_prompt(4, seed=2),
                                                                   greedy(30, ignore_eos=True)))), 15)
        return time.monotonic() - started

    assert asyncio.run(main()) < 3


def test_shutdown_on_a_hung_device_ends_the_streams_within_its_bound(make_engine, monkeypatch):
    """A clean stop waits for the loop to finish its step; on a device that no longer answers it stops waiting after
    its bound and ends the streams itself (with `abort`, as any shutdown does)."""
    from serving.engine import engine as engine_module

    engine = make_engine(max_num_seqs=2, overlap=True)
    asyncio.run(engine.start())
    monkeypatch.setattr(engine_module, "_STOP_LOOP_S", 0.3)

    async def main():
        stream = engine.generate(request("a", random_prompt(4, seed=3), greedy(200, ignore_eos=True)))
        await stream.__anext__()
        # From now on the device hangs (for 2 s each step, far beyond the bound, so the loop is still stuck when
        # shutdown gives up, and the test's teardown does not wait long for it).
        monkeypatch.setattr(engine_module._InFlight, "_copy_back",
                            staticmethod(lambda tokens: (tokens.clone(), _Hung(2))))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await asyncio.wait_for(engine.shutdown(), 15)
        stopped, stuck = time.monotonic() - started, engine._thread.is_alive()
        _, reason = await asyncio.wait_for(collect(stream), 5)
        return stopped, stuck, reason

    stopped, stuck, reason = asyncio.run(main())
    assert stuck  # the hang took effect: shutdown gave up on the loop, which had not stopped
    assert stopped < 3 and reason == "abort"


@pytest.mark.parametrize("where", ["read", "_copy_back"], ids=["reading-a-step-back", "building-its-record"])
def test_a_failure_with_steps_in_flight_sends_no_token_in_place_of_a_lost_one(make_engine, hf_model, monkeypatch,
                                                                            where):
    """The loop dies reading a step back, or building the record of the steps just launched: a stream gets HF's
    tokens up to the failure, then the failure, never a later token in place of one that was lost (after a failed
    read the dying loop reads nothing more)."""
    from serving.engine import engine as engine_module

    engine = make_engine(max_num_seqs=2, overlap=True)
    asyncio.run(engine.start())
    calls = []
    original = getattr(engine_module._InFlight, where)

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected failure")
        return original(*args)

    monkeypatch.setattr(engine_module._InFlight, where, failing if where == "read" else staticmethod(failing))
    prompt = random_prompt(6, seed=3)

    async def main():
        tokens = []
        with pytest.raises(EngineDeadError, match="injected failure"):
            async for output in engine.generate(request("a", prompt, greedy(30, ignore_eos=True))):
                tokens += output.token_ids
        return tokens

    tokens = asyncio.run(main())
    assert tokens == hf_greedy(hf_model, prompt, 30)[: len(tokens)]
    if where == "read":
        assert len(calls) == 5


def test_a_request_that_ends_in_prefill_gets_its_output_even_if_that_steps_decode_kills_the_loop(make_engine):
    engine = make_engine(max_num_seqs=4)

    async def main():
        await engine.start()
        long = engine.generate(request("long", random_prompt(3, seed=70), greedy(200, ignore_eos=True)))
        await long.__anext__()  # decoding
        prefill, decode = engine.runner.prefill, engine.runner.decode
        ends_short = [False]  # set by this step's prefill, in the loop thread: whether it holds short's last chunk

        def watch_prefill(chunks):
            short = engine._live.get("short")
            ends_short[0] = short is not None and any(c.slot == short.slot and c.want_logits for c in chunks)
            return prefill(chunks)

        def crash(*args, **kwargs):
            # Only in the step whose prefill half ends the short request; earlier steps decode as usual.
            if not ends_short[0]:
                return decode(*args, **kwargs)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        engine.runner.prefill, engine.runner.decode = watch_prefill, crash
        # One token: done in the prefill half of the step whose decode half then fails.
        short = engine.generate(request("short", random_prompt(3, seed=71), greedy(1, ignore_eos=True)))
        tokens, reason = await asyncio.wait_for(collect(short), 10)
        assert len(tokens) == 1 and reason == "length"
        with pytest.raises(EngineDeadError, match="illegal memory access"):
            await asyncio.wait_for(collect(long), 10)

    asyncio.run(main())
