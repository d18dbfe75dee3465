"""Turn one GPU session's results (`serving/bench/gpu_session.sh`'s $OUT) into Markdown for docs/BENCHMARKS.md.

    python -m serving.bench.report /path/to/out > /tmp/section.md
    python -m serving.bench.report /path/to/out --write docs/BENCHMARKS.md   # in place, between the markers

End-to-end levels are set beside the issue's targets and the decode roofline of the same shape (weights plus the
live K/V read once per step, from the engine-steps run); the baselines measured in the same call follow.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from serving.bench import http_layer
from serving.bench.loadtest import markdown_table

# Output tokens/s the engine must reach end to end (Llama-3.2-1B shape, bf16, one H100).
TARGETS = {1: 600, 64: 12_000, 256: 25_000}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _number(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def end_to_end(load: dict, steps: dict | None) -> str:
    roofline = {row["batch"]: row["roofline_tokens_per_s"] for row in (steps or {}).get("decode", [])}
    rows = [["conc", "out tok/s", "target", "of roofline", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
             "errors", "short outputs", "client busy"]]
    for level in load["levels"]:
        conc = level["concurrency"]
        ceiling = roofline.get(conc)
        rows.append([str(conc), _number(level["output_tok_s"]), _number(TARGETS.get(conc)),
                     f"{level['output_tok_s'] / ceiling:.1%}" if ceiling else "-",
                     _number(level["ttft_p50_ms"], 2), _number(level["ttft_p99_ms"], 2),
                     _number(level["itl_p50_ms"], 2), _number(level["itl_p99_ms"], 2),
                     str(level["errors"]), str(level["short_outputs"]), _busy(level)])
    return markdown_table(rows)


def _busy(level: dict) -> str:
    """How busy the busiest load-generator process was: near 100%, the client may have limited the level."""
    busy = level.get("client_busy_max")
    return "-" if busy is None else f"{busy:.0%}"


def engine_steps(steps: dict) -> str:
    decode = [["attention", "batch", "kv_len", "mean len", "eager ms", "graph ms", "floor ms", "bucket floor ms",
               "decode tok/s", "roofline tok/s"]]
    for row in steps["decode"]:
        decode.append([row["attention"], str(row["batch"]), str(row["kv_len"]), str(row["mean_len"]),
                       _number(row["eager_ms"], 2), _number(row["graph_ms"], 2), _number(row["floor_ms"], 2),
                       _number(row["bucket_floor_ms"], 2), _number(row["tokens_per_s"], 0),
                       _number(row["roofline_tokens_per_s"], 0)])
    prefill = [["prefill", "attention", "prompts x tokens", "ms", "tokens/s"]]
    for row in steps["prefill"]:
        prefill.append([row["what"], row["attention"], f"{row['prompts']} x {row['tokens'] // row['prompts']}",
                        _number(row["ms"], 2), _number(row["tokens_per_s"], 0)])
    attention = [["attention (decode, all layers)", "batch", "kv_len", "ms", "floor ms", "same as sdpa"]]
    for row in steps["attention"]:
        attention.append([row["attention"], str(row["batch"]), str(row["kv_len"]), _number(row["ms"], 3),
                          _number(row["floor_ms"], 3), str(row["same_result"])])
    tables = [markdown_table(table) for table in (decode, prefill, attention) if len(table) > 1]
    skipped = "".join(f"\n\n{name} was not timed: {reason}." for name, reason in steps.get("skipped", {}).items())
    return "\n\n".join(tables) + skipped


def baselines(data: dict) -> str:
    rows = [["baseline", "out tok/s", "of roofline (spec)"]]
    for result in data["results"]:
        if "error" in result:
            rows.append([result["mode"], f"failed: {result['error'][:80]}", "-"])
            continue
        rows.append([result.get("mode", "?"), _number(result.get("output_tok_s")),
                     f"{result['ratio_to_roofline_spec']:.1%}" if "ratio_to_roofline_spec" in result else "-"])
    return markdown_table(rows) + f"\n\nEnvironment: `{json.dumps(data.get('env', {}))}`"


def report(out: Path) -> str:
    parts = []
    if (env := out / "env.txt").is_file():
        parts.append("```\n" + env.read_text().strip() + "\n```")
    steps, load, base = _load(out / "steps.json"), _load(out / "load.json"), _load(out / "baselines.json")
    if load:
        parts.append("End to end (HTTP streaming, `serving.bench.loadtest`):\n\n" + end_to_end(load, steps))
    if steps:
        parts.append("Engine steps (`serving.bench.engine_steps`):\n\n" + engine_steps(steps))
    for name, what in (("load-flash", "decode over the paged cache gathered into one copy and read by the flash kernel "
                                      "(`--attention-backend flash`)"),
                       ("load-sdpa", "attention over each step's KV bucket (`--attention-backend sdpa`)"),
                       ("load-stepwise", "one step at a time, no run-ahead decode steps (`--overlap off`)"),
                       ("load-prefill8k", "a prefill budget of 8192 tokens per step (`--max-prefill-tokens 8192`)"),
                       ("load-thread", "the engine on a thread of the server's process (`--engine-process off`)")):
        if variant := _load(out / f"{name}.json"):
            parts.append(f"End to end with {what}:\n\n" + end_to_end(variant, steps))
    for mode, where in (("on", "in its own process"), ("off", "on a thread of the server's process")):
        if http := _load(out / f"http-{mode}.json"):
            parts.append(f"The HTTP layer on this machine's CPU, synthetic engine {where} "
                         f"(`serving.bench.http_layer --engine-process {mode}`):\n\n"
                         + http_layer.format_table(http["levels"]))
    if requests := _load(out / "http-requests.json"):
        parts.append("The HTTP process's work per request on this machine's CPU: one-token outputs, so its CPU per "
                     "token is its CPU per request (`serving.bench.http_layer --out-min 1 --out-max 1`):\n\n"
                     + http_layer.format_table(requests["levels"]))
    if (paged := out / "paged-kv.md").is_file() and paged.read_text().startswith("|"):
        parts.append("The paged KV cache against the contiguous layout before it (`serving.bench.paged_kv`):\n\n"
                     + paged.read_text().strip())
    if base:
        parts.append("Baselines in the same call (`h100_baselines.py`):\n\n" + baselines(base))
    if (summary := out / "summary.txt").is_file():
        parts.append("Stages:\n\n```\n" + summary.read_text().strip() + "\n```")
    return "\n\n".join(parts) + "\n"


BEGIN, END = "<!-- gpu-session:begin -->", "<!-- gpu-session:end -->"


def write_into(document: Path, section: str) -> None:
    """Replace what lies between the BEGIN and END markers of `document` with `section`."""
    text = document.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{document} needs one {BEGIN} line followed by one {END} line")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    document.write_text(f"{head}{BEGIN}\n{section.strip()}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="gpu_session.sh's $OUT (the device call's files)")
    parser.add_argument("--write", type=Path, metavar="DOC",
                        help="put the report between the gpu-session markers of DOC instead of printing it")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.out.is_dir():
        print(f"{args.out} is not a directory (gpu_session.sh's $OUT)", file=sys.stderr)
        return 2
    section = report(args.out)
    if args.write:
        write_into(args.write, section)
    else:
        sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
