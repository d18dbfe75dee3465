"""Engine steps in isolation: decode step eager vs CUDA graph, prefill one prompt per pass vs packed, and decode
attention alone, each with every attention implementation that applies here (`sdpa` everywhere, `flash` and
`triton` on a CUDA GPU in bf16/fp16). Random weights of a real shape, built in memory.

Each variant is timed on the same runner in the same process (median of `--repeat` runs after warm-up, with
device synchronisation), so before/after comparisons of the engine's levers come from one run:

    python -m serving.bench.engine_steps --shape llama-3.2-1b --device cuda --batches 1,16,64,256 \\
        --json-out steps.json
    python -m serving.bench.engine_steps --shape tiny --device cpu --batches 1,4 --kv-len 256   # smoke

Decode rows have the workload's spread of lengths: row i holds a seeded random length between a quarter of
`--kv-len` and `--kv-len` (mean about 5/8 of it), so the step's KV bucket is `--kv-len` while the valid K/V is
less, as in serving. `floor_ms` is the step's memory floor: every weight read once plus every valid K/V byte
read once, at `--hbm-tb-s` (3.35 for an H100 SXM, 4.8 for an H200); `bucket_floor_ms` reads the whole bucket for
every row, what attention over the bucket (sdpa) cannot avoid. The roofline column is the decode throughput the
floor allows at the workload's mean K/V length (`--mean-kv-len`), the ceiling end-to-end numbers are compared with.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from serving.bench.loadtest import SHAPES, markdown_table
from serving.engine.attention import (
    Attention,
    AttentionShape,
    FlashAttention,
    SdpaAttention,
    TritonAttention,
    disagreement,
    flash_unavailable_reason,
    triton_unavailable_reason,
)
from serving.engine.cuda_graphs import DecodeGraphs
from serving.engine.model_runner import KVCachePlan, ModelRunner, PrefillChunk, kv_bytes_per_token, kv_len_bucket

if TYPE_CHECKING:
    from transformers import LlamaConfig


def build_runner(shape: str, device: torch.device, dtype: torch.dtype, num_slots: int, max_model_len: int
                 ) -> tuple[ModelRunner, LlamaConfig]:
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = SHAPES[shape]
    config = LlamaConfig(**dims, initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device(device):
        # transformers declares PreTrainedModel.to through @wraps(Module.to), which mypy reads as unbound.
        model = LlamaForCausalLM(config).to(dtype).eval()  # type: ignore[arg-type]
    return ModelRunner(model, KVCachePlan(num_slots, max_model_len)), config


def timed(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Median milliseconds of `fn()` over `repeat` runs, each synchronised."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def attentions(runner: ModelRunner, names: list[str], dtype: torch.dtype
               ) -> tuple[dict[str, Attention], dict[str, str | None]]:
    """The requested attention implementations that apply here, and why the others were skipped."""
    unknown = sorted(set(names) - {"sdpa", "flash", "triton"})
    if unknown:
        raise SystemExit(f"--attention: {', '.join(unknown)} unknown; choose from sdpa, flash, triton")
    shape = runner.attention_shape
    flash_reason = flash_unavailable_reason(runner.device, dtype, runner.head_dim)
    chosen: dict[str, Attention] = {}
    skipped: dict[str, str | None] = {}
    for name in names:
        if name == "sdpa":
            chosen[name] = SdpaAttention(shape)
        elif name == "flash" and flash_reason is None:
            chosen[name] = FlashAttention(shape)
        elif name == "triton" and (reason := _triton_reason(shape, dtype, flash_reason)) is None:
            chosen[name] = TritonAttention(shape, SdpaAttention(shape) if flash_reason else FlashAttention(shape))
        else:
            skipped[name] = flash_reason if name == "flash" else reason
    return chosen, skipped


def _triton_reason(shape: AttentionShape, dtype: torch.dtype, flash_reason: str | None) -> str | None:
    """Why the Triton kernel is not timed: it cannot run here, or it fails the engine's load check (which also
    catches a kernel that does not compile)."""
    reason = triton_unavailable_reason(shape.device, dtype, shape.head_dim)
    if reason is None:
        reason = disagreement(lambda small: TritonAttention(small, SdpaAttention(small)), shape, dtype)
    return reason


def row_lengths(batch: int, kv_len: int) -> torch.Tensor:
    """Valid K/V per row: seeded, uniform between kv_len / 4 and kv_len - 1."""
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(max(kv_len // 4, 1), kv_len, (batch,), generator=generator)


def decode_rows(runner: ModelRunner, config: LlamaConfig, args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype, backends: dict[str, Attention], skipped: dict[str, str | None]) -> list[dict]:
    """Decode steps with each implementation; one whose graphs cannot be captured is timed eagerly only, and
    `skipped` says why."""
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_per_token = kv_bytes_per_token(config, dtype)
    kv_len = kv_len_bucket(args.kv_len, runner.max_model_len)
    rows = []
    for name, attention in backends.items():
        runner.use_attention(attention)
        graphs = None
        if device.type == "cuda" and not args.no_graphs:
            graphs = DecodeGraphs(runner.decode_step, batch_buckets=args.batches, kv_len_buckets=[kv_len],
                                  vocab_size=runner.vocab_size, block_size=runner.block_size,
                                  scratch_block=runner.scratch_block, device=device)
            try:
                graphs.capture()
            except Exception as exc:  # noqa: BLE001 - recorded; the eager numbers still come out
                skipped[f"{name} graphs"] = f"capture failed: {type(exc).__name__}: {exc}"
                graphs = None
        for batch in args.batches:
            lengths = row_lengths(batch, args.kv_len)
            tokens = torch.randint(10, config.vocab_size, (batch,), generator=torch.Generator().manual_seed(batch))
            # Row i holds blocks i * W .. (i + 1) * W - 1 of the pool, W = kv_len / block_size.
            width = kv_len // runner.block_size
            tables = torch.arange(batch * width).view(batch, width).to(device)
            positions = lengths - 1
            cache_rows = tables.cpu().gather(1, (positions // runner.block_size).view(-1, 1)).view(-1) \
                * runner.block_size + positions % runner.block_size
            inputs = torch.stack([tokens, positions, cache_rows]).to(device)
            eager = timed(partial(runner.decode_step, inputs[0], inputs[1], inputs[2], tables, kv_len), device,
                          args.repeat)
            graphed = timed(partial(graphs, inputs, tables, kv_len), device, args.repeat) if graphs else None
            best = min(t for t in (eager, graphed) if t is not None)
            rows.append({"what": "decode step", "attention": name, "batch": batch, "kv_len": kv_len,
                         "mean_len": round(lengths.float().mean().item()), "eager_ms": eager, "graph_ms": graphed,
                         "floor_ms": _floor_ms(weight_bytes + int(lengths.sum()) * kv_per_token, args.hbm_tb_s),
                         "bucket_floor_ms": _floor_ms(weight_bytes + batch * kv_len * kv_per_token, args.hbm_tb_s),
                         "tokens_per_s": batch / best * 1e3,
                         "roofline_tokens_per_s": batch / _floor_ms(weight_bytes + batch * args.mean_kv_len
                                                                    * kv_per_token, args.hbm_tb_s) * 1e3})
        graphs = None  # its memory back before the next implementation's capture
    return rows


def _floor_ms(bytes_moved: float, tb_per_s: float) -> float:
    return bytes_moved / (tb_per_s * 1e12) * 1e3


def prefill_rows(runner: ModelRunner, config: LlamaConfig, args: argparse.Namespace, device: torch.device,
                 backends: dict[str, Attention]) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, config.vocab_size, (args.prompt_len,), generator=generator).tolist()
               for _ in range(args.prompts)]
    per = runner.max_blocks_per_seq
    chunks = [PrefillChunk(slot, prompt, 0, want_logits=True, block_table=range(slot * per, (slot + 1) * per))
              for slot, prompt in enumerate(prompts)]
    tokens = args.prompts * args.prompt_len
    rows: list[dict] = []
    for name, attention in backends.items():
        runner.use_attention(attention)
        variants: list[tuple[str, Callable[[], object]]] = (
            [("one prompt per pass", lambda: [runner.prefill([chunk]) for chunk in chunks])] if not rows else [])
        variants.append(("packed in one pass", lambda: runner.prefill(chunks)))
        for what, run in variants:
            ms = timed(run, device, args.repeat)
            rows.append({"what": f"prefill, {what}", "attention": name, "prompts": args.prompts, "tokens": tokens,
                         "ms": ms, "tokens_per_s": tokens / ms * 1e3})
    return rows


def attention_rows(runner: ModelRunner, config: LlamaConfig, args: argparse.Namespace, device: torch.device,
                   dtype: torch.dtype, backends: dict[str, Attention]) -> list[dict]:
    """Decode attention alone, all layers' worth, over a random paged cache with the decode rows' lengths, each row's
    blocks shuffled through the pool as serving leaves them (the gathering implementations' copy included); each
    implementation's result checked against sdpa's."""
    shape = runner.attention_shape
    kv_len = kv_len_bucket(args.kv_len, runner.max_model_len)
    size = shape.block_size
    generator = torch.Generator(device=device).manual_seed(0)
    blocks = (shape.num_slots * shape.max_model_len // size, size, shape.num_kv_heads, shape.head_dim)
    k_blocks = torch.randn(blocks, generator=generator, device=device, dtype=dtype)
    v_blocks = torch.randn(blocks, generator=generator, device=device, dtype=dtype)
    reference = SdpaAttention(shape)
    rows = []
    for batch in args.batches:
        lengths = row_lengths(batch, args.kv_len).to(device=device, dtype=torch.int32)
        query = torch.randn(batch, shape.num_heads, shape.head_dim, generator=generator, device=device, dtype=dtype)
        width = kv_len // size
        tables = torch.randperm(blocks[0], generator=generator, device=device)[: batch * width].view(batch, width)
        expected = reference.decode(query, k_blocks, v_blocks, reference.decode_plan(lengths, tables, kv_len)).float()
        valid_bytes = 2 * int(lengths.sum()) * shape.num_kv_heads * shape.head_dim * k_blocks.element_size()
        for name, attention in backends.items():
            plan = attention.decode_plan(lengths, tables, kv_len)
            ms = timed(partial(attention.decode, query, k_blocks, v_blocks, plan), device, args.repeat)
            got = attention.decode(query, k_blocks, v_blocks, plan).float()
            rows.append({"what": "decode attention, all layers", "attention": name, "batch": batch,
                         "kv_len": kv_len, "ms": ms * config.num_hidden_layers,
                         "floor_ms": valid_bytes * config.num_hidden_layers / (args.hbm_tb_s * 1e12) * 1e3,
                         "same_result": bool(torch.allclose(got, expected, atol=3e-2, rtol=3e-2))})
    return rows


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"
    return str(value)


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return markdown_table([keys] + [[fmt(row.get(key)) for key in keys] for row in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batches", default="1,16,64,256", help="decode batch sizes (comma-separated)")
    parser.add_argument("--kv-len", type=int, default=1024, help="tokens per sequence in the decode step")
    parser.add_argument("--prompts", type=int, default=8, help="prompts in the prefill comparison")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--hbm-tb-s", type=float, default=3.35, help="memory bandwidth for the floor, TB/s")
    parser.add_argument("--mean-kv-len", type=int, default=592,
                        help="mean K/V length during decode for the roofline column (default: the benchmark "
                             "workload's, prompts 256-768 plus half of outputs 64-256)")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA graph variant")
    parser.add_argument("--attention", default="sdpa,flash,triton",
                        help="attention implementations to time (comma-separated; those that do not apply here are "
                             "skipped, saying why)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    args.batches = sorted({int(b) for b in args.batches.split(",")})
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    num_slots = max(max(args.batches), args.prompts)
    max_model_len = max(args.kv_len, args.prompt_len)
    runner, config = build_runner(args.shape, device, dtype, num_slots, max_model_len)
    print(f"{args.shape} on {device} ({dtype}), torch {torch.__version__}", file=sys.stderr)
    backends, skipped = attentions(runner, [name.strip() for name in args.attention.split(",")], dtype)

    sections = {"decode": decode_rows(runner, config, args, device, dtype, backends, skipped),
                "prefill": prefill_rows(runner, config, args, device, backends),
                "attention": attention_rows(runner, config, args, device, dtype, backends)}
    for name, rows in sections.items():
        print(f"\n{name}\n{table(rows)}")
    for name, reason in skipped.items():
        print(f"{name} skipped: {reason}", file=sys.stderr)
    if args.json_out:
        args.json_out.write_text(json.dumps({"shape": args.shape, "device": str(device), "dtype": str(dtype),
                                             "torch": torch.__version__, "skipped": skipped, **sections}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
