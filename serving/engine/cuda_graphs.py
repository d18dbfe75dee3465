"""Decode steps replayed from CUDA graphs: one graph per (batch bucket, KV-length bucket), captured at load.

An eager decode step of a small model is mostly Python and kernel-launch overhead: for the Llama-3.2-1B shape
on an H100 an eager step takes about 25 ms against a 0.75 ms memory floor, and the same step as a CUDA graph
about 2.8 ms (`../shared/DESIGN.md`). `ModelRunner.decode_step` already runs on fixed shapes (a batch-size
bucket, a bucketed KV length) and reads its inputs from tensors, so each shape is captured once and replayed
with new inputs copied into static buffers.

Memory: every graph shares one private pool, so the intermediates of all graphs together take what the
largest one needs; outputs go to one static logits buffer. Graphs are replayed one at a time from the engine
thread, which is what sharing a pool requires. Capture failures (an architecture whose forward synchronises
with the host, say) leave the runner on eager decode, with the reason logged: slower, never wrong
(`capture_decode_graphs`, which the engine calls at load).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from serving.engine.attention import AttentionChoice, SdpaAttention

if TYPE_CHECKING:
    from serving.engine.model_runner import ModelRunner

logger = logging.getLogger("serving.engine")

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""`decode_step(input_ids [B], positions [B], cache_rows [B], block_tables [B, kv_len / block_size], kv_len)
-> float32 logits [B, vocab]`."""


class DecodeGraphs:
    """Replays captured decode steps; called as `graphs(inputs [3, B], block_tables [B, W], kv_len)` like the eager
    step.

    `inputs` rows are token ids, positions and cache rows for rows 0..B-1, B a batch bucket; `block_tables` has
    W = kv_len / block_size columns, a fixed shape per bucket, copied into a static table like the inputs. The
    result is a view of the static logits buffer, valid until the next call.
    """

    def __init__(self, step: Step, *, batch_buckets: Iterable[int], kv_len_buckets: Iterable[int],
                 vocab_size: int, block_size: int, scratch_block: int, device: torch.device) -> None:
        self._step = step
        self.batch_buckets = sorted(set(batch_buckets))
        self.kv_len_buckets = sorted(set(kv_len_buckets))
        self._block_size = block_size
        max_batch = self.batch_buckets[-1]
        # Rows that no request uses feed token 0 at position 0 of the scratch block (written, never read).
        self._inputs = torch.zeros(3, max_batch, dtype=torch.long, device=device)
        self._inputs[2].fill_(scratch_block * block_size)
        self._tables = torch.full((max_batch, self.kv_len_buckets[-1] // block_size), scratch_block,
                                  dtype=torch.long, device=device)
        self._logits = torch.zeros(max_batch, vocab_size, dtype=torch.float32, device=device)
        self._replays: dict[tuple[int, int], Callable[[], None]] = {}

    @classmethod
    def for_runner(cls, runner: ModelRunner) -> DecodeGraphs:
        """Graphs for every decode shape of a `ModelRunner`, replaying its `decode_step`."""
        return cls(runner.decode_step, batch_buckets=runner.batch_buckets, kv_len_buckets=runner.kv_len_buckets,
                   vocab_size=runner.vocab_size, block_size=runner.block_size, scratch_block=runner.scratch_block,
                   device=runner.device)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, kv_len) this object serves, largest first (the capture order)."""
        return [(batch, kv_len) for batch in reversed(self.batch_buckets) for kv_len in reversed(self.kv_len_buckets)]

    def capture(self) -> None:
        """Capture every shape, largest first (CUDA only; the engine must be idle). Raises on the first failure."""
        started = time.monotonic()
        with self._recorder() as record:
            for batch, kv_len in self.shapes:
                ids, positions, rows = self._inputs[0, :batch], self._inputs[1, :batch], self._inputs[2, :batch]
                tables = self._tables[:batch, : kv_len // self._block_size]

                def step(batch: int = batch, ids: torch.Tensor = ids, positions: torch.Tensor = positions,
                         rows: torch.Tensor = rows, tables: torch.Tensor = tables, kv_len: int = kv_len) -> None:
                    self._logits[:batch].copy_(self._step(ids, positions, rows, tables, kv_len))

                self._replays[(batch, kv_len)] = record(step)
        logger.info("captured %d decode graphs (batch %s x kv_len %s) in %.1f s", len(self._replays),
                    self.batch_buckets, self.kv_len_buckets, time.monotonic() - started)

    @contextmanager
    def _recorder(self) -> Iterator[Callable[[Callable[[], None]], Callable[[], None]]]:
        """Yields `record(step) -> replay`: captures `step` (which reads and writes only static tensors)
        into a CUDA graph in the shared pool and returns the graph's replay."""
        reserved_before = torch.cuda.memory_reserved()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()

        def record(step: Callable[[], None]) -> Callable[[], None]:
            # Warm up on a side stream: lazy cuBLAS/attention initialisation must not happen during capture.
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                step()
            return graph.replay

        yield record
        torch.cuda.synchronize()
        logger.info("decode graphs hold %.0f MiB", (torch.cuda.memory_reserved() - reserved_before) / 2**20)

    def __call__(self, inputs: torch.Tensor, block_tables: torch.Tensor, kv_len: int) -> torch.Tensor:
        batch = inputs.shape[1]
        replay = self._replays.get((batch, kv_len))
        if replay is None:  # a shape outside the buckets (not produced by ModelRunner.decode): run it eagerly
            return self._step(inputs[0], inputs[1], inputs[2], block_tables, kv_len)
        self._inputs[:, :batch].copy_(inputs, non_blocking=True)
        self._tables[:batch, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        replay()
        return self._logits[:batch]


def capture_decode_graphs(runner: ModelRunner, attention_choice: AttentionChoice = "auto") -> bool:
    """Capture the runner's decode steps as CUDA graphs and route decoding through them. If capture fails with
    the triton or flash attention that `auto` chose (`attention_choice`), capture with SDPA instead (prefill follows:
    the runner has one attention); if that fails too, or the implementation was asked for by name, keep it. On
    failure the reason is logged and decoding stays eager (slower, same results). Returns whether graphs are in
    use."""
    failure = _capture(runner)
    if failure is None:
        return True
    first = runner.attention
    if attention_choice == "auto" and first.name != SdpaAttention.name:
        logger.warning("CUDA graph capture with %s attention failed (%s); capturing with sdpa attention, which "
                       "prefill will use too", first.name, failure)
        runner.use_attention(SdpaAttention(runner.attention_shape))
        failure = _capture(runner)
        if failure is None:
            return True
        runner.use_attention(first)
    logger.warning("CUDA graph capture failed, decoding eagerly with %s attention (slower at small batches): %s",
                   runner.attention.name, failure)
    runner.use_graphs(None)
    return False


def _capture(runner: ModelRunner) -> str | None:
    """Capture and install decode graphs; the reason they could not be captured, or None."""
    graphs = DecodeGraphs.for_runner(runner)
    try:
        graphs.capture()
    except Exception as exc:  # noqa: BLE001 - any capture failure has the same remedy: decode eagerly
        failure = f"{type(exc).__name__}: {exc}"
    else:
        runner.use_graphs(graphs)
        return None
    # Outside the except block, where the traceback no longer holds the graphs: their memory goes back to the
    # device before anything else is tried.
    del graphs
    torch.cuda.empty_cache()
    return failure
