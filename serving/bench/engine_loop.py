"""The engine loop's own Python per step, with the model replaced by a stub that returns precomputed logits.

On a GPU the engine thread's Python (scheduling, the K/V bookkeeping, sampling's host side, finish checks, building
and delivering outputs) runs between device steps, so at large batches it adds to every decode step: at batch 256
the predicted flash decode step is 2.5-3.5 ms (`docs/ENGINE_NOTES.md`). This measures that Python alone, on any
machine, so changes to the loop are measured before and after in one run:

    python -m serving.bench.engine_loop --batches 1,64,256 --steps 200
    python -m serving.bench.engine_loop --batches 1,64,256 --device-ms 3   # with a simulated 3 ms device step
    python -m serving.bench.engine_loop --batches 200 --slots 256 --device-ms 3   # a partly empty batch bucket
    python -m serving.bench.engine_loop --batches 1,64,256 --device-ms 3 --overlap off   # one step at a time
    python -m serving.bench.engine_loop --batches 256 --steps-min 50 --device-ms 3   # requests ending at different steps

Each level submits `batch` greedy requests with `ignore_eos` and `--steps` output tokens through
`LLMEngine.submit` into a sink that counts what it is given (as the pipe to the HTTP process would take it), and
reports the loop's wall time per decode step (first decode step to last) and per token. The model is a tiny random one whose decode step is
replaced by fixed logits (`stub_runner`), with a small vocabulary (`--vocab`), so the argmax the device would do
costs next to nothing here.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from serving.bench.loadtest import SHAPES, markdown_table
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.interface import GenerationRequest, ModelInfo, SamplingParams
from serving.engine.model_runner import KVCachePlan, ModelRunner


class DeviceLogits:
    """Logits computed by a simulated device: reading them back (`argmax(...).tolist()`) waits until the device has
    finished them, as `.tolist()` of a CUDA tensor waits for the stream; slicing and argmax themselves do not."""

    is_cuda = False  # read back with tolist(), which waits (serving.engine.engine._InFlight)

    def __init__(self, logits: torch.Tensor, ready: float) -> None:
        self._logits = logits
        self._ready = ready

    @property
    def value(self) -> torch.Tensor:
        """The values, for the next simulated step to be fed with (on a device, stream order makes it wait)."""
        return self._logits

    def __getitem__(self, index) -> "DeviceLogits":
        return DeviceLogits(self._logits[index], self._ready)

    def argmax(self, dim: int = -1) -> "DeviceLogits":
        return DeviceLogits(self._logits.argmax(dim=dim), self._ready)

    def tolist(self) -> list:
        wait = self._ready - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return self._logits.tolist()


def stub_runner(num_slots: int, max_model_len: int, vocab: int, device_ms: float = 0.0) -> ModelRunner:
    """A real `ModelRunner` (a tiny random model) whose decode step returns fixed logits: everything the engine
    thread does around a decode step runs as in serving (the runner's host-side layout of the batch included),
    only the device step is gone. With `device_ms`, the step is a simulated device that works that long per step,
    one step after another, while the engine thread goes on until it reads the logits back. Records when each
    decode step started in `decode_times`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SHAPES["tiny"], "vocab_size": vocab, "max_position_embeddings": max_model_len})
    torch.manual_seed(0)
    runner = ModelRunner(LlamaForCausalLM(config).eval(), KVCachePlan(num_slots, max_model_len))
    logits = torch.randn(runner.batch_buckets[-1], vocab, generator=torch.Generator().manual_seed(0))
    runner.decode_times = []
    device_free = 0.0

    def step(inputs: torch.Tensor, kv_len: int):
        nonlocal device_free
        launched = time.perf_counter()
        runner.decode_times.append(launched)
        if not device_ms:
            return logits[: inputs.shape[1]]
        device_free = max(launched, device_free) + device_ms / 1e3
        return DeviceLogits(logits[: inputs.shape[1]], device_free)

    runner.use_graphs(step)
    decode_ahead = runner.decode_ahead

    def ahead(tokens, kv_len: int):
        return decode_ahead(tokens.value if isinstance(tokens, DeviceLogits) else tokens, kv_len)

    runner.decode_ahead = ahead
    return runner


class CountingSink:
    """Counts tokens and finished requests; sets `done` when every request has finished."""

    def __init__(self, expected: int) -> None:
        self.tokens = 0
        self.finished = 0
        self.expected = expected
        self.done = threading.Event()

    def deliver(self, items) -> bool:
        for _, output in items:
            self.tokens += len(output.token_ids)
            if output.finish_reason is not None:
                self.finished += 1
        if self.finished >= self.expected:
            self.done.set()
        return True


def run_level(batch: int, steps: int, prompt_len: int, vocab: int, device_ms: float = 0.0,
              slots: int | None = None, overlap: bool | None = None, steps_min: int | None = None) -> dict:
    """`batch` requests on `slots` slots (default: as many as requests; more leave a batch bucket partly empty), each
    `steps` tokens long, or a seeded random length from `steps_min` to `steps` (requests ending at different steps).
    `overlap` as `EngineConfig.overlap`; by default on with a simulated device, as on CUDA, and off without."""
    runner = stub_runner(max(slots or batch, batch), prompt_len + steps + 1, vocab, device_ms)
    info = ModelInfo(max_model_len=runner.max_model_len, vocab_size=vocab, eos_token_ids=(vocab - 1,),
                     dtype="float32", device="cpu")
    overlap = device_ms > 0 if overlap is None else overlap
    config = EngineConfig(device="cpu", max_num_seqs=runner.num_slots, warmup_tokens=0, overlap=overlap,
                          max_prefill_tokens_per_step=batch * prompt_len)
    engine = LLMEngine(runner, None, info, config)
    sink = CountingSink(batch)
    generator = torch.Generator().manual_seed(batch)
    lengths = (torch.randint(steps_min, steps + 1, (batch,), generator=generator).tolist() if steps_min
               else [steps] * batch)
    prompt = tuple(range(1, prompt_len + 1))
    for index, length in enumerate(lengths):
        params = SamplingParams(max_tokens=length, temperature=0.0, ignore_eos=True)
        engine.submit(GenerationRequest(f"r{index}", prompt, params), sink, index)
    asyncio.run(engine.start())  # no warm-up: starts the loop thread on the queued requests
    if not sink.done.wait(600):
        raise RuntimeError(f"batch {batch}: the loop did not finish")
    asyncio.run(engine.shutdown())
    assert sink.tokens == sum(lengths), (sink.tokens, sum(lengths))
    # From the first decode step to the last: the prefill step (a real forward pass of the tiny model) is not timed.
    times = runner.decode_times
    per_step = (times[-1] - times[0]) / (len(times) - 1)
    # Per decoded token: every token after each request's first (which prefill gives) came from one of the steps.
    decoded = max(sink.tokens - batch, 1)
    return {"batch": batch, "steps": len(times), "tokens": sink.tokens, "ms_per_step": per_step * 1e3,
            "us_per_token": per_step * len(times) / decoded * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--steps", type=int, default=200, help="output tokens per request")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--steps-min", type=int, default=None,
                        help="give each request a seeded random length from this to --steps (default: all --steps)")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--device-ms", type=float, default=0.0,
                        help="simulate a device that takes this long per decode step (0: no device time); the loop's "
                             "Python that does not overlap it shows as ms/step above this")
    parser.add_argument("--slots", type=int, default=None,
                        help="engine slots (default: each level's batch); more than a level's batch leaves its batch "
                             "bucket partly empty, the general path of laying out a decode step")
    parser.add_argument("--overlap", choices=["on", "off"], default=None,
                        help="the engine's overlap of host and device work (default: on with --device-ms, as on "
                             "CUDA; off without, as on CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per level; the table shows their median")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    levels = []
    for batch in sorted({int(b) for b in args.batches.split(",")}):
        overlap = None if args.overlap is None else args.overlap == "on"
        runs = [run_level(batch, args.steps, args.prompt_len, args.vocab, args.device_ms, args.slots, overlap,
                          args.steps_min) for _ in range(args.rounds)]
        level = dict(runs[0])
        for key in ("ms_per_step", "us_per_token"):
            level[key] = statistics.median(run[key] for run in runs)
            level[f"{key}_all"] = [round(run[key], 4) for run in runs]
        levels.append(level)
    rows = [["batch", "decode steps", "tokens", "loop ms/step", "loop us/token", "ms/step, every run"]]
    for level in levels:
        rows.append([str(level["batch"]), str(level["steps"]), str(level["tokens"]), f"{level['ms_per_step']:.3f}",
                     f"{level['us_per_token']:.2f}", ", ".join(f"{v:.3f}" for v in level["ms_per_step_all"])])
    print(markdown_table(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps({"torch": torch.__version__, "device_ms": args.device_ms,
                                             "slots": args.slots, "overlap": args.overlap, "levels": levels}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
