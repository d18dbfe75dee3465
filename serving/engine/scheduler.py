"""The engine's scheduler: which requests run, what each step computes for them, and when each one ends.

Pure bookkeeping, owned by the engine thread: no torch, no threads, no locks, so every rule here is tested by
driving `schedule` and `update` with made-up tokens (`tests/serving/test_scheduler.py`). The shape is
nano-vLLM's (`add`, `schedule`, then the tokens go back through `update`), the plan vLLM v1's `SchedulerOutput`
cut down to what this engine runs: one prefill pass and one decode step per engine step.

- `add` queues a request; `schedule()` admits queued requests while the KV cache has room for them (`SlotPool`,
  the one object that accounts for the cache), spends the prefill budget on prompts in the order they were
  admitted (a long prompt is split into chunks across steps), and lays out one decode row for every request whose
  prompt is in the cache, in slot order.
- `update(rows, sampled)` takes the tokens a pass chose for its rows, applies the finish rules (`StopRule`: length,
  EOS, stop tokens, min_tokens, ignore_eos), frees the cache of the requests that ended and returns them.
- `abort` ends a request wherever it is.

The engine may launch a step before it has read the previous step's tokens back (run-ahead, `LLMEngine`), so a plan
is laid out from what is known without them: `Sequence.launched` counts the tokens the passes launched so far will
choose, read back or not, and a request whose token in flight ends it by length gets no row. A request that stops on
EOS is known to have ended only when that token is read back; a row already laid out for it is simply passed over.
"""
from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Sequence as Seq

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
    """Its place in the KV cache (`SlotPool`), -1 while it has none."""
    num_cached: int = 0
    """Prompt tokens whose K/V are in the cache, or will be once the passes launched so far have run."""
    launched: int = 0
    """Tokens the passes launched so far choose for it: `len(output_ids)`, plus those not read back yet."""
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Prompt tokens `token_ids` of the request in `slot`, at positions start.. of its sequence."""

    slot: int
    token_ids: Seq[int]
    start: int
    want_logits: bool = False
    """Whether this chunk ends the prompt, so the logits of its last token are needed."""

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(slots=True)
class StepPlan:
    """What one engine step computes: a prefill pass, then a decode step (either may be empty)."""

    chunks: list[PrefillChunk]
    """The prefill pass: prompt chunks within the step's token budget, in admission order."""
    prefilled: list[Sequence]
    """The requests whose prompts these chunks complete, in chunk order: the pass chooses their first token."""
    decode: list[Sequence]
    """The decode step's rows, in slot order: each feeds its token number `launched - 1` and chooses the next."""
    slots: list[int]
    """Each decode row's slot."""
    positions: list[int]
    """Each decode row's position: where the token it feeds goes in the cache."""

    @property
    def empty(self) -> bool:
        return not self.chunks and not self.decode


class SlotPool:
    """KV-cache accounting over the runner's static slots: one slot of `max_model_len` tokens per running request.

    The scheduler asks it whether a request fits (`can_allocate`), gives it one (`allocate`), tells it the tokens
    that enter the cache (`add_tokens`) and gives the space back when the request ends (`free`); a paged pool with
    prefix caching can take its place behind the same questions. The lowest free slot goes first, so a small batch
    stays in the first slots and decode runs over the smallest batch bucket."""

    def __init__(self, num_slots: int, max_model_len: int) -> None:
        self.num_slots = num_slots
        self.capacity_tokens = num_slots * max_model_len
        self.used_tokens = 0
        """Tokens of the requests holding a slot: prompt tokens cached plus tokens generated."""
        self._free = list(range(num_slots))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, seq: Sequence) -> bool:
        return bool(self._free)

    def allocate(self, seq: Sequence) -> None:
        seq.slot = heapq.heappop(self._free)

    def add_tokens(self, count: int) -> None:
        self.used_tokens += count

    def free(self, seq: Sequence) -> None:
        self.used_tokens -= seq.num_cached + len(seq.output_ids)
        heapq.heappush(self._free, seq.slot)
        seq.slot = -1


class Scheduler:
    """Admission, chunked prefill and finish rules over one `SlotPool`; see the module docstring."""

    def __init__(self, cache: SlotPool, max_prefill_tokens: int) -> None:
        self.cache = cache
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: set[Sequence] = set()
        """Requests holding a slot: the prefilling and the decoding."""
        self.prefilling: list[Sequence] = []
        """In admission order: the prefill budget goes to the oldest prompt first."""
        self.decoding: list[Sequence] = []
        """In slot order, so that a full batch is laid out as it stands (`ModelRunner.decode`)."""
        self.generated_tokens = 0
        """Tokens chosen for requests that had not ended, since the start (a counter for metrics)."""

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> bool:
        """End a request now, waiting or running, with finish reason `abort`; False if it had already ended."""
        if seq.finished:
            return False
        if seq.slot < 0:
            self.waiting.remove(seq)
            seq.finished, seq.finish_reason = True, "abort"
        else:
            self._finish(seq, "abort")
        return True

    def abort_all(self) -> list[Sequence]:
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

    def schedule(self) -> StepPlan:
        """Admit, then lay out the next step. Its chunks count as cached and its rows as launched from here on."""
        waiting, cache = self.waiting, self.cache
        while waiting and cache.can_allocate(waiting[0]):
            seq = waiting.popleft()
            cache.allocate(seq)
            self.running.add(seq)
            self.prefilling.append(seq)
        chunks, prefilled = self._plan_prefill()
        decode, slots, positions = [], [], []
        for seq in self.decoding:
            launched = seq.launched
            # Not a request whose token in flight ends it by length: it leaves when that token is read back.
            if launched < seq.stop.max_generated:
                decode.append(seq)
                slots.append(seq.slot)
                positions.append(seq.num_cached + launched - 1)
                seq.launched = launched + 1
        return StepPlan(chunks, prefilled, decode, slots, positions)

    def update(self, rows: Iterable[Sequence], sampled: Iterable[int]) -> list[Sequence]:
        """Append the tokens a pass chose (`sampled[i]` for `rows[i]`: a plan's `prefilled`, or its `decode`) and end
        the requests that are done; the ones that ended. A row of a request that has already ended (an abort, or a
        step launched before its end was known) takes no token."""
        finished: list[Sequence] = []
        appended = generated = 0
        for seq, token in zip(rows, sampled):
            if seq.finished:
                continue
            generated += 1
            output_ids = seq.output_ids
            reason = seq.stop.reason(token, len(output_ids) + 1)
            # The token that stops a sequence (EOS or a stop token) is not part of its output.
            if reason != "stop":
                output_ids.append(token)
                appended += 1
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
        self.cache.add_tokens(appended)
        self.generated_tokens += generated
        return finished

    def _plan_prefill(self) -> tuple[list[PrefillChunk], list[Sequence]]:
        """This step's prompt chunks within the token budget, and the requests whose prompts they complete (which
        move to decoding, their first token launched)."""
        budget = self.max_prefill_tokens
        chunks: list[PrefillChunk] = []
        prefilled: list[Sequence] = []
        for seq in self.prefilling:
            if budget == 0:
                break
            start = seq.num_cached
            count = min(budget, len(seq.prompt) - start)
            done = start + count == len(seq.prompt)
            chunks.append(PrefillChunk(seq.slot, seq.prompt[start : start + count], start, want_logits=done))
            seq.num_cached = start + count
            budget -= count
            if done:
                prefilled.append(seq)
        self.cache.add_tokens(self.max_prefill_tokens - budget)
        if prefilled:
            for seq in prefilled:
                self.prefilling.remove(seq)
                seq.launched = 1
            self.decoding += prefilled
            self.decoding.sort(key=_slot_of)
        return chunks, prefilled

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finished, seq.finish_reason = True, reason
        (self.decoding if seq.num_cached == len(seq.prompt) else self.prefilling).remove(seq)
        self.running.discard(seq)
        self.cache.free(seq)


def _slot_of(seq: Sequence) -> int:
    return seq.slot
