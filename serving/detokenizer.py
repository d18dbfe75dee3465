"""Incremental detokenization with stop strings: token ids in, safe-to-send text deltas out.

Decoding one token at a time is wrong for byte-level BPE and SentencePiece: a character can span tokens
(a UTF-8 sequence split across byte tokens decodes to U+FFFD halves) and a token's leading space depends on
what came before. So, as in TGI and vLLM, we decode a short window twice, with and without the new tokens,
and send the difference only once it no longer ends in an incomplete character. The window starts inside
the prompt so the first generated token decodes as it would mid-text.

For a tokenizer whose decoding is the Rust `tokenizers` library's own, the window is kept and decoded in Rust
(`tokenizers.decoders.DecodeStream`, the same method): 1.8 us per streamed token instead of 4.3 on the development
VM. Whenever that stream holds tokens back, the window decode in Python makes the decision it would make alone,
so both send the same text (a test compares them on random tokens); it also serves every other tokenizer, and
takes a request over for good once it has sent a character that never completed, or the stream refused a step.

Stop strings are matched on the decoded text. Text that could still turn into a stop string is held back,
so a client never receives a stop string's first half; when one matches, the text is cut before it. Only a rolling
tail (shorter than the longest stop string) is ever held, and it is compared with the stop strings directly: memory
and time per token grow with the stop strings' length, never with its square.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

_PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character is at most 4 bytes, so at most 4 byte tokens. Held longer, the replacement
# character is a genuinely invalid sequence from the model, and holding it back would stall the stream.
_MAX_HELD_TOKENS = 6
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """One per request. `add()` each engine output, then `finish()` once the engine is done (or we stop)."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        """`tokenizer` is a transformers tokenizer (untyped, as in `serving.api.prompts`): any with `decode`."""
        self._decode = _decoder(tokenizer)
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # Everything before read_offset has been decoded into text; the window decoded with the new tokens
        # starts at prefix_offset. Kept by both ways of decoding, so either can take over from the other.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._backend = _rust_backend(tokenizer)
        self._stream: DecodeStream | None = None
        if self._backend is not None and not self._decode(self._ids).endswith(_REPLACEMENT):
            # (A prompt ending inside a character would leave the Rust stream unprimed: its first text would repeat
            # the prompt's.)
            self._stream = DecodeStream(ids=self._ids, skip_special_tokens=True)
        self._stop = tuple(stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._stop_starts = frozenset(s[0] for s in self._stop)
        # Decoded text not sent yet: what could still become a stop string. A stop string can only start there
        # (any end of the sent text that a stop string starts with was held back), so nothing sent is kept.
        self._held = ""
        self.stopped = False
        """A stop string matched: the text ends before it and the request should end with `stop`."""

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new token ids; return the text that is now safe to send (maybe empty)."""
        if self.stopped or not token_ids:
            return ""
        self._ids.extend(token_ids)
        stream, backend = self._stream, self._backend  # a stream only ever exists with its backend
        delta = (self._step(stream, backend, token_ids) if stream is not None and backend is not None
                 else self._decode_new(final=False))
        if not self._stop:  # nothing to hold back or cut
            return delta
        self._append(delta)
        return self._take(final=False)

    def finish(self) -> str:
        """The engine is done: return everything still held back (an incomplete character stays as U+FFFD)."""
        if not self.stopped:
            self._append(self._decode_new(final=True))
        return self._take(final=True)

    def _step(self, stream: DecodeStream, backend: Tokenizer, token_ids: Sequence[int]) -> str:
        """The new text from the Rust stream. It holds tokens while the text ends in an incomplete character or they
        add no text; the window decode then decides as it would alone: hold them, skip them, or (a character that
        never completes) send them as U+FFFD, after which it decodes the rest of this request itself."""
        try:
            text = stream.step(backend, list(token_ids))
        except Exception:  # noqa: BLE001 - "Invalid prefix encountered" (a decoder whose output is not monotonic)
            self._stream = None
            return self._decode_new(final=False)
        if text is None:
            text = self._decode_new(final=False)
            if text:  # sent here: the Rust stream still holds these tokens and would send them again
                self._stream = None
            return text
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text

    def _decode_new(self, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        held_tokens = len(self._ids) - self._read_offset
        if full_text.endswith(_REPLACEMENT) and not final and held_tokens < _MAX_HELD_TOKENS:
            return ""
        if len(full_text) <= len(prefix_text) and not final:
            # Tokens that decode to nothing (skipped special tokens): nothing to send. The window keeps its start:
            # a decoder that strips the first token's leading space (SentencePiece's Metaspace, Llama 2's Strip)
            # would otherwise drop the space of the next word.
            self._read_offset = len(self._ids)
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text):]

    def _append(self, delta: str) -> None:
        if not delta:
            return
        search_from = max(0, len(self._held) - self._max_stop_len + 1)
        self._held += delta
        hits = [i for i in (self._held.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self._held = self._held[:min(hits)]
            self.stopped = True

    def _take(self, final: bool) -> str:
        held = self._held
        end = len(held) if final or self.stopped else len(held) - self._partial_stop_len()
        self._held = held[end:]
        return held[:end]

    def _partial_stop_len(self) -> int:
        """Length of the longest end of the held text that a stop string starts with (it may complete later)."""
        held, starts = self._held, self._stop_starts
        for start in range(max(0, len(held) - self._max_stop_len + 1), len(held)):  # longest end first
            if held[start] in starts and any(stop.startswith(held[start:]) for stop in self._stop):
                return len(held) - start
        return 0


def _decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """`ids -> text` without special tokens or clean-up of spaces.

    For a `tokenizers`-backed tokenizer that does not change decoding, that is exactly the Rust tokenizer's own
    decode, called directly: transformers' `decode` wraps it in argument handling that costs three times the decode
    itself, twice per streamed output (see docs/BENCHMARKS.md, HTTP layer). Any other tokenizer goes through
    `decode`."""
    backend = _rust_backend(tokenizer)
    if backend is not None:
        return partial(backend.decode, skip_special_tokens=True)
    return partial(tokenizer.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _rust_backend(tokenizer: object) -> Tokenizer | None:
    """The `tokenizers.Tokenizer` whose decode is exactly `tokenizer`'s (without clean-up), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(type(tokenizer), "_decode", None) is _TOKENIZERS_BACKEND_DECODE:
        return backend
    return None


_TOKENIZERS_BACKEND_DECODE: object
try:
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    _TOKENIZERS_BACKEND_DECODE = TokenizersBackend._decode
except ImportError:  # another transformers layout: always the public decode
    _TOKENIZERS_BACKEND_DECODE = object()
