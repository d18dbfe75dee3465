"""Engine steps in isolation: decode step eager vs CUDA graph, prefill one prompt per pass vs packed, and the
decode attention's two grouped-query formulations. Random weights of a real shape, built in memory.

Each variant is timed on the same runner in the same process (median of `--repeat` runs after warm-up, with
device synchronisation), so before/after comparisons of the engine's levers come from one run:

    python -m serving.bench.engine_steps --shape llama-3.2-1b --device cuda --batches 1,16,64,256 \\
        --json-out steps.json
    python -m serving.bench.engine_steps --shape tiny --device cpu --batches 1,4 --kv-len 256   # smoke

`floor_ms` is the timed step's memory floor: every weight read once plus every K/V byte up to `--kv-len` read once,
at `--hbm-tb-s` (3.35 for an H100 SXM). The roofline column is the decode throughput that floor allows at the
workload's mean K/V length (`--mean-kv-len`), the ceiling the end-to-end numbers are compared with.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from serving.bench.loadtest import SHAPES, markdown_table
from serving.engine.cuda_graphs import DecodeGraphs
from serving.engine.model_runner import KVCachePlan, ModelRunner, PrefillChunk, kv_bytes_per_token, kv_len_bucket


def build_runner(shape: str, device: torch.device, dtype: torch.dtype, num_slots: int, max_model_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = SHAPES[shape]
    config = LlamaConfig(**dims, initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return ModelRunner(model, KVCachePlan(num_slots, max_model_len)), config


def timed(fn, device: torch.device, repeat: int, warmup: int = 2) -> float:
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


def decode_rows(runner: ModelRunner, config, args, device, dtype) -> list[dict]:
    graphs = None
    if device.type == "cuda" and not args.no_graphs:
        graphs = DecodeGraphs.for_runner(runner)
        graphs.capture()
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_per_token = kv_bytes_per_token(config, dtype)
    rows = []
    for batch in args.batches:
        generator = torch.Generator().manual_seed(batch)
        tokens = torch.randint(10, config.vocab_size, (batch,), generator=generator)
        positions = torch.full((batch,), args.kv_len - 1, dtype=torch.long)
        inputs = torch.stack([tokens, positions]).to(device)
        kv_len = kv_len_bucket(args.kv_len, runner.max_model_len)
        eager = timed(lambda: runner.decode_step(inputs[0], inputs[1], kv_len), device, args.repeat)
        graphed = timed(lambda: graphs(inputs, kv_len), device, args.repeat) if graphs else None
        floor_ms = _floor_ms(weight_bytes + batch * args.kv_len * kv_per_token, args.hbm_tb_s)
        workload_floor_ms = _floor_ms(weight_bytes + batch * args.mean_kv_len * kv_per_token, args.hbm_tb_s)
        best = min(t for t in (eager, graphed) if t is not None)
        rows.append({"what": "decode step", "batch": batch, "kv_len": args.kv_len, "eager_ms": eager,
                     "graph_ms": graphed, "floor_ms": floor_ms, "tokens_per_s": batch / best * 1e3,
                     "roofline_tokens_per_s": batch / workload_floor_ms * 1e3})
    return rows


def _floor_ms(bytes_moved: float, tb_per_s: float) -> float:
    return bytes_moved / (tb_per_s * 1e12) * 1e3


def prefill_rows(runner: ModelRunner, config, args, device) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, config.vocab_size, (args.prompt_len,), generator=generator).tolist()
               for _ in range(args.prompts)]
    chunks = [PrefillChunk(slot, prompt, 0, want_logits=True) for slot, prompt in enumerate(prompts)]
    one_by_one = timed(lambda: [runner.prefill([chunk]) for chunk in chunks], device, args.repeat)
    packed = timed(lambda: runner.prefill(chunks), device, args.repeat)
    tokens = args.prompts * args.prompt_len
    return [{"what": "prefill, one prompt per pass", "prompts": args.prompts, "tokens": tokens, "ms": one_by_one,
             "tokens_per_s": tokens / one_by_one * 1e3},
            {"what": "prefill, packed in one pass", "prompts": args.prompts, "tokens": tokens, "ms": packed,
             "tokens_per_s": tokens / packed * 1e3}]


def attention_rows(config, args, device, dtype) -> list[dict]:
    """Decode attention alone: SDPA with enable_gqa vs query heads folded per KV head (what the runner does)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rows = []
    for batch in args.batches:
        query = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
        key = torch.randn(batch, kv_heads, args.kv_len, head_dim, device=device, dtype=dtype)
        value = torch.randn_like(key)
        lengths = torch.randint(1, args.kv_len + 1, (batch,), device=device)
        mask = (torch.arange(args.kv_len, device=device)[None, :] < lengths[:, None])[:, None, None, :]
        repeated = timed(lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True),
                         device, args.repeat)
        folded = timed(lambda: F.scaled_dot_product_attention(query.reshape(batch, kv_heads, -1, head_dim), key,
                                                              value, attn_mask=mask), device, args.repeat)
        same = torch.allclose(
            F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True).reshape(batch, -1),
            F.scaled_dot_product_attention(query.reshape(batch, kv_heads, -1, head_dim), key, value,
                                           attn_mask=mask).reshape(batch, -1), atol=2e-2, rtol=2e-2)
        kv_bytes = 2 * key.numel() * key.element_size() * config.num_hidden_layers
        rows.append({"what": "decode attention, all layers", "batch": batch, "kv_len": args.kv_len,
                     "enable_gqa_ms": repeated * config.num_hidden_layers,
                     "folded_ms": folded * config.num_hidden_layers,
                     "floor_ms": kv_bytes / (args.hbm_tb_s * 1e12) * 1e3, "same_result": same})
    return rows


def fmt(value) -> str:
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
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    args.batches = sorted({int(b) for b in args.batches.split(",")})
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    num_slots = max(max(args.batches), args.prompts)
    max_model_len = max(args.kv_len, args.prompt_len)
    runner, config = build_runner(args.shape, device, dtype, num_slots, max_model_len)
    print(f"{args.shape} on {device} ({dtype}), torch {torch.__version__}", file=sys.stderr)

    sections = {"decode": decode_rows(runner, config, args, device, dtype),
                "prefill": prefill_rows(runner, config, args, device),
                "attention": attention_rows(config, args, device, dtype)}
    for name, rows in sections.items():
        print(f"\n{name}\n{table(rows)}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"shape": args.shape, "device": str(device), "dtype": str(dtype),
                                             "torch": torch.__version__, **sections}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
