"""The scheduler alone: `schedule` and `update` driven with made-up tokens, no engine thread, model or torch.

Each rule is checked on the case that breaks it: admission beyond the slots, a prompt longer than the prefill
budget, a request aborted while waiting, prefilling or decoding, a slot freed and taken again, and every way a
request ends (length, the context's end, EOS, a stop token, ignore_eos, min_tokens). The engine's own tests
(`test_engine.py`) check the same rules end to end against `transformers`.
"""
from __future__ import annotations

import random
import subprocess
import sys

import pytest

from serving.engine.block_manager import BlockManager
from serving.engine.interface import SamplingParams
from serving.engine.scheduler import PrefillChunk, Scheduler, Sequence, StopRule

EOS = 2
STOP = 3
TOKEN = 7
"""What the fake model samples unless a test says otherwise: not a stop token."""


BLOCK = 4


def make_scheduler(slots: int = 2, budget: int = 16, max_model_len: int = 64, blocks: int | None = None,
                   prefix_caching: bool = False, context: int | None = None) -> Scheduler:
    """A scheduler over blocks of 4 tokens, by default enough for every slot at full length (as the engine sizes it
    on CPU), without the prefix cache unless asked, and no bound on a pass's K/V reads unless `context` is given."""
    blocks = blocks if blocks is not None else slots * -(-max_model_len // BLOCK)
    return Scheduler(BlockManager(blocks, BLOCK, slots, enable_prefix_caching=prefix_caching),
                     max_prefill_tokens=budget, max_prefill_context_tokens=context)


def make_seq(request_id: str, prompt_len: int = 4, max_tokens: int = 8, max_model_len: int = 64,
             **params) -> Sequence:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)
    prompt = tuple(range(10, 10 + prompt_len))
    return Sequence(request_id, prompt, StopRule.of(sampling, prompt_len, (EOS,), max_model_len))


def step(scheduler: Scheduler, sample=lambda seq: TOKEN):
    """One engine step read back pass by pass, as the engine does without overlap: the plan, and the requests it
    ended. `sample(seq)` is the token the fake model chooses for a row (not asked for a row whose request ended in
    the prefill pass, which the engine does not launch)."""
    plan = scheduler.schedule()
    ended = scheduler.update(plan.prefilled, [sample(seq) for seq in plan.prefilled])
    ended += scheduler.update(plan.decode, [0 if seq.finished else sample(seq) for seq in plan.decode])
    return plan, ended


def read_back(scheduler: Scheduler, plan, sample) -> None:
    """Read a plan launched earlier back, as the engine does with overlap: every row gets a token."""
    if plan is not None:
        scheduler.update(plan.prefilled, [sample(seq) for seq in plan.prefilled])
        scheduler.update(plan.decode, [sample(seq) for seq in plan.decode])


def recount(scheduler: Scheduler) -> int:
    """Blocks the running requests hold, counted from their tables."""
    return len({block for seq in scheduler.running for block in seq.block_table})


def assert_plan_within_limits(scheduler: Scheduler, plan, *, budget: int, slots: int,
                              context: int | None = None) -> None:
    """A plan keeps the prefill budget and the bound on its pass's K/V reads (past it only as the pass's one chunk),
    and no slot is held twice or beyond the slots."""
    assert sum(len(chunk.token_ids) for chunk in plan.chunks) <= budget
    ends = [chunk.end for chunk in plan.chunks]
    assert context is None or sum(ends) <= context or len(ends) == 1
    held = [seq.slot for seq in scheduler.running]
    assert len(held) == len(set(held)) <= slots and -1 not in held


def test_the_scheduler_imports_without_torch():
    code = "import sys, serving.engine.scheduler; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ----------------------------------------------------------------------------- admission and slots


def test_requests_are_admitted_in_order_while_slots_are_free_and_wait_beyond():
    scheduler = make_scheduler(slots=2)
    seqs = [make_seq(f"r{i}") for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    plan = scheduler.schedule()
    assert [seq.slot for seq in seqs] == [0, 1, -1]
    assert list(scheduler.waiting) == [seqs[2]] and scheduler.running == {seqs[0], seqs[1]}
    assert [chunk.slot for chunk in plan.chunks] == [0, 1]
    assert scheduler.cache.num_free_slots == 0


def test_a_freed_slot_is_taken_by_the_next_waiting_request_and_the_lowest_free_slot_goes_first():
    scheduler = make_scheduler(slots=3)
    short, long, other, late = (make_seq("short", max_tokens=1), make_seq("long", max_tokens=5),
                                make_seq("other", max_tokens=5), make_seq("late"))
    for seq in (short, long, other, late):
        scheduler.add(seq)
    _, ended = step(scheduler)  # prefill: short ends with its first token, by length
    assert ended == [short] and short.slot == -1 and late.slot == -1
    plan, _ = step(scheduler)
    assert late.slot == 0  # short's slot, the lowest free one
    assert plan.chunks == [PrefillChunk(0, late.prompt, 0, want_logits=True, block_table=tuple(late.block_table))]
    assert [seq.slot for seq in plan.decode] == [0, 1, 2]


def test_decode_rows_are_in_slot_order_whatever_the_order_prompts_finish():
    scheduler = make_scheduler(slots=3)
    a, b, c, x, y = (make_seq(name, max_tokens=20) for name in "abcxy")
    for seq in (a, b, c):
        scheduler.add(seq)
    step(scheduler)
    scheduler.abort(c)
    scheduler.add(x)
    step(scheduler)  # x takes slot 2 and finishes its prompt
    scheduler.abort(a)
    scheduler.add(y)
    plan, _ = step(scheduler)  # y takes slot 0, after x finished its prompt
    assert (x.slot, y.slot) == (2, 0) and plan.prefilled == [y]
    assert plan.decode == [y, b, x] and plan.slots == [0, 1, 2]


# ----------------------------------------------------------------------------- the prefill budget and chunks


def test_a_long_prompt_is_prefilled_in_chunks_within_the_budget_oldest_first():
    scheduler = make_scheduler(slots=2, budget=16)
    long, short = make_seq("long", prompt_len=40), make_seq("short", prompt_len=5)
    scheduler.add(long)
    scheduler.add(short)
    chunks_per_step = []
    for _ in range(4):
        plan, _ = step(scheduler)
        assert sum(len(chunk.token_ids) for chunk in plan.chunks) <= 16
        chunks_per_step.append([(chunk.slot, chunk.start, chunk.end, chunk.want_logits) for chunk in plan.chunks])
    # The oldest prompt takes the budget first; the short one waits for what is left.
    assert chunks_per_step == [[(0, 0, 16, False)], [(0, 16, 32, False)], [(0, 32, 40, True), (1, 0, 5, True)], []]
    assert long.num_cached == 40 and short.num_cached == 5
    assert [chunk.token_ids for chunk in scheduler.schedule().chunks] == []


def test_a_pass_reads_at_most_the_context_bound_of_k_v_but_its_first_chunk_always_runs():
    """Each chunk attends to its whole prefix, so a pass reads the sum of its chunks' ends: a later prompt's chunk
    that would pass the bound waits a step though budget is left; the oldest prompt's chunk runs even past the bound
    alone (the engine keeps memory for one chunk at the context's end), so nothing starves."""
    scheduler = make_scheduler(slots=3, budget=16, max_model_len=64, context=30)
    first, second, third = make_seq("a", prompt_len=34), make_seq("b", prompt_len=14), make_seq("c", prompt_len=2)
    for seq in (first, second, third):
        scheduler.add(seq)
    passes = []
    for _ in range(5):
        plan, _ = step(scheduler)
        passes.append([(chunk.slot, chunk.start, chunk.end) for chunk in plan.chunks])
    assert passes == [
        [(0, 0, 16)],               # the budget is spent
        [(0, 16, 32)],              # 32 alone is past the bound: the oldest prompt's chunk runs anyway
        [(0, 32, 34)],              # 14 tokens of budget left, but b's chunk (end 14) would make 48 > 30: b waits
        [(1, 0, 14), (2, 0, 2)],    # 14 + 2 = 16 <= 30
        [],
    ]
    assert first.num_cached == 34 and second.num_cached == 14 and third.num_cached == 2
    # Without the bound the same prompts share the third pass.
    unbounded = make_scheduler(slots=3, budget=16, max_model_len=64)
    for seq in (make_seq("a", prompt_len=34), make_seq("b", prompt_len=14), make_seq("c", prompt_len=2)):
        unbounded.add(seq)
    ends = [[chunk.end for chunk in step(unbounded)[0].chunks] for _ in range(3)]
    assert ends == [[16], [32], [34, 14]]


def test_chunks_carry_the_prompts_own_tokens_and_only_the_last_one_wants_logits():
    scheduler = make_scheduler(slots=1, budget=3)
    seq = make_seq("r", prompt_len=7)
    scheduler.add(seq)
    chunks = []
    while not seq.output_ids:
        plan, _ = step(scheduler)
        chunks += plan.chunks
    assert [tuple(chunk.token_ids) for chunk in chunks] == [seq.prompt[0:3], seq.prompt[3:6], seq.prompt[6:7]]
    assert [chunk.want_logits for chunk in chunks] == [False, False, True]
    assert [chunk.start for chunk in chunks] == [0, 3, 6]


def test_a_prompt_exactly_the_budget_is_one_chunk_and_decodes_in_the_same_step():
    scheduler = make_scheduler(slots=1, budget=6)
    seq = make_seq("r", prompt_len=6)
    scheduler.add(seq)
    plan = scheduler.schedule()
    assert plan.chunks == [PrefillChunk(0, seq.prompt, 0, want_logits=True, block_table=tuple(seq.block_table))] and plan.prefilled == [seq]
    # Its first decode row feeds the prefill's token at position 6, laid out before that token is read back.
    assert plan.decode == [seq] and plan.positions == [6] and seq.launched == 2


# ----------------------------------------------------------------------------- run-ahead: rows laid out before read back


def test_decode_rows_feed_the_last_launched_token_at_its_position_and_count_as_launched():
    scheduler = make_scheduler(slots=1)
    seq = make_seq("r", prompt_len=4, max_tokens=10)
    scheduler.add(seq)
    positions = []
    for _ in range(3):  # three steps launched, none read back
        plan = scheduler.schedule()
        positions += plan.positions
    assert positions == [4, 5, 6] and seq.launched == 4 and seq.output_ids == []
    scheduler.update([seq], [11])
    assert seq.output_ids == [11]


def test_no_row_is_laid_out_for_a_request_whose_token_in_flight_ends_it_by_length():
    scheduler = make_scheduler(slots=2)
    short, long = make_seq("short", max_tokens=3), make_seq("long", max_tokens=10)
    scheduler.add(short)
    scheduler.add(long)
    plans = [scheduler.schedule() for _ in range(4)]  # launched ahead, nothing read back
    assert [len(plan.decode) for plan in plans] == [2, 2, 1, 1]
    assert short.launched == 3  # its third token is the last: no fourth is ever launched
    for plan in plans:
        scheduler.update(plan.prefilled, [TOKEN] * len(plan.prefilled))
        scheduler.update(plan.decode, [TOKEN] * len(plan.decode))
    assert short.finish_reason == "length" and short.output_ids == [TOKEN] * 3
    assert len(long.output_ids) == 5 and not long.finished


def test_a_row_of_a_request_that_ended_meanwhile_takes_no_token():
    scheduler = make_scheduler(slots=1)
    seq = make_seq("r", max_tokens=10)
    scheduler.add(seq)
    first, second = scheduler.schedule(), scheduler.schedule()  # launched ahead
    ended = scheduler.update(first.prefilled, [TOKEN]) + scheduler.update(first.decode, [EOS])
    assert ended == [seq] and seq.finish_reason == "stop"
    assert scheduler.update(second.decode, [TOKEN]) == []
    assert seq.output_ids == [TOKEN] and scheduler.generated_tokens == 2


# ----------------------------------------------------------------------------- finish rules


def run_to_end(seq: Sequence, tokens: list[int], max_model_len: int = 64) -> list[int]:
    """Feed `tokens` one step at a time until the request ends; what it kept."""
    scheduler = make_scheduler(slots=1, max_model_len=max_model_len)
    scheduler.add(seq)
    fed = iter(tokens)
    while not seq.finished:
        step(scheduler, lambda _: next(fed))
    assert scheduler.running == set() and scheduler.cache.num_used_blocks == 0
    return seq.output_ids


def test_max_tokens_ends_with_length_at_exactly_max_tokens():
    seq = make_seq("r", max_tokens=4)
    assert run_to_end(seq, [TOKEN] * 10) == [TOKEN] * 4 and seq.finish_reason == "length"


def test_the_contexts_end_ends_with_length_before_max_tokens():
    seq = make_seq("r", prompt_len=60, max_tokens=10, max_model_len=64)
    assert run_to_end(seq, [TOKEN] * 10, max_model_len=64) == [TOKEN] * 4 and seq.finish_reason == "length"


def test_eos_ends_with_stop_and_is_not_part_of_the_output():
    seq = make_seq("r", max_tokens=10)
    assert run_to_end(seq, [5, 6, EOS, 8]) == [5, 6] and seq.finish_reason == "stop"


def test_eos_as_the_first_token_ends_in_prefill_with_no_output():
    seq = make_seq("r", max_tokens=10)
    assert run_to_end(seq, [EOS]) == [] and seq.finish_reason == "stop"


def test_a_stop_token_ends_with_stop_and_eos_still_does():
    seq = make_seq("r", max_tokens=10, stop_token_ids=(STOP,))
    assert run_to_end(seq, [5, STOP, 8]) == [5] and seq.finish_reason == "stop"
    other = make_seq("s", max_tokens=10, stop_token_ids=(STOP,))
    assert run_to_end(other, [5, EOS, 8]) == [5] and other.finish_reason == "stop"


def test_ignore_eos_keeps_eos_as_a_token_but_not_a_stop_token():
    seq = make_seq("r", max_tokens=4, ignore_eos=True)
    assert run_to_end(seq, [EOS, 5, EOS, 6]) == [EOS, 5, EOS, 6] and seq.finish_reason == "length"
    stopped = make_seq("s", max_tokens=4, ignore_eos=True, stop_token_ids=(STOP,))
    assert run_to_end(stopped, [EOS, STOP]) == [EOS] and stopped.finish_reason == "stop"


def test_min_tokens_bans_eos_and_stop_tokens_until_it_is_reached_and_no_stop_counts_before():
    seq = make_seq("r", max_tokens=10, min_tokens=3, stop_token_ids=(STOP,))
    rule = seq.stop
    assert [rule.banned_token_ids(generated) for generated in range(5)] == [(EOS, STOP)] * 3 + [()] * 2
    # Were the sampler to choose one anyway, it would not end the request before min_tokens.
    assert run_to_end(seq, [EOS, STOP, 5, EOS]) == [EOS, STOP, 5] and seq.finish_reason == "stop"
    # With ignore_eos, EOS is banned too until min_tokens (as transformers' min_new_tokens does).
    assert make_seq("s", max_tokens=10, min_tokens=2, ignore_eos=True).stop.banned_token_ids(1) == (EOS,)


def test_min_tokens_above_max_tokens_still_ends_by_length():
    seq = make_seq("r", max_tokens=3, min_tokens=10)
    assert run_to_end(seq, [5, 6, 7, 8]) == [5, 6, 7] and seq.finish_reason == "length"


# ----------------------------------------------------------------------------- aborts


def test_an_aborted_waiting_request_leaves_the_queue_and_is_never_admitted():
    scheduler = make_scheduler(slots=1)
    running, waiting = make_seq("running"), make_seq("waiting")
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule()
    assert scheduler.abort(waiting) is True
    assert waiting.finish_reason == "abort" and list(scheduler.waiting) == []
    assert scheduler.abort(waiting) is False  # once only
    scheduler.abort(running)
    assert scheduler.schedule().empty and waiting.slot == -1 and not scheduler.has_work()


def test_an_abort_mid_prefill_frees_the_slot_and_the_cached_tokens():
    scheduler = make_scheduler(slots=1, budget=8)
    seq, after = make_seq("r", prompt_len=20), make_seq("after", prompt_len=3)
    scheduler.add(seq)
    scheduler.add(after)
    step(scheduler)
    assert seq.num_cached == 8 and scheduler.cache.num_used_blocks == 6  # the whole prompt's blocks, and one more
    assert scheduler.abort(seq) is True
    assert scheduler.cache.num_used_blocks == 0 and scheduler.running == set() and scheduler.prefilling == []
    plan = scheduler.schedule()
    assert after.slot == 0 and plan.chunks == [PrefillChunk(0, after.prompt, 0, want_logits=True, block_table=tuple(after.block_table))]


def test_an_abort_mid_decode_frees_the_slot_and_its_rows_in_flight_take_nothing():
    scheduler = make_scheduler(slots=1)
    seq = make_seq("r", max_tokens=10)
    scheduler.add(seq)
    step(scheduler)
    in_flight = scheduler.schedule()
    assert scheduler.abort(seq) is True
    assert scheduler.update(in_flight.decode, [TOKEN]) == []
    assert seq.output_ids == [TOKEN, TOKEN] and scheduler.decoding == [] and scheduler.cache.num_free_slots == 1
    assert scheduler.cache.num_used_blocks == 0 and scheduler.schedule().empty


def test_abort_all_ends_waiting_and_running_requests_and_empties_the_cache():
    scheduler = make_scheduler(slots=1)
    running, waiting, done = make_seq("running"), make_seq("waiting"), make_seq("done", max_tokens=1)
    for seq in (done, running, waiting):
        scheduler.add(seq)
    step(scheduler)  # done ends in prefill
    step(scheduler)
    assert set(scheduler.abort_all()) == {running, waiting}
    assert running.finish_reason == waiting.finish_reason == "abort" and done.finish_reason == "length"
    assert not scheduler.has_work() and scheduler.cache.num_used_blocks == 0 and scheduler.cache.num_free_slots == 1


# ----------------------------------------------------------------------------- a random mix


@pytest.mark.parametrize("seed", range(6))
def test_a_random_mix_keeps_every_rule_at_every_step(seed):
    """Requests of every kind arrive, run ahead one step or none, stop on EOS, are aborted; at every step no slot is
    held twice, the budget and the bound on a pass's K/V reads hold, the cache's count equals a recount; each request
    ends as its rule says."""
    rng = random.Random(seed)
    slots, budget, context = rng.choice([1, 2, 5]), rng.choice([4, 16, 64]), rng.choice([None, 24, 60])
    scheduler = make_scheduler(slots=slots, budget=budget, max_model_len=48, context=context)
    requests: list[Sequence] = []
    in_flight = None
    eos_at: dict[str, int] = {}

    def sample(seq: Sequence) -> int:
        return EOS if eos_at.get(seq.request_id) == len(seq.output_ids) + 1 else TOKEN

    for index in range(200):
        if rng.random() < 0.4:
            seq = make_seq(f"q{index}", prompt_len=rng.randint(1, 40), max_tokens=rng.randint(1, 12),
                           max_model_len=48, min_tokens=rng.choice([0, 0, 2]))
            if rng.random() < 0.3:
                eos_at[seq.request_id] = rng.randint(1, 6)
            scheduler.add(seq)
            requests.append(seq)
        if requests and rng.random() < 0.05:
            scheduler.abort(rng.choice(requests))
        plan = scheduler.schedule()
        assert_plan_within_limits(scheduler, plan, budget=budget, slots=slots, context=context)
        assert plan.slots == sorted(plan.slots) and all(seq.slot == slot for seq, slot in zip(plan.decode, plan.slots))
        # Run ahead or not, at random: this plan is read back now, or after the next one is laid out.
        run_ahead = rng.random() < 0.5
        read_back(scheduler, in_flight, sample)
        if not run_ahead:
            read_back(scheduler, plan, sample)
        in_flight = plan if run_ahead else None
        assert scheduler.cache.num_used_blocks == recount(scheduler)
    read_back(scheduler, in_flight, sample)
    while scheduler.has_work():
        read_back(scheduler, scheduler.schedule(), sample)
    assert scheduler.cache.num_used_blocks == 0 and scheduler.cache.num_free_slots == slots
    for seq in requests:
        # EOS ends a request only past min_tokens (before, the sampler would not have chosen it).
        eos = eos_at.get(seq.request_id, 99)
        stops = seq.stop.min_tokens < eos <= seq.stop.max_generated
        if seq.finish_reason == "abort":
            assert len(seq.output_ids) <= (eos - 1 if stops else seq.stop.max_generated)
        elif stops:
            assert (seq.finish_reason, len(seq.output_ids)) == ("stop", eos - 1), seq
        else:
            assert (seq.finish_reason, len(seq.output_ids)) == ("length", seq.stop.max_generated), seq
    assert any(seq.finish_reason == "stop" for seq in requests) and any(seq.finish_reason == "length" for seq in requests)
