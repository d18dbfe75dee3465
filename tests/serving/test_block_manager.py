"""The block manager alone, and the scheduler's rules that rest on it (admission by blocks, preemption, prefix
hits), with made-up tokens: no engine thread, model or torch.

Each rule is fed its bad case: a pool one block short, a block crossed mid-decode with none free, a prefix that
matches all but its last token, a hash collision, an evicted prefix, a block shared by two requests and freed by
one. The engine's own tests check the same paths end to end against `transformers`.
"""
from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from serving.engine.block_manager import BlockManager, block_hash
from tests.serving.test_scheduler import (
    EOS,
    TOKEN,
    assert_plan_within_limits,
    make_scheduler,
    make_seq,
    read_back,
    recount,
    step,
)


@dataclass(eq=False)
class Seq:
    prefill_tokens: tuple[int, ...]
    slot: int = -1
    block_table: list[int] = field(default_factory=list)
    prefix_hashes: list[int] = field(default_factory=list)


def test_the_block_manager_imports_without_torch():
    code = "import sys, serving.engine.block_manager; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ----------------------------------------------------------------------------- allocation and growth


def test_allocate_takes_the_prompts_blocks_and_one_more_and_refuses_one_block_short():
    manager = BlockManager(num_blocks=3, block_size=4, num_slots=2, enable_prefix_caching=False)
    # 8 tokens and the first generated one: 3 blocks of 4.
    assert manager.can_allocate(Seq(tuple(range(8))))
    assert not manager.can_allocate(Seq(tuple(range(12))))  # 4 blocks: one short
    seq = Seq(tuple(range(8)))
    assert manager.allocate(seq) == 0
    assert len(seq.block_table) == 3 and seq.slot == 0 and manager.num_free_blocks == 0 and manager.usage == 1.0
    assert not manager.can_allocate(Seq((1,)))
    with pytest.raises(RuntimeError):
        manager.allocate(Seq((1,)))


def test_rows_run_out_before_blocks_do_and_the_lowest_free_row_goes_first():
    manager = BlockManager(num_blocks=10, block_size=4, num_slots=2, enable_prefix_caching=False)
    a, b, c = Seq((1,)), Seq((2,)), Seq((3,))
    manager.allocate(a)
    manager.allocate(b)
    assert not manager.can_allocate(c)
    manager.free(a)
    manager.allocate(c)
    assert (a.slot, b.slot, c.slot) == (-1, 1, 0)


def test_append_slot_takes_a_block_only_when_a_position_crosses_into_it_and_says_when_none_is_free():
    manager = BlockManager(num_blocks=3, block_size=4, num_slots=2, enable_prefix_caching=False)
    seq = Seq((1, 2, 3))
    manager.allocate(seq)  # positions 0..3: one block
    assert manager.append_slot(seq, 3) and len(seq.block_table) == 1
    assert manager.append_slot(seq, 4) and len(seq.block_table) == 2
    assert manager.append_slot(seq, 11) and len(seq.block_table) == 3
    assert not manager.append_slot(seq, 12) and len(seq.block_table) == 3
    manager.free(seq)
    assert manager.num_free_blocks == 3 and manager.num_used_blocks == 0 and seq.block_table == []


# ----------------------------------------------------------------------------- the prefix cache


def finish(manager: BlockManager, seq: Seq, written: int | None = None) -> None:
    manager.cache_full_blocks(seq, seq.prefill_tokens, len(seq.prefill_tokens) if written is None else written)
    manager.free(seq)


def test_a_prompt_reuses_the_longest_cached_prefix_of_full_blocks_and_keeps_its_last_token_to_compute():
    manager = BlockManager(num_blocks=8, block_size=4, num_slots=2)
    first = Seq(tuple(range(10)))  # blocks [0..3] [4..7] and a partial one
    manager.allocate(first)
    finish(manager, first)
    same_start = Seq(tuple(range(8)) + (99, 98, 97))
    assert manager.allocate(same_start) == 8 and same_start.block_table[:2] == first_table(manager, range(8))
    # Exactly the cached blocks: the last block is computed again, for its last token's logits.
    exact = Seq(tuple(range(8)))
    assert manager.allocate(exact) == 4
    assert manager.queried_tokens == 10 + 11 + 8 and manager.hit_tokens == 12


def first_table(manager: BlockManager, tokens) -> list[int]:
    """The cached blocks of `tokens`' full blocks, looked up by hash."""
    tokens = tuple(tokens)
    parent, blocks = None, []
    for start in range(0, len(tokens) - len(tokens) % manager.block_size, manager.block_size):
        parent = block_hash(parent, tokens[start : start + manager.block_size])
        blocks.append(manager._by_hash[parent])
    return blocks


def test_a_block_is_named_by_its_prefix_too_so_the_same_tokens_after_another_prefix_miss():
    manager = BlockManager(num_blocks=8, block_size=2, num_slots=2)
    first = Seq((1, 2, 3, 4, 5))
    manager.allocate(first)
    finish(manager, first)
    other = Seq((9, 9, 3, 4, 5))  # block (3, 4) again, after another first block
    assert manager.allocate(other) == 0


def test_a_hash_collision_is_refused_by_comparing_the_tokens(monkeypatch):
    manager = BlockManager(num_blocks=8, block_size=2, num_slots=2)
    monkeypatch.setattr("serving.engine.block_manager.block_hash", lambda parent, tokens: 42)
    first = Seq((1, 2, 3))
    manager.allocate(first)
    finish(manager, first)
    assert manager.allocate(Seq((7, 8, 9))) == 0
    assert manager.allocate(Seq((1, 2, 9))) == 2


def test_only_written_full_blocks_are_registered():
    manager = BlockManager(num_blocks=8, block_size=4, num_slots=2)
    seq = Seq(tuple(range(12)))
    manager.allocate(seq)
    manager.cache_full_blocks(seq, seq.prefill_tokens, 7)  # one full block written, the second not yet
    manager.free(seq)
    assert manager.allocate(Seq(tuple(range(12)))) == 4


def test_a_shared_block_stays_held_until_its_last_holder_frees_it():
    manager = BlockManager(num_blocks=4, block_size=4, num_slots=3)
    first = Seq(tuple(range(5)))
    manager.allocate(first)
    manager.cache_full_blocks(first, first.prefill_tokens, 5)
    second = Seq(tuple(range(4)) + (50,))
    assert manager.allocate(second) == 4 and second.block_table[0] == first.block_table[0]
    assert manager.blocks[first.block_table[0]].ref_count == 2 and manager.num_used_blocks == 3
    manager.free(first)
    assert manager.num_used_blocks == 2 and manager.num_free_blocks == 2
    shared = second.block_table[0]
    manager.free(second)
    # Kept for reuse, not handed out while a never-used block is free.
    assert manager.blocks[shared].ref_count == 0 and manager.num_free_blocks == 4
    third = Seq((70,) * 5)
    manager.allocate(third)
    assert shared not in third.block_table and manager.allocate(Seq(tuple(range(4)) + (60,))) == 4


def test_eviction_takes_the_least_recently_used_cached_block_first():
    manager = BlockManager(num_blocks=3, block_size=2, num_slots=3)
    old, new = Seq((1, 2, 3)), Seq((5, 6, 7))
    manager.allocate(old)  # blocks for (1, 2) and (3, first token)
    finish(manager, old)
    manager.allocate(new)
    finish(manager, new)
    # Three blocks, two of them cached ((1, 2) then (5, 6)); two new blocks take the free one and evict the older.
    filler = Seq((9, 9, 9))
    manager.allocate(filler)
    assert manager.cached_prefix(Seq((1, 2, 0))) == [] and len(manager.cached_prefix(Seq((5, 6, 0)))) == 1


def test_without_prefix_caching_nothing_is_hit_or_counted():
    manager = BlockManager(num_blocks=8, block_size=4, num_slots=2, enable_prefix_caching=False)
    first = Seq(tuple(range(9)))
    manager.allocate(first)
    finish(manager, first)
    assert manager.allocate(Seq(tuple(range(9)))) == 0 and manager.queried_tokens == manager.hit_tokens == 0


# ----------------------------------------------------------------------------- the scheduler on blocks


def test_admission_counts_blocks_so_short_requests_outnumber_full_length_slots():
    # Memory for 2 sequences of 64 tokens: 32 blocks of 4. Prompts of 10 tokens need 3 blocks each.
    scheduler = make_scheduler(slots=16, budget=1000, max_model_len=64, blocks=32)
    seqs = [make_seq(f"r{i}", prompt_len=10, max_tokens=2) for i in range(16)]
    for seq in seqs:
        scheduler.add(seq)
    scheduler.schedule()
    assert len(scheduler.running) == 10 and len(scheduler.waiting) == 6


def test_a_row_with_no_free_block_preempts_the_youngest_request_which_recomputes_its_tokens_later():
    scheduler = make_scheduler(slots=2, budget=64, blocks=4)
    old, young = make_seq("old", prompt_len=3, max_tokens=10), make_seq("young", prompt_len=3, max_tokens=10)
    scheduler.add(old)
    scheduler.add(young)
    for _ in range(2):
        step(scheduler)
    # Both at position 4 next: each needs a second block, and two of four are free.
    assert [len(seq.block_table) for seq in (old, young)] == [2, 2]
    for _ in range(4):
        plan, _ = step(scheduler)
        if plan.preempted:
            break
    assert plan.preempted == [young] and young.block_table == [] and list(scheduler.waiting) == [young]
    assert young.recompute == young.prompt + tuple(young.output_ids) and not young.finished
    assert plan.decode == [old]
    while not old.finished:
        step(scheduler)
    # Readmitted once blocks are free: it prefills its prompt and its tokens, and goes on from there.
    plan, _ = step(scheduler)
    assert plan.chunks[0].token_ids == young.recompute and young in scheduler.running
    while not young.finished:
        step(scheduler)
    assert young.output_ids == [TOKEN] * 10 and young.finish_reason == "length"
    assert scheduler.num_preemptions >= 1 and scheduler.cache.num_used_blocks == 0


def test_a_request_with_a_token_in_flight_is_never_preempted_and_its_row_waits_instead():
    scheduler = make_scheduler(slots=2, budget=64, blocks=3)
    old, young = make_seq("old", prompt_len=3, max_tokens=10), make_seq("young", prompt_len=2, max_tokens=10)
    scheduler.add(old)
    scheduler.add(young)
    # Launched ahead, nothing read back: both prefilled (a block each), then old crosses into its second block
    # (the last free one), then young into its second: none is free, and both have tokens in flight.
    plans = [scheduler.schedule() for _ in range(3)]
    assert [len(seq.block_table) for seq in (old, young)] == [2, 1]
    assert plans[2].preempted == [] and plans[2].decode == [old]
    for plan in plans:
        read_back(scheduler, plan, lambda seq: TOKEN)
    fourth = scheduler.schedule()
    assert fourth.preempted == [young] and fourth.decode == [old] and young.recompute == young.prompt + (TOKEN,) * 3


def test_a_prompt_hit_in_the_prefix_cache_prefills_only_the_rest():
    scheduler = make_scheduler(slots=2, budget=64, prefix_caching=True)
    first = make_seq("first", prompt_len=10, max_tokens=1)
    scheduler.add(first)
    step(scheduler)
    assert first.finished
    again = make_seq("again", prompt_len=10, max_tokens=3)
    scheduler.add(again)
    plan, _ = step(scheduler)
    assert again.num_cached == 10 and [(chunk.start, chunk.end) for chunk in plan.chunks] == [(8, 10)]
    assert scheduler.cache.hit_tokens == 8 and scheduler.cache.queried_tokens == 20


@pytest.mark.parametrize("seed", range(8))
def test_a_random_mix_under_memory_pressure_ends_every_request_as_its_rule_says(seed):
    """Requests with shared prefixes arrive into a pool too small for them all, run ahead or not, stop on EOS, are
    aborted, are preempted; at every step no block is held that no table names, nor a row twice; every request
    ends with the output its rule gives, preempted or not."""
    rng = random.Random(seed)
    slots, budget = rng.choice([2, 4, 8]), rng.choice([4, 16, 64])
    scheduler = make_scheduler(slots=slots, budget=budget, max_model_len=48, blocks=rng.choice([12, 16, 30]),
                               prefix_caching=rng.random() < 0.7)
    requests = []
    in_flight = None
    eos_at: dict[str, int] = {}
    shared = tuple(range(100, 124))

    def sample(seq) -> int:
        # A token that depends on the request's own history, so a recompute that lost track would show.
        count = len(seq.output_ids) + 1
        return EOS if eos_at.get(seq.request_id) == count else 10 + (len(seq.prompt) + count) % 50

    for index in range(300):
        if rng.random() < 0.4:
            length = rng.randint(1, 36)
            seq = make_seq(f"q{index}", prompt_len=length, max_tokens=rng.randint(1, 12), max_model_len=48)
            if rng.random() < 0.5:
                seq.prompt = shared[: min(length, len(shared))] + seq.prompt[len(shared):]
            if rng.random() < 0.3:
                eos_at[seq.request_id] = rng.randint(1, 6)
            scheduler.add(seq)
            requests.append(seq)
        if requests and rng.random() < 0.04:
            scheduler.abort(rng.choice(requests))
        plan = scheduler.schedule()
        assert_plan_within_limits(scheduler, plan, budget=budget, slots=slots)
        assert scheduler.cache.num_used_blocks == recount(scheduler)
        for _seq, position, table in zip(plan.decode, plan.positions, plan.block_tables):
            assert len(table) * 4 > position
        run_ahead = rng.random() < 0.5
        read_back(scheduler, in_flight, sample)
        if not run_ahead:
            read_back(scheduler, plan, sample)
        in_flight = plan if run_ahead else None
    read_back(scheduler, in_flight, sample)
    for _ in range(10_000):
        if not scheduler.has_work():
            break
        read_back(scheduler, scheduler.schedule(), sample)
    assert not scheduler.has_work() and scheduler.cache.num_used_blocks == 0
    for seq in requests:
        eos = eos_at.get(seq.request_id, 99)
        stops = eos <= seq.stop.max_generated
        expected = [10 + (len(seq.prompt) + count) % 50 for count in range(1, seq.stop.max_generated + 1)]
        if stops:
            expected = expected[: eos - 1]
        if seq.finish_reason == "abort":
            assert seq.output_ids == expected[: len(seq.output_ids)]
        else:
            assert seq.output_ids == expected and seq.finish_reason == ("stop" if stops else "length"), seq
