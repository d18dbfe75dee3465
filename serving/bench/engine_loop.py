"""The engine loop's own Python per step, with the model replaced by a stub that returns precomputed logits.

On a GPU the engine thread's Python (scheduling, the K/V bookkeeping, sampling's host side, finish checks, building
and delivering outputs) runs between device steps, so at large batches it adds to every decode step: at batch 256
the predicted flash decode step is 2.5-3.5 ms (`docs/ENGINE_NOTES.md`). This measures that Python alone, on any
machine, so changes to the loop are measured before and after in one run:

    python -m serving.bench.engine_loop --batches 1,64,256 --steps 200
    python -m serving.bench.engine_loop --batches 1,64,256 --device-ms 3   # with a simulated 3 ms device step
    python -m serving.bench.engine_loop --batches 200 --slots 256 --device-ms 3   # a partly empty batch bucket
    python -m serving.bench.engine_loop --batches 1,64,256 --device-ms 3 --overlap off   # one step at a time
    python -m serving.bench.engine_loop --batches 256 --steps-min 50 --device-ms 3   # ending at different steps
    python -m serving.bench.engine_loop --batches 256 --steps 256 --steps-min 64 --prompt-len 768 --prompt-min 256 \
        --arrivals 2048 --device-ms 3 --prefill-us 6   # closed loop: each finished request is replaced by a new one

Each level submits `batch` greedy requests with `ignore_eos` and `--steps` output tokens through
`LLMEngine.submit` into a sink that counts what it is given (as the pipe to the HTTP process would take it), and
reports the loop's wall time per decode step (first decode step to last) and per token. The model is a tiny random
one whose decode step is replaced by fixed logits (`stub_runner`), with a small vocabulary (`--vocab`), so the argmax
the device would do costs next to nothing here.

With `--arrivals N` the level is a closed loop, as the load test's clients are: `batch` requests at a time, each
finished request replaced at once by a new one, N requests in all, so prompts arrive while others decode. Their
prefill is simulated too (`--prefill-us` of device time per prompt token; its host side, packing the chunks and
planning their attention, is done for real). The table then also shows how busy the simulated device was: the time
the host kept it waiting is what the loop's own Python costs.
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
from typing import Callable, Sequence

import torch

from serving.bench.loadtest import SHAPES, markdown_table
from serving.engine.config import EngineConfig
from serving.engine.engine import LLMEngine
from serving.engine.interface import GenerationRequest, ModelInfo, SamplingParams
from serving.engine.model_runner import KVCachePlan, ModelRunner
from serving.engine.scheduler import PrefillChunk
from serving.engine.stream import StreamItem


class DeviceLogits(torch.Tensor):
    """A tensor a simulated device is still computing, ready at `ready` (`time.perf_counter()`). What is computed from
    it, or written into a tensor in place, is ready no sooner (stream order); reading it back (`tolist()`, `item()`,
    `int()`, `bool()`, `numpy()`, `nonzero()`) waits until then, as on CUDA; everything else (slicing, argmax,
    sampling, gathering) does not wait. Each operation costs ~5 us of Python here, which a real device does not."""

    ready: float

    @staticmethod
    def of(tensor: torch.Tensor, ready: float) -> "DeviceLogits":
        result = tensor.as_subclass(DeviceLogits)
        result.ready = ready
        return result

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ready = max((value.ready for value in _flatten((args, kwargs)) if isinstance(value, DeviceLogits)),
                    default=0.0)
        if func in _READS_BACK:
            wait = ready - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if (name.endswith("_") or name == "__setitem__") and isinstance(args[0], DeviceLogits):  # in place
            args[0].ready = ready
        return _wrap(result, ready)


_READS_BACK = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__bool__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero}
"""What waits for the device when it reads a tensor back."""


def _flatten(value):
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        yield from _flatten(list(value.values()))
    else:
        yield value


def _wrap(value: object, ready: float) -> object:
    if isinstance(value, torch.Tensor):
        return DeviceLogits.of(value, ready)
    if isinstance(value, tuple):  # torch's named results (sort: values, indices) take a sequence
        return type(value)([_wrap(item, ready) for item in value])
    return value


class StubRunner(ModelRunner):
    """What `stub_runner` builds: a real `ModelRunner` that records when each decode step started (`decode_times`)
    and when the simulated device was busy (`device_busy`), its prefill passes simulated when `simulated_prefill`
    is set."""

    decode_times: list[float]
    device_busy: list[tuple[float, float]]
    simulated_prefill: Callable[[Sequence[PrefillChunk]], torch.Tensor | None] | None = None

    def prefill(self, chunks: Sequence[PrefillChunk]) -> torch.Tensor | None:
        if self.simulated_prefill is not None:
            return self.simulated_prefill(chunks)
        return super().prefill(chunks)


def stub_runner(num_slots: int, max_model_len: int, vocab: int, device_ms: float = 0.0,
                prefill_us: float = 0.0) -> StubRunner:
    """A real `ModelRunner` (a tiny random model) whose decode step returns fixed logits: everything the engine
    thread does around a decode step runs as in serving (the runner's host-side layout of the batch included),
    only the device step is gone. With `device_ms`, the step is a simulated device that works that long per step,
    one step after another, while the engine thread goes on until it reads the logits back; with `prefill_us`
    (and `device_ms`), prefill passes are simulated the same way, taking that long per prompt token. Records when
    each decode step started in `decode_times`, and when the simulated device was busy in `device_busy`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SHAPES["tiny"], "vocab_size": vocab, "max_position_embeddings": max_model_len})
    torch.manual_seed(0)
    runner = StubRunner(LlamaForCausalLM(config).eval(), KVCachePlan(num_slots, max_model_len))
    logits = torch.randn(runner.batch_buckets[-1], vocab, generator=torch.Generator().manual_seed(0))
    runner.decode_times = []
    runner.device_busy = []
    device_free = 0.0

    def run_on_device(result: torch.Tensor, seconds: float) -> DeviceLogits:
        nonlocal device_free
        start = max(time.perf_counter(), device_free)
        device_free = start + seconds
        runner.device_busy.append((start, device_free))
        return DeviceLogits.of(result, device_free)

    def step(inputs: torch.Tensor, block_tables: torch.Tensor, kv_len: int) -> torch.Tensor:
        runner.decode_times.append(time.perf_counter())
        if not device_ms:
            return logits[: inputs.shape[1]]
        return run_on_device(logits[: inputs.shape[1]], device_ms / 1e3)

    runner.use_graphs(step)
    if device_ms and prefill_us:
        def prefill(chunks: Sequence[PrefillChunk]) -> torch.Tensor | None:
            inputs, _, wanted_rows, _ = runner.prefill_inputs(chunks)  # the pass's host side, as in serving
            if wanted_rows is None:
                return None
            return run_on_device(logits[: wanted_rows.shape[0]], inputs.shape[1] * prefill_us / 1e6)

        runner.simulated_prefill = prefill
    return runner


class CountingSink:
    """Counts tokens and finished requests; sets `done` when every request has finished. With `on_finish`, calls it
    for each finished request (on the engine thread, as soon as the output is delivered)."""

    def __init__(self, expected: int, on_finish: Callable[[], None] | None = None) -> None:
        self.tokens = 0
        self.finished = 0
        self.expected = expected
        self.on_finish = on_finish
        self.done = threading.Event()

    def deliver(self, items: list[tuple[object, StreamItem]]) -> bool:
        for _, output in items:
            if isinstance(output, BaseException):  # the engine loop died: the engine logs it with this sink's failure
                raise output
            self.tokens += len(output.token_ids)
            if output.finish_reason is not None:
                self.finished += 1
                if self.on_finish is not None:
                    self.on_finish()
        if self.finished >= self.expected:
            self.done.set()
        return True


def run_level(batch: int, steps: int, prompt_len: int, vocab: int, device_ms: float = 0.0,
              slots: int | None = None, overlap: bool | None = None, steps_min: int | None = None,
              arrivals: int = 0, prompt_min: int | None = None, prefill_us: float = 0.0,
              max_prefill_tokens: int | None = None, temperature: float = 0.0) -> dict:
    """`batch` requests on `slots` slots (default: as many as requests; more leave a batch bucket partly empty), each
    `steps` tokens long, or a seeded random length from `steps_min` to `steps` (requests ending at different steps),
    with prompts of `prompt_len` tokens, or a seeded random length from `prompt_min`. With `arrivals` > `batch`, a
    closed loop of that many requests, `batch` at a time. `overlap` as `EngineConfig.overlap`; by default on with a
    simulated device, as on CUDA, and off without. `max_prefill_tokens` as the engine's (default: every prompt of
    the first batch in one pass). `temperature` > 0 samples (top_p 0.95, a seed per request) instead of greedy."""
    total = max(arrivals, batch)
    runner = stub_runner(max(slots or batch, batch), prompt_len + steps + 1, vocab, device_ms, prefill_us)
    info = ModelInfo(max_model_len=runner.max_model_len, vocab_size=vocab, eos_token_ids=(vocab - 1,),
                     dtype="float32", device="cpu")
    overlap = device_ms > 0 if overlap is None else overlap
    config = EngineConfig(device="cpu", max_num_seqs=runner.num_slots, warmup_tokens=0, overlap=overlap,
                          max_prefill_tokens_per_step=max_prefill_tokens or batch * prompt_len)
    engine = LLMEngine(runner, None, info, config)
    generator = torch.Generator().manual_seed(batch)
    lengths = (torch.randint(steps_min, steps + 1, (total,), generator=generator).tolist() if steps_min
               else [steps] * total)
    prompt_lens = (torch.randint(prompt_min, prompt_len + 1, (total,), generator=generator).tolist() if prompt_min
                   else [prompt_len] * total)
    submitted = 0

    def submit_next() -> None:
        nonlocal submitted
        if submitted < total:
            index, submitted = submitted, submitted + 1
            params = SamplingParams(max_tokens=lengths[index], temperature=temperature, ignore_eos=True,
                                    top_p=0.95 if temperature else 1.0, seed=index if temperature else None)
            prompt = tuple(1 + position % (vocab - 2) for position in range(prompt_lens[index]))
            engine.submit(GenerationRequest(f"r{index}", prompt, params), sink, index)

    sink = CountingSink(total, on_finish=submit_next)
    for _ in range(batch):
        submit_next()
    asyncio.run(engine.start())  # no warm-up: starts the loop thread on the queued requests
    if not sink.done.wait(600):
        raise RuntimeError(f"batch {batch}: the loop did not finish")
    asyncio.run(engine.shutdown())
    assert sink.tokens == sum(lengths), (sink.tokens, sum(lengths))
    # From the first decode step to the last: the first prefill step (without --prefill-us, a real forward pass of
    # the tiny model) is not timed.
    times = runner.decode_times
    wall = times[-1] - times[0]
    # Device time within that window: what the host kept the device waiting shows as the rest.
    busy = sum(max(0.0, min(end, times[-1]) - max(start, times[0])) for start, end in runner.device_busy)
    per_step = wall / (len(times) - 1)
    # Per decoded token: every token after each request's first (which prefill gives) came from one of the steps.
    decoded = max(sink.tokens - total, 1)
    return {"batch": batch, "requests": total, "steps": len(times), "tokens": sink.tokens,
            "ms_per_step": per_step * 1e3, "us_per_token": per_step * len(times) / decoded * 1e6,
            "tokens_per_s": sink.tokens / wall, "device_busy": busy / wall if device_ms else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--steps", type=int, default=200, help="output tokens per request")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--prompt-min", type=int, default=None,
                        help="give each request a seeded random prompt length from this to --prompt-len")
    parser.add_argument("--arrivals", type=int, default=0,
                        help="a closed loop of this many requests in all, --batches at a time (default: one batch)")
    parser.add_argument("--prefill-us", type=float, default=0.0,
                        help="with --device-ms, simulate prefill passes taking this long per prompt token")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sample at this temperature (top_p 0.95, seeded) instead of greedy")
    parser.add_argument("--max-prefill-tokens", type=int, default=None,
                        help="the engine's prefill budget per step (default: the first batch's prompts in one pass)")
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
                          args.steps_min, args.arrivals, args.prompt_min, args.prefill_us, args.max_prefill_tokens,
                          args.temperature)
                for _ in range(args.rounds)]
        level = dict(runs[0])
        keys = ["ms_per_step", "us_per_token", "tokens_per_s"] + (["device_busy"] if args.device_ms else [])
        for key in keys:
            level[key] = statistics.median(run[key] for run in runs)
            level[f"{key}_all"] = [round(run[key], 4) for run in runs]
        levels.append(level)
    rows = [["batch", "requests", "decode steps", "tokens", "loop ms/step", "loop us/token", "tokens/s",
             "device busy", "ms/step, every run"]]
    for level in levels:
        busy = f"{level['device_busy']:.1%}" if args.device_ms else "-"
        rows.append([str(level["batch"]), str(level["requests"]), str(level["steps"]), str(level["tokens"]),
                     f"{level['ms_per_step']:.3f}", f"{level['us_per_token']:.2f}", f"{level['tokens_per_s']:.0f}",
                     busy, ", ".join(f"{v:.3f}" for v in level["ms_per_step_all"])])
    print(markdown_table(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps({"torch": torch.__version__, "device_ms": args.device_ms,
                                             "slots": args.slots, "overlap": args.overlap, "levels": levels}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
