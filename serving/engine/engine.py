"""`LLMEngine`: continuous batching on one dedicated thread, streaming tokens to asyncio callers.

The caller's event loop never runs model code. `generate()` validates and enqueues under a lock and
returns a stream; the engine-loop thread, on each iteration, drops aborted requests, admits waiting
requests into free KV-cache slots, spends the chunked-prefill budget on prompts, then runs one batched
decode step for every decoding request. Outputs go to each request's `OutputSink` in one call per sink per
step: for `generate()`, the caller's event loop (`loop.call_soon_threadsafe`); for `submit()`, whatever the
caller gives, such as the pipe to the HTTP process (`serving.engine.process`). The thread sleeps on a
condition variable when there is no work.

On CUDA the loop's own work overlaps the device's (`EngineConfig.overlap`, see `LLMEngine._step`): each step (new
prompts' prefill, then a decode step for every decoding request) is launched with the tokens the step before
chose still on the device, and the host reads, appends and sends those while the new step runs.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from serving.engine.attention import select_attention
from serving.engine.config import DEFAULT_MAX_NUM_SEQS_CPU, DEFAULT_MAX_NUM_SEQS_GPU, EngineConfig
from serving.engine.cuda_graphs import capture_decode_graphs
from serving.engine.interface import (
    EngineDeadError,
    EngineStats,
    FinishReason,
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
    ModelRunner,
    PrefillChunk,
    kv_bytes_per_token,
    kv_cache_budget_bytes,
    model_context_len,
    plan_kv_cache,
)
from serving.engine.sampling import RowSampling, StopRule, banned_token_ids, sample_tokens
from serving.engine.stream import LoopSink, Mailbox, OutputSink, TokenStream

logger = logging.getLogger("serving.engine")

_READ_BACK_AFTER_FAILURE_S = 5.0
"""How long a dying loop waits for the device to finish the steps in flight before failing their requests."""
_STOP_LOOP_S = 10.0
"""How long shutdown() waits for the loop thread to stop (it finishes its step first): a device call that never
returns would otherwise hold the server's exit until the kubelet kills the pod, its streams never ended."""


@dataclass(eq=False, slots=True)
class _Sequence:
    """One request's state. After admission only the loop thread touches it."""

    request: GenerationRequest
    sink: OutputSink
    handle: object
    """What `sink` delivers this request's outputs to (its stream's queue, or its request id)."""
    generator: torch.Generator | None
    stop: StopRule
    argmax_from: float
    """Output length from which a plain argmax picks its next token: min_tokens for a greedy request (EOS and stop
    tokens are banned before that), never for a sampled one."""
    prompt: tuple[int, ...]
    params: SamplingParams
    slot: int = -1
    num_cached: int = 0
    """Prompt tokens whose K/V are in the cache (prefill progress)."""
    launched: int = 0
    """Tokens the passes launched so far choose for it: `len(output_ids)`, plus one while a token is in flight."""
    output_ids: list[int] = field(default_factory=list)
    num_emitted: int = 0
    finished: bool = False
    finish_reason: FinishReason | None = None
    final_emitted: bool = False


class _InFlight:
    """Launched passes' tokens not yet read back: parts of (sequences, their tokens on the device), in launch order (a
    prefill pass's first tokens, then a decode step's). The next step is fed from `sources` (`rows`), and reading
    waits for these passes only, not for steps launched after them."""

    __slots__ = ("parts", "sources", "_starts", "_copy")

    def __init__(self, parts: list[tuple[list[_Sequence], torch.Tensor]]) -> None:
        self.parts = parts
        self._starts = list(itertools.accumulate((len(seqs) for seqs, _ in parts), initial=0))
        """Where each part's rows start in `sources`."""
        tensors = [tokens for _, tokens in parts]
        self.sources = [torch.cat(tensors) if len(tensors) > 1 else tensors[0]]
        self._copy = self._copy_back(self.sources[0])

    @staticmethod
    def _copy_back(tokens: torch.Tensor) -> tuple[torch.Tensor, object] | None:
        """Start copying `tokens` to the host, without waiting: (pinned host tensor, event recorded after the copy). On
        CPU, None: the tokens are read as they are."""
        if not tokens.is_cuda:
            return None
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(tokens.device))
        return host, ready

    def rows(self) -> dict[_Sequence, int]:
        """Each sequence's latest token: its row in `sources`."""
        rows: dict[_Sequence, int] = {}
        for (seqs, _), start in zip(self.parts, self._starts):
            for index, seq in enumerate(seqs, start):
                rows[seq] = index
        return rows

    def read(self, timeout_s: float | None = None) -> list[tuple[list[_Sequence], list[int]]]:
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
    """Implements `serving.engine.interface.Engine` over `ModelRunner`."""

    def __init__(self, runner: ModelRunner, tokenizer: object, model_info: ModelInfo, config: EngineConfig) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_info = model_info
        self.config = config
        self._eos_token_ids = model_info.eos_token_ids
        self._wakeup = threading.Condition(threading.RLock())
        # Shared with callers, guarded by _wakeup.
        self._waiting: deque[_Sequence] = deque()
        self._live: dict[str, _Sequence] = {}
        self._abort_requests: list[_Sequence] = []
        self._stopping = False
        self._dead = False
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._live_tokens = 0
        # Owned by the loop thread.
        self._cache_tokens = 0
        """Tokens of the running sequences (prompt tokens cached plus tokens generated), kept as they change."""
        self._generated_since_emit = 0
        self._pending: list[_Sequence] = []
        """Sequences the last step gave tokens or ended, emitted during the next step (`_step`)."""
        self._in_flight: _InFlight | None = None
        """The last step's tokens, launched and not read back yet (`_step`)."""
        self._launching: list[tuple[list[_Sequence], torch.Tensor]] = []
        """This step's passes launched so far, their tokens on the device (`_launch`)."""
        self._read_failed = False
        """A read back failed before all its tokens were appended: the loop is dying, and no later tokens may be read
        back after the missing ones."""
        self._overlap = config.overlap if config.overlap is not None else runner.device.type == "cuda"
        self._free_slots = list(range(runner.num_slots))
        self._running: dict[int, _Sequence] = {}
        self._prefilling: list[_Sequence] = []
        self._decoding: list[_Sequence] = []
        """In slot order, so that a full batch is laid out as it stands (`ModelRunner.decode`)."""
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
                num_slots=num_slots, max_prefill_tokens=config.max_prefill_tokens_per_step, decode_graphs=graphs,
            ),
            num_slots=num_slots,
            max_model_len=config.max_model_len or context_len,
            max_model_len_is_default=config.max_model_len is None,
        )
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
            "engine ready to start: %s on %s (%s), %d slots x %d tokens of KV cache, %s attention",
            Path(path).name, model_info.device, model_info.dtype, plan.num_slots, plan.max_model_len,
            runner.attention.name,
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

    def submit(self, request: GenerationRequest, sink: OutputSink, handle: object) -> _Sequence:
        """Validate and enqueue now, raising as `generate` does; from any thread. The request's outputs (and an
        EngineDeadError if the loop dies) go to `sink.deliver([(handle, output), ...])` from the loop thread, the
        last output with a finish reason. Abort it with `abort(request.request_id)`."""
        check_request(request, self.model_info)
        seed = request.sampling.seed
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(seed)
        params = request.sampling
        seq = _Sequence(request, sink, handle, generator,
                        stop=StopRule.of(params, len(request.prompt_token_ids), self._eos_token_ids,
                                         self.model_info.max_model_len),
                        argmax_from=params.min_tokens if params.temperature == 0 else math.inf,
                        prompt=request.prompt_token_ids, params=params)
        with self._wakeup:
            if self._dead:
                raise EngineDeadError("the engine loop has died; the server must be restarted")
            if self._stopping:
                raise EngineDeadError("the engine is shutting down")
            if request.request_id in self._live:
                raise ValueError(f"request_id {request.request_id!r} is already running; use a unique id")
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting (max_waiting); retry later"
                )
            self._waiting.append(seq)
            self._live[request.request_id] = seq
            self._prompt_tokens_total += len(request.prompt_token_ids)
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
                waiting=len(self._waiting),
                running=len(self._running),
                max_running=self.runner.num_slots,
                kv_cache_usage=self._live_tokens / self.runner.capacity_tokens,
                kv_cache_capacity_tokens=self.runner.capacity_tokens,
                prompt_tokens_total=self._prompt_tokens_total,
                generation_tokens_total=self._generation_tokens_total,
                loop_alive=self._loop_alive(),
                device=self.model_info.device,
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

    def _abort_sequence(self, seq: _Sequence) -> None:
        # Runs from any thread, including a garbage-collector pass on the loop thread itself (the lock
        # is reentrant for that reason); the loop frees the slot at its next step boundary.
        with self._wakeup:
            if seq.finished or self._live.get(seq.request.request_id) is not seq:
                return
            self._abort_requests.append(seq)
            self._wakeup.notify()

    def _loop_alive(self) -> bool:
        if self._dead:
            return False
        return self._thread is None or self._thread.is_alive()

    # ----------------------------------------------------------------- loop thread

    def _run_loop(self) -> None:
        try:
            while True:
                with self._wakeup:
                    while not (self._stopping or self._waiting or self._running or self._abort_requests):
                        self._wakeup.wait()
                    if self._stopping:
                        break
                    aborted, self._abort_requests = self._abort_requests, []
                    aborted = [seq for seq in aborted if self._end(seq, "abort")]
                    while self._waiting and self._free_slots:
                        self._admit(self._waiting.popleft())
                # Outside the lock: a sink may block (a full pipe) and must not hold up submit() or abort().
                self._emit(aborted)
                if self._running:
                    self._step()
                else:  # everything ended (aborts included): what the last step produced goes out before the wait
                    self._in_flight = None
                    self._flush_pending()
            self._finish_in_flight()
            self._flush_pending()
            self._finish_all_live(None)
        except BaseException as exc:
            logger.exception("engine loop died; failing every pending request")
            with self._wakeup:
                self._dead = True
            try:  # what earlier steps produced still reaches its requests, the last outputs of ended ones included
                self._read_back_launched()
                self._flush_pending()
            finally:
                self._finish_all_live(EngineDeadError(f"the engine loop died: {exc!r}"))

    def _admit(self, seq: _Sequence) -> None:
        seq.slot = heapq.heappop(self._free_slots)
        self._running[seq.slot] = seq
        self._prefilling.append(seq)

    def _step(self) -> None:
        """Chunked prefill within the token budget, then one batched decode step.

        With `overlap` (on CUDA by default) host work runs while the device works: the tokens each pass chooses
        (argmax or sampled) stay on the device, and a step is launched without reading the last one back first. Its
        rows take the last step's tokens there (`ModelRunner.decode`'s `carried`), new prompts' first tokens too, and
        the last step is read back and its tokens appended while this one runs (a sequence found to have ended then
        costs this step one wasted row; one known to end by length with its token in flight gets no row). The
        outputs a step produces are sent during the next one, once its first pass is launched; a step after which
        nothing runs sends its own at once. Without `overlap` every step is read back and sent as soon as it is
        launched."""
        chunks, prefilled = self._plan_prefill()
        self._launch(chunks, prefilled)
        self._flush_pending()  # if nothing was launched, before waiting for the device
        self._finish_in_flight()
        if self._launching and self._running:
            self._in_flight = _InFlight(self._launching)
        self._launching = []
        if self._in_flight is None:  # nothing in flight, or only rows of ended sequences: send what was produced now
            self._flush_pending()

    def _plan_prefill(self) -> tuple[list[PrefillChunk], list[_Sequence]]:
        """This step's prompt chunks within the token budget (counted as cached from here on), and the sequences
        whose prompts they complete."""
        budget = self.config.max_prefill_tokens_per_step
        chunks: list[PrefillChunk] = []
        prefilled: list[_Sequence] = []
        for seq in self._prefilling:
            if budget == 0:
                break
            count = min(budget, len(seq.prompt) - seq.num_cached)
            done = seq.num_cached + count == len(seq.prompt)
            chunks.append(PrefillChunk(seq.slot, seq.prompt[seq.num_cached : seq.num_cached + count],
                                       seq.num_cached, want_logits=done))
            seq.num_cached += count
            self._cache_tokens += count
            budget -= count
            if done:
                prefilled.append(seq)
        return chunks, prefilled

    def _launch(self, chunks: list[PrefillChunk], prefilled: list[_Sequence]) -> None:
        """Launch the prefill pass and the decode step. With overlap, the tokens they choose stay on the device
        (added to `self._launching` as each pass is launched), and the tokens in flight feed the decode step there;
        otherwise they are read back and appended at once."""
        carried, on_device = self._in_flight, self._overlap
        sources: list[torch.Tensor] = carried.sources if carried is not None else []
        rows = carried.rows() if carried is not None else {}
        parts = self._launching
        if chunks:
            logits = self.runner.prefill(chunks)
            self._flush_pending()  # while the device runs the prefill pass
            for seq in prefilled:
                self._prefilling.remove(seq)
            if prefilled:
                first = self._choose(prefilled, logits, [0] * len(prefilled))
                for seq in prefilled:
                    seq.launched = 1
                if on_device:
                    offset = sum(source.shape[0] for source in sources)
                    for index, seq in enumerate(prefilled):
                        rows[seq] = offset + index
                    sources = [*sources, first]
                    parts.append((prefilled, first))
                    started = prefilled
                else:
                    self._append(prefilled, first.tolist())
                    # Those already done (one token, or a stop token first) get their last output now: it must not
                    # wait on a decode below that could fail, since a finished sequence is no longer live.
                    self._emit([seq for seq in prefilled if seq.finished])
                    started = [seq for seq in prefilled if not seq.finished]
                    self._pending += started
                if started:
                    self._decoding += started
                    self._decoding.sort(key=_slot_of)
        # Not those whose token in flight ends them by length: they leave when it is read back.
        decoding = [seq for seq in self._decoding if seq.launched < seq.stop.max_generated]
        if decoding:
            token_ids, source_rows = [], []
            for seq in decoding:
                if seq.launched > len(seq.output_ids):  # its last token is still on the device
                    token_ids.append(0)
                    source_rows.append(rows[seq])
                else:
                    token_ids.append(seq.output_ids[-1])
                    source_rows.append(-1)
            logits = self.runner.decode(
                [seq.slot for seq in decoding], token_ids,
                [seq.num_cached + seq.launched - 1 for seq in decoding],
                (sources, source_rows) if len(source_rows) != source_rows.count(-1) else None,
            )
            self._flush_pending()  # while the device runs the decode step
            tokens = self._choose(decoding, logits, [seq.launched for seq in decoding])
            for seq in decoding:
                seq.launched += 1
            if on_device:
                parts.append((decoding, tokens))
            else:
                self._append(decoding, tokens.tolist())
                self._pending += decoding

    def _finish(self, in_flight: _InFlight, timeout_s: float | None = None) -> None:
        """Read launched passes' tokens back and append them, part by part (`_append` passes over the sequences that
        ended meanwhile); they are emitted during the next step."""
        self._read_failed = True  # until every part is appended: a failure between leaves tokens missing
        for seqs, tokens in in_flight.read(timeout_s):
            self._append(seqs, tokens)
            self._pending += seqs
        self._read_failed = False

    def _read_back_launched(self) -> None:
        """After the loop failed: read back what passes launched before the failure chose, if the device still answers
        within a few seconds (a request that a prefill pass finished then gets its output, not the failure). Not
        after a read that failed: the tokens it held would be missing from before the later ones."""
        launching, self._launching = self._launching, []
        if self._read_failed:
            return
        deadline = time.monotonic() + _READ_BACK_AFTER_FAILURE_S
        try:
            self._finish_in_flight(_READ_BACK_AFTER_FAILURE_S)
            if launching:
                self._finish(_InFlight(launching), max(deadline - time.monotonic(), 0.0))
        except Exception:  # noqa: BLE001 - the device failed too: those requests fail with the loop
            logger.warning("could not read back the tokens of the steps in flight", exc_info=True)

    def _finish_in_flight(self, timeout_s: float | None = None) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            self._finish(in_flight, timeout_s)

    def _flush_pending(self) -> None:
        """Emit what the previous step produced (see `_step`)."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._emit(pending)

    def _choose(self, seqs: list[_Sequence], logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
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
                banned_token_ids=banned_token_ids(seq.params, count, self._eos_token_ids),
            )
            for seq, count in zip(seqs, generated)
        ]
        return sample_tokens(logits, rows)

    def _append(self, seqs: list[_Sequence], tokens: list[int]) -> None:
        """Append each sequence's new token and end the sequences that are done. A sequence that has already ended
        (its row was in a step launched before the end was known) takes no token."""
        appended = sampled = 0
        for seq, token in zip(seqs, tokens):
            if seq.finished:
                continue
            sampled += 1
            output_ids = seq.output_ids
            reason = seq.stop.reason(token, len(output_ids) + 1)
            # The token that stops a sequence (EOS or a stop token) is not part of its output text.
            if reason != "stop":
                output_ids.append(token)
                appended += 1
            if reason is not None:
                self._release_slot(seq, reason)
        self._cache_tokens += appended
        self._generated_since_emit += sampled

    def _emit(self, seqs: list[_Sequence]) -> None:
        """Send each sequence's new tokens: one delivery per sink (one call_soon_threadsafe per event loop)."""
        batches: dict[OutputSink, list[tuple[object, object]]] = {}
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
        with self._wakeup:
            self._live_tokens = self._cache_tokens
            self._generation_tokens_total += self._generated_since_emit
        self._generated_since_emit = 0
        for sink, items in batches.items():
            try:
                delivered = sink.deliver(items)
            except Exception:  # noqa: BLE001 - a broken sink loses its own requests, not the loop or other sinks'
                logger.exception("an output sink failed; aborting its %d requests", len(items))
                delivered = False
            if not delivered:  # nobody can read them any more: free their slots
                for seq in seqs:
                    if seq.sink is sink and not seq.finished:
                        self._abort_sequence(seq)

    def _end(self, seq: _Sequence, reason: FinishReason) -> bool:
        """End a sequence now (abort path): free its slot or queue place; False if it had already ended. Its last
        output is for the caller to emit."""
        if seq.finished:
            return False
        if seq.slot < 0:
            self._waiting.remove(seq)
        self._release_slot(seq, reason)
        return True

    def _release_slot(self, seq: _Sequence, reason: FinishReason) -> None:
        seq.finished = True
        seq.finish_reason = reason
        if seq.slot >= 0:
            self._cache_tokens -= seq.num_cached + len(seq.output_ids)
            del self._running[seq.slot]
            heapq.heappush(self._free_slots, seq.slot)
            if seq in self._prefilling:
                self._prefilling.remove(seq)
            if seq in self._decoding:
                self._decoding.remove(seq)
        with self._wakeup:
            self._live.pop(seq.request.request_id, None)

    def _finish_all_live(self, error: EngineDeadError | None) -> None:
        """End every live request: with finish reason `abort` on shutdown, with `error` when the loop died."""
        with self._wakeup:
            live = list(self._live.values())
            self._live.clear()
            self._waiting.clear()
            self._abort_requests.clear()
        self._running.clear()
        self._prefilling.clear()
        self._decoding.clear()
        self._cache_tokens = 0
        with self._wakeup:
            self._live_tokens = 0
        batches: dict[OutputSink, list[tuple[object, object]]] = {}
        for seq in live:
            seq.finished = True
            if error is not None:
                item = EngineDeadError(str(error))
            else:
                item = TokenOutput(tuple(seq.output_ids[seq.num_emitted :]), "abort")
            batches.setdefault(seq.sink, []).append((seq.handle, item))
        for sink, items in batches.items():
            try:
                sink.deliver(items)
            except Exception:  # noqa: BLE001 - every other sink still gets its requests' last outputs
                logger.exception("an output sink failed to take the last outputs of %d requests", len(items))


def _slot_of(seq: _Sequence) -> int:
    return seq.slot
