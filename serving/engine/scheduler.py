"""The engine's scheduler: which requests run, what each step computes for them, and when each one ends.

Pure bookkeeping, owned by the engine thread: no torch, no threads, no locks, so every rule here is tested by
driving `schedule` and `update` with made-up tokens (`tests/serving/test_scheduler.py`). The shape is
nano-vLLM's (`add`, `schedule`, then the tokens go back through `update`), the plan vLLM v1's `SchedulerOutput`
cut down to what this engine runs: one prefill pass and one decode step per engine step.

- `add` queues a request; `schedule()` first gives every decoding request the KV block its next row writes into,
  preempting the youngest request when none is free; then, unless it preempted, admits queued requests while their
  blocks fit (`BlockManager`, the one object that accounts for the cache; a cached prefix is shared, not
  prefilled); spends the prefill budget on prompts in the order they were admitted (a long prompt is split into
  chunks across steps), within a bound on the K/V the pass's attention reads (a chunk deep into a long context reads
  all of it); and lays out one decode row for every request whose prompt is in the cache, in slot order.
- Preemption is recomputation, as vLLM's default: the preempted request gives back its blocks (their full ones stay
  in the prefix cache) and goes back to the front of the queue with its prompt and the tokens it has generated as
  the prompt to prefill again. Only a request with no token in flight can be preempted (its tokens must be known);
  a row that gets no block and finds no such request waits a step, until the step in flight is read back.
- `update(rows, sampled)` takes the tokens a pass chose for its rows, applies the finish rules (`StopRule`: length,
  EOS, stop tokens, min_tokens, ignore_eos), frees the cache of the requests that ended and returns them.
- `abort` ends a request wherever it is.

The engine may launch a step before it has read the previous step's tokens back (run-ahead, `LLMEngine`), so a plan
is laid out from what is known without them: `Sequence.launched` counts the tokens the passes launched so far will
choose, read back or not, and a request whose token in flight ends it by length gets no row. A request that stops on
EOS is known to have ended only when that token is read back; a row already laid out for it is simply passed over.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from typing import Sequence as Seq

from serving.engine.block_manager import BlockManager
from serving.engine.interface import FinishReason, SamplingParams


@dataclass(frozen=True, slots=True)
class StopRule:
    """When one request's sequence ends, worked out once when it is submitted (checked for every token)."""

    stop_token_ids: frozenset[int]
    """Tokens that end it with `stop`: its stop_token_ids, and the model's EOS ids unless ignore_eos."""
    max_generated: int
    """It ends with `length` at this many generated tokens: max_tokens, or what the context has left."""
    min_tokens: int = 0
    """No token up to this many ends it with `stop`; the sampler bans them that long (`banned_token_ids`)."""
    banned_until_min: tuple[int, ...] = ()
    """What the sampler must not choose before min_tokens: the model's EOS ids (even with ignore_eos) and the stop
    tokens."""

    @classmethod
    def of(cls, params: SamplingParams, prompt_len: int, eos_token_ids: tuple[int, ...],
           max_model_len: int) -> "StopRule":
        stops = frozenset(params.stop_token_ids) | frozenset(() if params.ignore_eos else eos_token_ids)
        return cls(stops, min(params.max_tokens, max_model_len - prompt_len), params.min_tokens,
                   tuple(eos_token_ids) + tuple(params.stop_token_ids))

    def reason(self, token_id: int, num_generated: int) -> FinishReason | None:
        """Why the sequence ends after `token_id`, its `num_generated`-th token, or None if it goes on."""
        # The min_tokens check only runs for a stop token: the sampler's ban makes it a guard, not a cost per token.
        if token_id in self.stop_token_ids and num_generated > self.min_tokens:
            return "stop"
        if num_generated >= self.max_generated:
            return "length"
        return None

    def banned_token_ids(self, num_generated: int) -> tuple[int, ...]:
        """Tokens the sampler must not choose after `num_generated` tokens: EOS and stop tokens before min_tokens."""
        return self.banned_until_min if num_generated < self.min_tokens else ()


@dataclass(eq=False, slots=True)
class Sequence:
    """One request as the scheduler sees it. The engine subclasses it with what it needs to sample and emit."""

    request_id: str
    prompt: tuple[int, ...]
    stop: StopRule
    slot: int = -1
    """Its decode row (`BlockManager`), -1 while it is not running."""
    num_cached: int = 0
    """Prefill tokens (`prefill_tokens`) whose K/V are in the cache, or will be once the passes launched so far have
    run, a cached prefix included."""
    block_table: list[int] = field(default_factory=list)
    """Its KV blocks: position p is in block `block_table[p // block_size]`."""
    prefix_hashes: list[int] = field(default_factory=list)
    """The prefix hashes of its leading full blocks, as registered in the prefix cache."""
    recompute: tuple[int, ...] = ()
    """After a preemption: the prompt and the tokens generated before it, prefilled again on readmission."""
    admitted: int = -1
    """When it was last admitted (a step count): the youngest running request is preempted first."""
    launched: int = 0
    """Tokens the passes launched so far choose for it: `len(output_ids)`, plus those not read back yet."""
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None

    @property
    def prefill_tokens(self) -> tuple[int, ...]:
        """What its prefill computes: the prompt, or after a preemption the prompt and the tokens generated."""
        return self.recompute or self.prompt


S = TypeVar("S", bound=Sequence)
"""The scheduler's sequences: `Sequence`, or the engine's subclass that also carries how to sample and stream."""


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Prompt tokens `token_ids` of the request in `slot`, at positions start.. of its sequence, whose K/V go to
    the blocks of `block_table`."""

    slot: int
    token_ids: Seq[int]
    start: int
    want_logits: bool = False
    """Whether this chunk ends the prompt, so the logits of its last token are needed."""
    block_table: Seq[int] = ()
    """The request's blocks, covering at least positions 0..end - 1."""

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(slots=True)
class StepPlan(Generic[S]):
    """What one engine step computes: a prefill pass, then a decode step (either may be empty)."""

    chunks: list[PrefillChunk]
    """The prefill pass: prompt chunks within the step's token budget, in admission order."""
    prefilled: list[S]
    """The requests whose prompts these chunks complete, in chunk order: the pass chooses their first token."""
    decode: list[S]
    """The decode step's rows, in slot order: each feeds its token number `launched - 1` and chooses the next."""
    slots: list[int]
    """Each decode row's slot."""
    positions: list[int]
    """Each decode row's position: where the token it feeds goes in the cache."""
    block_tables: list[list[int]] = field(default_factory=list)
    """Each decode row's blocks, covering its position."""
    preempted: list[S] = field(default_factory=list)
    """Requests preempted while laying this plan out (back in the queue, to be recomputed)."""

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.decode


class Scheduler(Generic[S]):
    """Admission, preemption, chunked prefill and finish rules over one `BlockManager`; see the module docstring."""

    def __init__(self, cache: BlockManager, max_prefill_tokens: int,
                 max_prefill_context_tokens: int | None = None) -> None:
        self.cache = cache
        self.max_prefill_tokens = max_prefill_tokens
        """New prompt tokens per prefill pass."""
        self.max_prefill_context_tokens = max_prefill_context_tokens
        """The most K/V a prefill pass's attention reads, counted as the sum of its chunks' ends (each chunk attends to
        its whole prefix); a chunk that would pass it waits for the next step, unless it is the pass's first. None:
        no bound."""
        self.waiting: deque[S] = deque()
        self.running: set[S] = set()
        """Requests holding a row and blocks: the prefilling and the decoding."""
        self.prefilling: list[S] = []
        """In admission order: the prefill budget goes to the oldest prompt first."""
        self.decoding: list[S] = []
        """In slot order, so that a full batch is laid out as it stands (`ModelRunner.decode`)."""
        self.generated_tokens = 0
        """Tokens chosen for requests that had not ended, since the start (a counter for metrics)."""
        self.num_preemptions = 0
        """Requests preempted since the start (a counter for metrics)."""
        self._admissions = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: S) -> None:
        self.waiting.append(seq)

    def abort(self, seq: S) -> bool:
        """End a request now, waiting or running, with finish reason `abort`; False if it had already ended."""
        if seq.finished:
            return False
        if seq not in self.running:
            self.waiting.remove(seq)
            seq.finished, seq.finish_reason = True, "abort"
        else:
            self._finish(seq, "abort")
        return True

    def abort_all(self) -> list[S]:
        """End every request (the engine is stopping, or has died in the middle of a step); those that had not ended
        yet."""
        ended = [seq for seq in [*self.waiting, *self.running] if not seq.finished]
        for seq in ended:
            seq.finished, seq.finish_reason = True, "abort"
        for seq in self.running:
            self.cache.free(seq)
        self.waiting.clear()
        self.running.clear()
        self.prefilling.clear()
        self.decoding.clear()
        return ended

    def schedule(self) -> StepPlan[S]:
        """Give decode rows their blocks (preempting if need be), admit, then lay out the next step. Its chunks count
        as cached and its rows as launched from here on."""
        cache = self.cache
        rows: list[S] = []
        preempted: list[S] = []
        for seq in list(self.decoding):
            if seq.finished or seq not in self.running:  # preempted for an older row above
                continue
            launched = seq.launched
            # Not a request whose token in flight ends it by length: it leaves when that token is read back.
            if launched >= seq.stop.max_generated:
                continue
            position = len(seq.prompt) + launched - 1
            while not cache.append_slot(seq, position):
                victim = self._victim()
                if victim is None:  # every other holder has tokens in flight: this row waits for the read back
                    break
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                rows.append(seq)
        waiting = self.waiting
        if not preempted:
            while waiting and cache.can_allocate(waiting[0]):
                seq = waiting.popleft()
                seq.num_cached = cache.allocate(seq)
                seq.admitted = self._admissions
                self._admissions += 1
                self.running.add(seq)
                self.prefilling.append(seq)
        chunks, prefilled = self._plan_prefill()
        decode, slots, positions, tables = [], [], [], []
        if prefilled:  # their blocks cover their first decode row's position (`BlockManager.allocate`)
            rows = sorted([*(seq for seq in rows if seq in self.running), *prefilled], key=_slot_of)
        for seq in rows:
            if seq not in self.running:
                continue
            launched = seq.launched
            decode.append(seq)
            slots.append(seq.slot)
            positions.append(len(seq.prompt) + launched - 1)
            tables.append(seq.block_table)
            seq.launched = launched + 1
        return StepPlan(chunks, prefilled, decode, slots, positions, tables, preempted)

    def update(self, rows: Iterable[S], sampled: Iterable[int]) -> list[S]:
        """Append the tokens a pass chose (`sampled[i]` for `rows[i]`: a plan's `prefilled`, or its `decode`) and end
        the requests that are done; the ones that ended. A row of a request that has already ended (an abort, or a
        step launched before its end was known) takes no token."""
        finished: list[S] = []
        generated = 0
        for seq, token in zip(rows, sampled):
            if seq.finished:
                continue
            generated += 1
            output_ids = seq.output_ids
            reason = seq.stop.reason(token, len(output_ids) + 1)
            # The token that stops a sequence (EOS or a stop token) is not part of its output.
            if reason != "stop":
                output_ids.append(token)
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
        self.generated_tokens += generated
        return finished

    def _plan_prefill(self) -> tuple[list[PrefillChunk], list[S]]:
        """This step's prompt chunks within the token budget, and the requests whose prompts they complete (which
        move to decoding, their next token launched)."""
        budget = self.max_prefill_tokens
        context = self.max_prefill_context_tokens
        chunks: list[PrefillChunk] = []
        prefilled: list[S] = []
        for seq in self.prefilling:
            if budget == 0:
                break
            tokens = seq.prefill_tokens
            start = seq.num_cached
            count = min(budget, len(tokens) - start)
            if context is not None:
                if chunks and start + count > context:  # the oldest prompts first: later ones wait their turn
                    break
                context -= start + count
            done = start + count == len(tokens)
            chunks.append(PrefillChunk(seq.slot, tokens[start : start + count], start, want_logits=done,
                                       block_table=tuple(seq.block_table)))
            seq.num_cached = start + count
            # Launched K/V are as good as written for a later request: the device runs passes in launch order.
            self.cache.cache_full_blocks(seq, tokens, seq.num_cached)
            budget -= count
            if done:
                prefilled.append(seq)
        if prefilled:
            for seq in prefilled:
                self.prefilling.remove(seq)
                seq.launched = len(seq.output_ids) + 1
            self.decoding += prefilled
            self.decoding.sort(key=_slot_of)
        return chunks, prefilled

    def _victim(self) -> S | None:
        """The youngest running request with no token in flight (every prefilling one, and a decoding one whose tokens
        are all read back), or None."""
        candidates = [*self.prefilling, *(seq for seq in self.decoding if seq.launched == len(seq.output_ids))]
        return max(candidates, key=_admitted, default=None)

    def _preempt(self, seq: S) -> None:
        """Give back `seq`'s blocks and queue it first, to prefill its prompt and its tokens again."""
        written = self._release(seq)
        if written is not None:
            seq.recompute = written
        seq.num_cached = 0
        seq.launched = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _finish(self, seq: S, reason: FinishReason) -> None:
        seq.finished, seq.finish_reason = True, reason
        self._release(seq)

    def _release(self, seq: S) -> tuple[int, ...] | None:
        """Take `seq` off the running lists and give back its blocks. A decoding request's prompt and every generated
        token but the last (never fed back) have their K/V written: those full blocks stay in the prefix cache, and
        its tokens are returned; a prefilling request's chunks cached theirs as they were launched (None)."""
        written = None
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        else:
            self.decoding.remove(seq)
            written = seq.prompt + tuple(seq.output_ids)
            self.cache.cache_full_blocks(seq, written, len(written) - 1)
        self.running.discard(seq)
        self.cache.free(seq)
        return written


def _slot_of(seq: Sequence) -> int:
    return seq.slot


def _admitted(seq: Sequence) -> int:
    return seq.admitted
