"""Incremental detokenization with stop strings: token ids in, safe-to-send text deltas out.

Decoding one token at a time is wrong for byte-level BPE and SentencePiece: a character can span tokens
(a UTF-8 sequence split across byte tokens decodes to U+FFFD halves) and a token's leading space depends on
what came before. So, as in TGI and vLLM, we decode a short window twice, with and without the new tokens,
and send the difference only once it no longer ends in an incomplete character. The window starts inside
the prompt so the first generated token decodes as it would mid-text.

Stop strings are matched on the decoded text. Text that could still turn into a stop string is held back,
so a client never receives a stop string's first half; when one matches, the text is cut before it.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

_PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character is at most 4 bytes, so at most 4 byte tokens. Held longer, the replacement
# character is a genuinely invalid sequence from the model, and holding it back would stall the stream.
_MAX_HELD_TOKENS = 6
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """One per request. `add()` each engine output, then `finish()` once the engine is done (or we stop)."""

    def __init__(self, tokenizer: object, prompt_token_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._decode = _decoder(tokenizer)
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._text = ""
        self._sent = 0
        self.stopped = False
        """A stop string matched: the text ends before it and the request should end with `stop`."""

    @property
    def text(self) -> str:
        """All generated text so far (cut at a stop string), including text not yet sent."""
        return self._text

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new token ids; return the text that is now safe to send (maybe empty)."""
        if self.stopped or not token_ids:
            return ""
        self._ids.extend(token_ids)
        self._append(self._decode_new(final=False))
        return self._take(final=False)

    def finish(self) -> str:
        """The engine is done: return everything still held back (an incomplete character stays as U+FFFD)."""
        if not self.stopped:
            self._append(self._decode_new(final=True))
        return self._take(final=True)

    def _decode_new(self, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        held_tokens = len(self._ids) - self._read_offset
        if full_text.endswith(_REPLACEMENT) and not final and held_tokens < _MAX_HELD_TOKENS:
            return ""
        if len(full_text) <= len(prefix_text) and not final:
            # Tokens that decode to nothing (skipped special tokens): nothing to send, keep the window short.
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text):]

    def _append(self, delta: str) -> None:
        if not delta:
            return
        search_from = max(0, len(self._text) - self._max_stop_len + 1)
        self._text += delta
        hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self._text = self._text[:min(hits)]
            self.stopped = True

    def _take(self, final: bool) -> str:
        end = len(self._text) if final or self.stopped else len(self._text) - self._partial_stop_len()
        if end <= self._sent:
            return ""
        delta, self._sent = self._text[self._sent:end], end
        return delta

    def _partial_stop_len(self) -> int:
        """Length of the longest end of the text that a stop string starts with (it may complete later)."""
        for length in range(min(self._max_stop_len - 1, len(self._text)), 0, -1):
            tail = self._text[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0


def _decoder(tokenizer: object) -> Callable[[list[int]], str]:
    """`ids -> text` without special tokens or clean-up of spaces.

    For a `tokenizers`-backed tokenizer that does not change decoding, that is exactly the Rust tokenizer's own
    decode, called directly: transformers' `decode` wraps it in argument handling that costs three times the decode
    itself, twice per streamed output (see docs/BENCHMARKS.md, HTTP layer). Any other tokenizer goes through
    `decode`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(type(tokenizer), "_decode", None) is _TOKENIZERS_BACKEND_DECODE:
        return partial(backend.decode, skip_special_tokens=True)
    return partial(tokenizer.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)


try:
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    _TOKENIZERS_BACKEND_DECODE = TokenizersBackend._decode
except ImportError:  # another transformers layout: always the public decode
    _TOKENIZERS_BACKEND_DECODE = object()
