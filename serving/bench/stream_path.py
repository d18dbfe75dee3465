"""What each streamed token costs the HTTP process, part by part, without sockets: the incremental detokenizer
(without and with stop strings), the engine stream a request reads its outputs from, and the SSE event a text
delta becomes. Each part is timed on its own over a realistic text, best of `--repeat`; run it in two checkouts to
compare them (the end-to-end cost with sockets is `serving.bench.http_layer`'s).

    python -m serving.bench.stream_path                       # a byte-level BPE tokenizer is built in a temp dir
    python -m serving.bench.stream_path --tokenizer DIR       # or any model directory's tokenizer
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, cast

from serving.bench.loadtest import markdown_table

# English with a few characters that byte-level BPE splits over several tokens, as real output has.
TEXT = ("The quick brown fox jumps over the lazy dog, and the server streams every token to its client. "
        "Kubernetes schedules the pods; caf\u00e9 na\u00efve \u4e16\u754c \u2713. ") * 8


def build_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer (the GPT-2/Llama-3 kind) trained on TEXT, saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([TEXT] * 4, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="</s>").save_pretrained(directory)
    return directory


def _best_us(run: Callable[[], float], repeat: int) -> float:
    return min(run() for _ in range(repeat))


def time_detokenizer(tokenizer: Any, stop: tuple[str, ...], repeat: int) -> float:
    from serving.detokenizer import IncrementalDetokenizer

    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    prompt, output = ids[:16], ids[16:]

    def run() -> float:
        started = time.perf_counter()
        for _ in range(20):
            detokenizer = IncrementalDetokenizer(tokenizer, prompt, stop)
            for token in output:
                detokenizer.add([token])
            detokenizer.finish()
        return (time.perf_counter() - started) / (20 * len(output)) * 1e6

    return _best_us(run, repeat)


def time_stream(repeat: int, tokens: int = 20_000) -> float:
    """A reader awaiting its stream while the event loop delivers one output per turn, as a step's batch does."""
    from serving.engine.interface import TokenOutput
    from serving.engine.stream import Mailbox, TokenStream

    async def run_once() -> float:
        loop = asyncio.get_running_loop()
        mailbox = Mailbox()
        stream = TokenStream(mailbox, lambda: None)

        def deliver(index: int) -> None:
            mailbox.put_nowait(TokenOutput((7,), "length" if index == tokens - 1 else None))
            if index + 1 < tokens:
                loop.call_soon(deliver, index + 1)

        started = time.perf_counter()
        loop.call_soon(deliver, 0)
        count = 0
        async for output in stream:
            count += len(output.token_ids)
        assert count == tokens
        return (time.perf_counter() - started) / tokens * 1e6

    return _best_us(lambda: asyncio.run(run_once()), repeat)


def time_sse_event(repeat: int) -> float:
    from serving.api.openai import _Chunks, _Generation
    from serving.protocol import BaseGenerationRequest

    # Stand-ins with just what `_Chunks` reads of a generation and a request body.
    generation = cast(_Generation, SimpleNamespace(request_id="cmpl-0", finish_reason="length", usage=lambda: None))
    body = cast(BaseGenerationRequest, SimpleNamespace(include_usage=True))
    chunks = _Chunks(generation, body, "bench", "text_completion", lambda text: {"text": text}, last={"text": ""})
    deltas = TEXT.split(" ")
    expected = f"data: {json.dumps(chunks.choice({'text': deltas[1]}, None), ensure_ascii=False)}\n\n"
    assert chunks.event(deltas[1]) == expected

    def run() -> float:
        started = time.perf_counter()
        for _ in range(20):
            for delta in deltas:
                chunks.event(delta)
        return (time.perf_counter() - started) / (20 * len(deltas)) * 1e6

    return _best_us(run, repeat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="a directory AutoTokenizer loads (default: built here)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per part; the best is reported")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    directory = args.tokenizer or build_tokenizer(Path(tempfile.mkdtemp(prefix="stream-path-")))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    parts = {
        "detokenizer": time_detokenizer(tokenizer, (), args.repeat),
        "detokenizer, two stop strings": time_detokenizer(tokenizer, ("</answer>", "\nUser:"), args.repeat),
        "engine stream (one output per loop turn)": time_stream(args.repeat),
        "SSE event of a text delta": time_sse_event(args.repeat),
    }
    print(markdown_table([["part of the streaming path", "us per token"]]
                         + [[name, f"{us:.2f}"] for name, us in parts.items()]))
    if args.json_out:
        args.json_out.write_text(json.dumps({"us_per_token": parts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
