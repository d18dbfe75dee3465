"""The paged KV cache against the layout before it, in one session: prefix-cache TTFT, admission for the same KV
memory, and output tokens/s, each measured on the engine itself (no HTTP).

The measuring half imports only `serving.engine`, so it runs on any checkout of the engine; run it once per layout
with that checkout first on the path, then compare (the model directories are built once, by this checkout):

    python -m serving.bench.paged_kv build --out /tmp/paged-kv                      # tiny and ~100M random models
    git worktree add --detach /tmp/base-kv <commit before the paged cache>
    PYTHONPATH=/tmp/base-kv python serving/bench/paged_kv.py measure --models /tmp/paged-kv --label contiguous \\
        --json-out /tmp/paged-kv/contiguous.json
    python -m serving.bench.paged_kv measure --models /tmp/paged-kv --label paged --json-out /tmp/paged-kv/paged.json
    python -m serving.bench.paged_kv compare /tmp/paged-kv/contiguous.json /tmp/paged-kv/paged.json

- `ttft`: one request with a 1,000-token prefix and a short suffix (first token only), then another with the same
  prefix and another suffix; each pair with a fresh prefix, the median of `--repeat` pairs. Without a prefix cache
  the second request costs what the first does.
- `admission`: KV memory for 16 sequences of a 4,096-token context; 256 requests with prompts of 100-300 tokens
  and 32-token outputs, all sent at once; the most that ran together. The contiguous layout gives each of its 16
  slots a whole context; the paged one admits by blocks (`num_kv_blocks` of the same memory, 256 rows).
- `throughput`: N streams (prompts 128 tokens, 64-token outputs, greedy, ignore_eos) sent at once; output tokens
  over the wall time from the first submission to the last token, the median of `--rounds` rounds (the spread is in
  the JSON).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.engine import LLMEngine

CONTEXT = 4096
MEMORY_SEQUENCES = 16
"""Admission: the KV memory of this many sequences of CONTEXT tokens."""
MODELS = {"tiny": "tiny-4k", "llama-100m": "llama-100m"}


def build(out: Path, shapes: list[str]) -> None:
    """Random-weight model directories for the measurements: by default the tiny shape with a 4k context, and
    ~100M parameters."""
    from serving.bench.loadtest import SHAPES, build_random_model

    SHAPES.setdefault("tiny-4k", {**SHAPES["tiny"], "max_position_embeddings": CONTEXT})
    for shape in shapes:
        if not (out / shape / "config.json").is_file():
            build_random_model(out / shape, shape)
            print(f"built {out / shape}", file=sys.stderr)


DEVICE: dict[str, Any] = {"device": "cpu", "dtype": "float32"}
"""Where the engines run (`measure --device/--dtype`): EngineConfig keyword arguments, each of its field's type."""


def _engine(model_dir: Path, paged: bool, **config: Any) -> LLMEngine:
    """An engine on this checkout's layout; paged options only where the checkout has them."""
    from serving.engine import EngineConfig, LLMEngine

    fields = {field.name for field in dataclasses.fields(EngineConfig)}
    config = {name: value for name, value in config.items() if name in fields}
    return LLMEngine.from_model_dir(model_dir, EngineConfig(warmup_tokens=8, **DEVICE, **config))


def _prompt(rng: random.Random, length: int, vocab: int) -> tuple[int, ...]:
    return tuple(rng.randrange(10, vocab - 10) for _ in range(length))


async def _first_token_s(engine: LLMEngine, name: str, prompt: tuple[int, ...]) -> float:
    from serving.engine import GenerationRequest, SamplingParams

    started = time.perf_counter()
    async for _ in engine.generate(GenerationRequest(name, prompt, SamplingParams(max_tokens=1, temperature=0.0))):
        pass
    return time.perf_counter() - started


def measure_ttft(model_dir: Path, paged: bool, repeat: int, prefix_len: int) -> dict:
    engine = _engine(model_dir, paged, max_num_seqs=4, max_model_len=2048)
    vocab = engine.model_info.vocab_size
    rng = random.Random(0)

    async def main():
        await engine.start()
        cold, warm = [], []
        for index in range(repeat):
            prefix = _prompt(rng, prefix_len, vocab)
            cold.append(await _first_token_s(engine, f"cold{index}", prefix + _prompt(rng, 24, vocab)))
            warm.append(await _first_token_s(engine, f"warm{index}", prefix + _prompt(rng, 24, vocab)))
        await engine.shutdown()
        return cold, warm

    cold, warm = asyncio.run(main())
    return {"prefix_len": prefix_len, "uncached_ms": statistics.median(cold) * 1e3,
            "cached_ms": statistics.median(warm) * 1e3}


def measure_admission(model_dir: Path, paged: bool, requests: int) -> dict:
    from serving.engine import GenerationRequest, SamplingParams

    block_size = 16
    engine = _engine(model_dir, paged, max_num_seqs=requests if paged else MEMORY_SEQUENCES, max_model_len=CONTEXT,
                     max_waiting=requests, block_size=block_size,
                     num_kv_blocks=MEMORY_SEQUENCES * CONTEXT // block_size)
    capacity = engine.stats().kv_cache_capacity_tokens
    vocab = engine.model_info.vocab_size
    rng = random.Random(1)
    work = [_prompt(rng, rng.randint(100, 300), vocab) for _ in range(requests)]

    async def main():
        await engine.start()
        streams = [engine.generate(GenerationRequest(f"a{index}", prompt,
                                                     SamplingParams(max_tokens=32, temperature=0.0,
                                                                    ignore_eos=True)))
                   for index, prompt in enumerate(work)]
        peak = 0

        async def drain(stream):
            async for _ in stream:
                pass

        tasks = [asyncio.create_task(drain(stream)) for stream in streams]
        while not all(task.done() for task in tasks):
            peak = max(peak, engine.stats().running)
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
        await engine.shutdown()
        return peak

    return {"kv_capacity_tokens": capacity, "requests": requests, "peak_running": asyncio.run(main())}


def measure_throughput(model_dir: Path, paged: bool, streams: int, rounds: int, prompt_len: int = 128,
                       output_len: int = 64) -> dict:
    from serving.engine import GenerationRequest, SamplingParams

    engine = _engine(model_dir, paged, max_num_seqs=streams, max_model_len=1024)
    vocab = engine.model_info.vocab_size
    rng = random.Random(2)
    work = [_prompt(rng, prompt_len, vocab) for _ in range(streams)]

    async def one_round(round_index: int) -> tuple[int, float]:
        tokens = 0

        async def drain(stream):
            nonlocal tokens
            async for output in stream:
                tokens += len(output.token_ids)

        # Each round's prompts differ from the last round's by their first token: no prefix is reused.
        started = time.perf_counter()
        await asyncio.gather(*(drain(engine.generate(GenerationRequest(
            f"t{round_index}-{index}", (10 + round_index,) + prompt[1:],
            SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))))
            for index, prompt in enumerate(work)))
        return tokens, time.perf_counter() - started

    async def main():
        await engine.start()
        results = [await one_round(index) for index in range(rounds)]
        await engine.shutdown()
        return results

    results = asyncio.run(main())
    rates = sorted(tokens / elapsed for tokens, elapsed in results)
    return {"streams": streams, "output_tokens": results[0][0], "rounds": rounds,
            "output_tok_s": statistics.median(rates), "min_tok_s": rates[0], "max_tok_s": rates[-1]}


def measure(args: argparse.Namespace) -> dict:
    from serving.engine import EngineConfig

    paged = "block_size" in {field.name for field in dataclasses.fields(EngineConfig)}
    DEVICE.update(device=args.device, dtype=args.dtype)
    result = {"label": args.label, "paged": paged, "device": args.device, "dtype": args.dtype, "ttft": {},
              "admission": {}, "throughput": {}}
    for index, entry in enumerate(args.model_names):
        model, _, path = entry.partition("=")
        model_dir = Path(path) if path else args.models / MODELS.get(model, model)
        if "ttft" in args.what:
            result["ttft"][model] = measure_ttft(model_dir, paged, args.repeat, args.prefix_len)
            print(model, "ttft", result["ttft"][model], file=sys.stderr)
        if "admission" in args.what and index == 0:  # the count does not depend on the model
            result["admission"][model] = measure_admission(model_dir, paged, args.admission_requests)
            print(model, "admission", result["admission"][model], file=sys.stderr)
        if "throughput" in args.what:
            result["throughput"][model] = [measure_throughput(model_dir, paged, streams, args.rounds)
                                           for streams in args.streams]
            print(model, "throughput", result["throughput"][model], file=sys.stderr)
    return result


def compare(old: dict, new: dict) -> str:
    """The two runs side by side, as Markdown."""
    from serving.bench.loadtest import markdown_table

    rows = [["measurement", "model", old["label"], new["label"], "new / old"]]
    for model in new["ttft"]:
        before, after = old["ttft"].get(model), new["ttft"][model]
        if before is None:
            continue
        length = after["prefix_len"]
        rows.append([f"TTFT, {length}-token prefix uncached, ms", model, f"{before['uncached_ms']:,.1f}",
                     f"{after['uncached_ms']:,.1f}", f"{after['uncached_ms'] / before['uncached_ms']:.2f}x"])
        rows.append(["TTFT, same prefix sent again, ms", model, f"{before['cached_ms']:,.1f}",
                     f"{after['cached_ms']:,.1f}", f"{before['cached_ms'] / after['cached_ms']:.1f}x faster"])
    for model in new["admission"]:
        before, after = old["admission"].get(model), new["admission"][model]
        if before is None:
            continue
        rows.append([f"sequences running at once, KV of {before['kv_capacity_tokens']:,} / "
                     f"{after['kv_capacity_tokens']:,} tokens", model, str(before["peak_running"]),
                     str(after["peak_running"]), f"{after['peak_running'] / before['peak_running']:.1f}x"])
    for model in new["throughput"]:
        before = {level["streams"]: level for level in old["throughput"].get(model, [])}
        for level in new["throughput"][model]:
            was = before.get(level["streams"])
            if was is None:
                continue
            def spread(run: dict) -> str:
                return f"{run['output_tok_s']:,.0f} ({run['min_tok_s']:,.0f}-{run['max_tok_s']:,.0f})"

            rows.append([f"output tok/s, {level['streams']} streams (min-max)", model, spread(was), spread(level),
                         f"{level['output_tok_s'] / was['output_tok_s']:.2f}x"])
    return markdown_table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    built = commands.add_parser("build", help="build the random-weight model directories")
    built.add_argument("--out", type=Path, required=True)
    built.add_argument("--shapes", default="tiny-4k,llama-100m")
    measured = commands.add_parser("measure", help="measure this checkout's engine")
    measured.add_argument("--models", type=Path, default=Path("."), help="where `build` put the models")
    measured.add_argument("--model-names", default="tiny,llama-100m",
                          help="models under --models, or NAME=DIRECTORY (comma-separated); admission runs on the "
                               "first")
    measured.add_argument("--device", default="cpu")
    measured.add_argument("--dtype", default="float32")
    measured.add_argument("--label", required=True)
    measured.add_argument("--what", default="ttft,admission,throughput")
    measured.add_argument("--streams", default="16,64")
    measured.add_argument("--repeat", type=int, default=3, help="TTFT pairs (the median is reported)")
    measured.add_argument("--rounds", type=int, default=5, help="throughput rounds (the median is reported)")
    measured.add_argument("--prefix-len", type=int, default=1000)
    measured.add_argument("--admission-requests", type=int, default=256)
    measured.add_argument("--json-out", type=Path)
    compared = commands.add_parser("compare", help="print two runs side by side")
    compared.add_argument("old", type=Path)
    compared.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out, [shape.strip() for shape in args.shapes.split(",")])
    elif args.command == "measure":
        args.model_names = [name.strip() for name in args.model_names.split(",")]
        args.streams = [int(value) for value in args.streams.split(",")]
        result = measure(args)
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    else:
        print(compare(json.loads(args.old.read_text()), json.loads(args.new.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
