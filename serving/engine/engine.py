"""`LLMEngine`: continuous batching on one dedicated thread, streaming tokens to asyncio callers.

The caller's event loop never runs model code. `generate()` validates and queues under a lock and returns a
stream; the engine-loop thread hands new and aborted requests to the `Scheduler` (`serving.engine.scheduler`, which
decides what runs and when a request ends) and runs one step per iteration (`LLMEngine._step`):

    plan = scheduler.schedule()            # admission, prefill chunks within the budget, decode rows
    launch(plan)                           # the prefill pass, then the decode step, tokens chosen on the device
    emit(pending)                          # what the step before produced goes out while the device works
    update(read back the step before)      # the scheduler appends its tokens and ends finished requests
    emit(pending), if nothing is in flight

Outputs go to each request's `OutputSink` in one call per sink per step: for `generate()`, the caller's event loop
(`loop.call_soon_threadsafe`); for `submit()`, whatever the caller gives, such as the pipe to the HTTP process
(`serving.engine.process`). The thread sleeps on a condition variable when there is no work.

On CUDA the loop's own work overlaps the device's (`EngineConfig.overlap`): each step is launched with the tokens
the step before chose still on the device, and the host reads, appends and sends those while the new step runs.
Without overlap (CPU's default) a step is read back as soon as it is launched.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.engine.attention import select_attention
from serving.engine.block_manager import BlockManager
from serving.engine.config import DEFAULT_MAX_NUM_SEQS_CPU, DEFAULT_MAX_NUM_SEQS_GPU, EngineConfig
from serving.engine.cuda_graphs import capture_decode_graphs
from serving.engine.interface import (
    EngineDeadError,
    EngineStats,
    GenerationRequest,
    ModelInfo,
    ModelLoadError,
    QueueFullError,
    SamplingParams,
    TokenOutput,
    check_request,
)
from serving.engine.loader import load_model, resolve_device, resolve_dtype
from serving.engine.model_runner import (
    PREFILL_GATHER_TOKENS,
    KVCachePlan,
    ModelRunner,
    kv_bytes_per_token,
    kv_cache_budget_bytes,
    model_context_len,
    plan_kv_cache,
)
from serving.engine.sampling import RowSampling, sample_tokens
from serving.engine.scheduler import Scheduler, Sequence, StepPlan, StopRule
from serving.engine.stream import LoopSink, Mailbox, OutputSink, StreamItem, TokenStream

logger = logging.getLogger("serving.engine")

_READ_BACK_AFTER_FAILURE_S = 5.0
"""How long a dying loop waits for the device to finish the steps in flight before failing their requests."""
_STOP_LOOP_S = 10.0
"""How long shutdown() waits for the loop thread to stop (it finishes its step first): a device call that never
returns would otherwise hold the server's exit until the kubelet kills the pod, its streams never ended."""


@dataclass(eq=False, slots=True, kw_only=True)
class _Request(Sequence):
    """A request's sequence with what the engine needs besides the scheduler: how to sample it, where its outputs go
    and how far they have gone. After it is queued only the loop thread touches it."""

    request: GenerationRequest
    params: SamplingParams
    sink: OutputSink
    handle: object
    """What `sink` delivers this request's outputs to (its stream's queue, or its request id)."""
    generator: torch.Generator | None
    argmax_from: float
    """Output length from which a plain argmax picks its next token: min_tokens for a greedy request (EOS and stop
    tokens are banned before that), never for a sampled one."""
    num_emitted: int = 0
    final_emitted: bool = False


_Part = tuple[list[_Request], torch.Tensor]
"""A launched pass's rows and the tokens it chose for them, on the device."""


class _InFlight:
    """Launched passes' tokens not yet read back: parts of (sequences, their tokens on the device), in launch order (a
    prefill pass's first tokens, then a decode step's). The next step is fed from `sources` (`rows`), and reading
    waits for these passes only, not for steps launched after them."""

    __slots__ = ("parts", "sources", "_starts", "_copy")

    def __init__(self, parts: list[_Part]) -> None:
        self.parts = parts
        self._starts = list(itertools.accumulate((len(seqs) for seqs, _ in parts), initial=0))
        """Where each part's rows start in `sources`."""
        tensors = [tokens for _, tokens in parts]
        self.sources = [torch.cat(tensors) if len(tensors) > 1 else tensors[0]]
        self._copy = self._copy_back(self.sources[0])

    @staticmethod
    def _copy_back(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event] | None:
        """Start copying `tokens` to the host, without waiting: (pinned host tensor, event recorded after the copy). On
        CPU, None: the tokens are read as they are."""
        if not tokens.is_cuda:
            return None
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(tokens.device))
        return host, ready

    def rows(self) -> dict[_Request, int]:
        """Each sequence's latest token: its row in `sources`."""
        rows: dict[_Request, int] = {}
        for (seqs, _), start in zip(self.parts, self._starts):
            for index, seq in enumerate(seqs, start):
                rows[seq] = index
        return rows

    def read(self, timeout_s: float | None = None) -> list[tuple[list[_Request], list[int]]]:
        """Each part's sequences and tokens, on the host; with `timeout_s`, TimeoutError if the device takes longer."""
        if self._copy is None:
            tokens = self.sources[0].tolist()
        else:
            host, ready = self._copy
            if timeout_s is not None:
                deadline = time.monotonic() + timeout_s
                while not ready.query():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the device did not finish the steps in flight within {timeout_s:g} s")
                    time.sleep(0.001)
            ready.synchronize()
            tokens = host.tolist()
        starts = self._starts
        return [(seqs, tokens[start:end]) for (seqs, _), start, end in zip(self.parts, starts, starts[1:])]


class LLMEngine:
    """Implements `serving.engine.interface.Engine` over `Scheduler` and `ModelRunner`."""

    def __init__(self, runner: ModelRunner, tokenizer: object, model_info: ModelInfo, config: EngineConfig) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_info = model_info
        self.config = config
        self.scheduler: Scheduler[_Request] = Scheduler(
            BlockManager(runner.num_blocks, runner.block_size, runner.num_slots,
                         enable_prefix_caching=config.enable_prefix_caching),
            max_prefill_tokens=config.max_prefill_tokens_per_step,
            max_prefill_context_tokens=PREFILL_GATHER_TOKENS,
        )
        self._overlap = config.overlap if config.overlap is not None else runner.device.type == "cuda"
        self._wakeup = threading.Condition(threading.RLock())
        # Shared with callers, guarded by _wakeup. The scheduler is the loop thread's; callers only read its lengths.
        self._submitted: list[_Request] = []
        """Requests queued since the loop last took them (`_take_requests`)."""
        self._aborted: list[_Request] = []
        self._live: dict[str, _Request] = {}
        """Every request not ended yet, by id."""
        self._stopping = False
        self._dead = False
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._kv_usage = 0.0
        """Blocks held by running requests, as a fraction of the pool (copied from the loop thread's scheduler)."""
        self._prefix_queried = self._prefix_hits = self._preemptions = 0
        # Owned by the loop thread.
        self._pending: list[_Request] = []
        """Requests the last read back gave tokens or ended, emitted during the next step (`_step`)."""
        self._in_flight: _InFlight | None = None
        """With overlap, the last step's tokens, launched and not read back yet."""
        self._launching: list[_Part] = []
        """This step's passes launched so far (`_launch`), kept for a loop that dies before reading them back."""
        self._read_failed = False
        """A read back failed before all its tokens were appended: the loop is dying, and no later tokens may be read
        back after the missing ones."""
        self._generated_counted = 0
        """`scheduler.generated_tokens` when the last emit added it to `_generation_tokens_total`."""
        self._thread: threading.Thread | None = None


    @classmethod
    def from_model_dir(cls, path: str | Path, config: EngineConfig | None = None) -> "LLMEngine":
        """Load and validate the model, size the KV cache and build the engine (slow; call it in a thread)."""
        config = config or EngineConfig()
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        loaded = load_model(path, device, dtype)
        hf_config = loaded.model.config
        context_len = model_context_len(hf_config)
        if config.max_model_len is not None and config.max_model_len > context_len:
            raise ModelLoadError(
                f"max_model_len {config.max_model_len} exceeds what this model supports ({context_len}: "
                "max_position_embeddings, or the sliding window); lower max_model_len"
            )
        default_slots = DEFAULT_MAX_NUM_SEQS_GPU if device.type == "cuda" else DEFAULT_MAX_NUM_SEQS_CPU
        num_slots = config.max_num_seqs or default_slots
        graphs = config.cuda_graphs and device.type == "cuda"
        plan = plan_kv_cache(
            bytes_per_token=kv_bytes_per_token(hf_config, dtype),
            budget_bytes=kv_cache_budget_bytes(
                device, hf_config, dtype, memory_utilization=config.gpu_memory_utilization,
                num_slots=num_slots, max_prefill_tokens=config.max_prefill_tokens_per_step,
                max_model_len=config.max_model_len or context_len, decode_graphs=graphs,
            ),
            num_slots=num_slots,
            max_model_len=config.max_model_len or context_len,
            max_model_len_is_default=config.max_model_len is None,
            block_size=config.block_size,
        )
        if config.num_kv_blocks is not None:
            if config.num_kv_blocks * plan.block_size < plan.max_model_len:
                raise ModelLoadError(
                    f"num_kv_blocks {config.num_kv_blocks} x block_size {plan.block_size} holds fewer tokens than one "
                    f"sequence of max_model_len {plan.max_model_len}; raise num_kv_blocks or lower max_model_len")
            plan = KVCachePlan(plan.num_slots, plan.max_model_len, config.num_kv_blocks, plan.block_size)
        runner = ModelRunner(loaded.model, plan,
                             attention=lambda shape: select_attention(config.attention, shape, dtype))
        if graphs:
            capture_decode_graphs(runner, config.attention)
        vocab_size = int(hf_config.vocab_size)
        model_info = ModelInfo(
            max_model_len=plan.max_model_len,
            vocab_size=vocab_size,
            eos_token_ids=tuple(t for t in loaded.eos_token_ids if 0 <= t < vocab_size),
            dtype=str(dtype).removeprefix("torch."),
            device=str(device) if device.type == "cpu" else f"cuda:{device.index or 0}",
        )
        logger.info(
            "engine ready to start: %s on %s (%s), %d KV blocks of %d tokens, up to %d sequences of up to %d tokens, "
            "prefix caching %s, %s attention",
            Path(path).name, model_info.device, model_info.dtype, plan.num_blocks, plan.block_size, plan.num_slots,
            plan.max_model_len, "on" if config.enable_prefix_caching else "off", runner.attention.name,
        )
        return cls(runner, loaded.tokenizer, model_info, config)

    # ----------------------------------------------------------------- caller side (any thread / event loop)

    async def start(self) -> None:
        """Start the engine-loop thread and run one warm-up generation; returns when ready to serve."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run_loop, name="llm-engine-loop", daemon=True)
        self._thread.start()
        warmup_len = min(self.config.warmup_tokens, self.model_info.max_model_len // 2)
        if warmup_len > 0:
            prompt = tuple(index % self.model_info.vocab_size for index in range(warmup_len))
            # Sampled with top_p so the sort/scatter path is exercised as well as the forward pass.
            params = SamplingParams(max_tokens=warmup_len, temperature=1.0, top_p=0.9, seed=0, ignore_eos=True)
            async for _ in self.generate(GenerationRequest("engine-warmup", prompt, params)):
                pass
        with self._wakeup:
            self._prompt_tokens_total = 0
            self._generation_tokens_total = 0

    def generate(self, request: GenerationRequest) -> TokenStream:
        """Validate and enqueue now (raising QueueFullError / EngineDeadError / ValueError at once) and
        return the request's token stream. Must be called from the event loop that will consume it."""
        queue = Mailbox()
        seq = self.submit(request, LoopSink.of(asyncio.get_running_loop()), queue)
        return TokenStream(queue, lambda: self._abort_sequence(seq))

    def submit(self, request: GenerationRequest, sink: OutputSink, handle: object) -> _Request:
        """Validate and enqueue now, raising as `generate` does; from any thread. The request's outputs (and an
        EngineDeadError if the loop dies) go to `sink.deliver([(handle, output), ...])` from the loop thread, the
        last output with a finish reason. Abort it with `abort(request.request_id)`."""
        check_request(request, self.model_info)
        params = request.sampling
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        prompt = request.prompt_token_ids
        seq = _Request(request.request_id, prompt,
                       StopRule.of(params, len(prompt), self.model_info.eos_token_ids, self.model_info.max_model_len),
                       request=request, params=params, sink=sink, handle=handle, generator=generator,
                       argmax_from=params.min_tokens if params.temperature == 0 else math.inf)
        with self._wakeup:
            if self._dead:
                raise EngineDeadError("the engine loop has died; the server must be restarted")
            if self._stopping:
                raise EngineDeadError("the engine is shutting down")
            if request.request_id in self._live:
                raise ValueError(f"request_id {request.request_id!r} is already running; use a unique id")
            waiting = self._num_waiting()
            if waiting >= self.config.max_waiting:
                raise QueueFullError(f"{waiting} requests are already waiting (max_waiting); retry later")
            self._submitted.append(seq)
            self._live[request.request_id] = seq
            self._prompt_tokens_total += len(prompt)
            self._wakeup.notify()
        return seq

    def abort(self, request_id: str) -> None:
        with self._wakeup:
            seq = self._live.get(request_id)
        if seq is not None:
            self._abort_sequence(seq)

    def stats(self) -> EngineStats:
        with self._wakeup:
            return EngineStats(
                waiting=self._num_waiting(),
                running=len(self.scheduler.running),
                max_running=self.runner.num_slots,
                kv_cache_usage=self._kv_usage,
                kv_cache_capacity_tokens=self.scheduler.cache.capacity_tokens,
                prefix_cache_queried_tokens_total=self._prefix_queried,
                prefix_cache_hit_tokens_total=self._prefix_hits,
                preemptions_total=self._preemptions,
                prompt_tokens_total=self._prompt_tokens_total,
                generation_tokens_total=self._generation_tokens_total,
                loop_alive=self._loop_alive(),
                device=self.model_info.device,
                attention=self.runner.attention.name,
                kv_block_size=self.runner.block_size,
            )

    async def shutdown(self) -> None:
        """Abort every request (their streams end with finish reason `abort`) and join the loop thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, _STOP_LOOP_S)
            if not self._thread.is_alive():
                return
            logger.error("the engine loop did not stop within %g s (a device call does not return); its requests "
                         "end here without it", _STOP_LOOP_S)
        self._finish_all_live(None)

    def _num_waiting(self) -> int:
        """Requests not admitted yet (under `_wakeup`: the scheduler admits only from its queue, so the sum never
        counts one twice)."""
        return len(self._submitted) + len(self.scheduler.waiting)

    def _abort_sequence(self, seq: _Request) -> None:
        # Runs from any thread, including a garbage-collector pass on the loop thread itself (the lock
        # is reentrant for that reason); the loop ends the request at its next step boundary.
        with self._wakeup:
            if seq.finished or self._live.get(seq.request_id) is not seq:
                return
            self._aborted.append(seq)
            self._wakeup.notify()

    def _loop_alive(self) -> bool:
        if self._dead:
            return False
        return self._thread is None or self._thread.is_alive()

    # ----------------------------------------------------------------- loop thread

    def _run_loop(self) -> None:
        try:
            while (aborted := self._take_requests()) is not None:
                # Outside the lock: a sink may block (a full pipe) and must not hold up submit() or abort().
                self._emit(aborted)
                self._step()
            self._read_back_in_flight()
            self._emit_pending()
            self._finish_all_live(None)
        except BaseException as exc:
            logger.exception("engine loop died; failing every pending request")
            with self._wakeup:
                self._dead = True
            try:  # what earlier steps produced still reaches its requests, the last outputs of ended ones included
                self._read_back_launched()
                self._emit_pending()
            finally:
                self._finish_all_live(EngineDeadError(f"the engine loop died: {exc!r}"))

    def _take_requests(self) -> list[_Request] | None:
        """Wait for work, then hand the new requests and the aborts to the scheduler: the requests the aborts ended
        (their last outputs are for the caller to emit), or None when the engine is stopping."""
        with self._wakeup:
            while not (self._stopping or self._submitted or self._aborted or self.scheduler.has_work()):
                self._wakeup.wait()
            if self._stopping:
                return None
            for seq in self._submitted:
                self.scheduler.add(seq)
            self._submitted.clear()
            aborted = [seq for seq in self._aborted if self.scheduler.abort(seq)]
            self._aborted.clear()
            self._forget(aborted)
        return aborted

    def _step(self) -> None:
        """Plan, launch, read the step before back, update, emit.

        With `overlap` (on CUDA by default) host work runs while the device works: the tokens each pass chooses
        (argmax or sampled) stay on the device, and a step is launched without reading the last one back first. Its
        rows take the last step's tokens there (`ModelRunner.decode`'s `carried`), new prompts' first tokens too, and
        the last step is read back and its tokens appended while this one runs (a sequence found to have ended then
        costs this step one wasted row; one known to end by length with its token in flight gets no row). The
        outputs a step produces are sent during the next one, once it is launched; a step after which nothing runs
        sends its own at once. Without `overlap` every pass is read back as soon as it is launched."""
        plan = self.scheduler.schedule()
        if self.scheduler.running:
            self._launch(plan)
            self._emit_pending()  # the step before's outputs, while the device runs this step
            if self._overlap:
                self._read_back_in_flight()  # the step before's tokens
                if self._launching and self.scheduler.running:
                    self._in_flight = _InFlight(self._launching)
                self._launching = []
            else:
                launched, self._launching = self._launching, []
                for seqs, tokens in launched:  # this step's decode tokens, read back at once
                    self._update(seqs, tokens.tolist())
        else:  # every request has ended (aborts included): what is in flight is rows of ended requests only
            self._in_flight = None
        if self._in_flight is None:  # nothing runs ahead: what was produced goes out now, not a step later
            self._emit_pending()

    def _launch(self, plan: StepPlan) -> None:
        """Launch the plan's prefill pass and decode step, each pass's tokens chosen on the device and added to
        `self._launching`; the tokens in flight (and with overlap, the prefill's first tokens) feed the decode step
        there. Without overlap the first tokens are read back before the decode step is launched, and the requests
        they end get their last output at once: it must not wait on a decode below that could fail."""
        carried = self._in_flight
        sources: list[torch.Tensor] = carried.sources if carried is not None else []
        rows = carried.rows() if carried is not None else {}
        decode, slots, positions, tables = plan.decode, plan.slots, plan.positions, plan.block_tables
        if plan.chunks:
            logits = self.runner.prefill(plan.chunks)
            prefilled = plan.prefilled
            if prefilled:
                assert logits is not None, "a chunk that completes a prompt wants its logits"
                # After a preemption the prefill chooses a later token than the first (its bans follow the count).
                first = self._choose(prefilled, logits, [len(seq.output_ids) for seq in prefilled])
                if self._overlap:
                    offset = sum(source.shape[0] for source in sources)
                    for index, seq in enumerate(prefilled):
                        rows[seq] = offset + index
                    sources = [*sources, first]
                    self._launching.append((prefilled, first))
                else:
                    self._update(prefilled, first.tolist())
                    ended = [seq for seq in prefilled if seq.finished]
                    if ended:
                        self._emit(ended)
                        kept = [index for index, seq in enumerate(decode) if not seq.finished]
                        decode = [decode[index] for index in kept]
                        slots = [slots[index] for index in kept]
                        positions = [positions[index] for index in kept]
                        tables = [tables[index] for index in kept]
        if decode:
            token_ids, source_rows = [], []
            for seq in decode:
                if seq.launched - 1 > len(seq.output_ids):  # the token it feeds is still on the device
                    token_ids.append(0)
                    source_rows.append(rows[seq])
                else:
                    token_ids.append(seq.output_ids[-1])
                    source_rows.append(-1)
            logits = self.runner.decode(
                slots, token_ids, positions,
                (sources, source_rows) if len(source_rows) != source_rows.count(-1) else None,
                tables,
            )
            self._launching.append((decode, self._choose(decode, logits, [seq.launched - 1 for seq in decode])))

    def _read_back_in_flight(self, timeout_s: float | None = None) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            self._read_back(in_flight, timeout_s)

    def _read_back(self, in_flight: _InFlight, timeout_s: float | None = None) -> None:
        """Read launched passes' tokens back and update the scheduler with them, part by part; they are emitted
        during the next step (or at its end, if nothing is in flight)."""
        self._read_failed = True  # until every part is appended: a failure between leaves tokens missing
        for seqs, tokens in in_flight.read(timeout_s):
            self._update(seqs, tokens)
        self._read_failed = False

    def _update(self, seqs: list[_Request], tokens: list[int]) -> None:
        ended = self.scheduler.update(seqs, tokens)
        if ended:
            with self._wakeup:
                self._forget(ended)
        self._pending += seqs

    def _forget(self, ended: list[_Request]) -> None:
        """Drop ended requests from `_live` (under `_wakeup`), so that their ids can be used again."""
        for seq in ended:
            if self._live.get(seq.request_id) is seq:
                del self._live[seq.request_id]

    def _read_back_launched(self) -> None:
        """After the loop failed: read back what passes launched before the failure chose, if the device still answers
        within a few seconds (a request that a prefill pass finished then gets its output, not the failure). Not
        after a read that failed: the tokens it held would be missing from before the later ones."""
        launching, self._launching = self._launching, []
        if self._read_failed:
            return
        deadline = time.monotonic() + _READ_BACK_AFTER_FAILURE_S
        try:
            self._read_back_in_flight(_READ_BACK_AFTER_FAILURE_S)
            if launching:
                self._read_back(_InFlight(launching), max(deadline - time.monotonic(), 0.0))
        except Exception:  # the device failed too: those requests fail with the loop
            logger.warning("could not read back the tokens of the steps in flight", exc_info=True)

    def _choose(self, seqs: list[_Request], logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        """Each sequence's next token, on the device (nothing here waits for it): the argmax where that is all it takes,
        else sampled. `generated[i]` is how many tokens sequence i has before this one (which tokens are banned)."""
        if all(count >= seq.argmax_from for seq, count in zip(seqs, generated)):
            # Plain greedy rows (nothing banned): the argmax, without building per-row sampling state.
            return logits.argmax(dim=-1)
        rows = [
            RowSampling(
                temperature=seq.params.temperature,
                top_p=seq.params.top_p,
                generator=seq.generator,
                banned_token_ids=seq.stop.banned_token_ids(count),
            )
            for seq, count in zip(seqs, generated)
        ]
        return sample_tokens(logits, rows)

    def _emit_pending(self) -> None:
        """Emit what the last read back produced (see `_step`)."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._emit(pending)

    def _emit(self, seqs: list[_Request]) -> None:
        """Send each sequence's new tokens: one delivery per sink (one call_soon_threadsafe per event loop)."""
        batches: dict[OutputSink, list[tuple[object, StreamItem]]] = {}
        for seq in seqs:
            reason = seq.finish_reason if seq.finished and not seq.final_emitted else None
            if seq.num_emitted == len(seq.output_ids) and reason is None:
                continue
            new_tokens = tuple(seq.output_ids[seq.num_emitted :])
            seq.num_emitted = len(seq.output_ids)
            seq.final_emitted = reason is not None
            items = batches.get(seq.sink)
            if items is None:
                items = batches[seq.sink] = []
            items.append((seq.handle, TokenOutput(new_tokens, reason)))
        generated = self.scheduler.generated_tokens
        cache = self.scheduler.cache
        with self._wakeup:
            self._kv_usage = cache.usage
            self._prefix_queried, self._prefix_hits = cache.queried_tokens, cache.hit_tokens
            self._preemptions = self.scheduler.num_preemptions
            self._generation_tokens_total += generated - self._generated_counted
        self._generated_counted = generated
        for sink, items in batches.items():
            try:
                delivered = sink.deliver(items)
            except Exception:  # a broken sink loses its own requests, not the loop or other sinks'
                logger.exception("an output sink failed; aborting its %d requests", len(items))
                delivered = False
            if not delivered:  # nobody can read them any more: free their slots
                for seq in seqs:
                    if seq.sink is sink and not seq.finished:
                        self._abort_sequence(seq)

    def _finish_all_live(self, error: EngineDeadError | None) -> None:
        """End every live request: with finish reason `abort` on shutdown, with `error` when the loop died."""
        with self._wakeup:
            live = list(self._live.values())
            self._live.clear()
            self._submitted.clear()
            self._aborted.clear()
            self.scheduler.abort_all()
            self._kv_usage = 0.0
        batches: dict[OutputSink, list[tuple[object, StreamItem]]] = {}
        for seq in live:
            # Their last output is this one, even if a stuck loop wakes up later and reads their tokens back.
            seq.finished = seq.final_emitted = True
            item: StreamItem
            if error is not None:
                item = EngineDeadError(str(error))
            else:
                item = TokenOutput(tuple(seq.output_ids[seq.num_emitted :]), "abort")
            batches.setdefault(seq.sink, []).append((seq.handle, item))
        for sink, items in batches.items():
            try:
                sink.deliver(items)
            except Exception:  # every other sink still gets its requests' last outputs
                logger.exception("an output sink failed to take the last outputs of %d requests", len(items))
