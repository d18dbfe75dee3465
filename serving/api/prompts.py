"""Prompts from requests: token ids for the engine, prepared off the event loop.

Tokenizing a 1 MiB prompt takes about a second, and a chat template is Jinja: on the event loop, a few such requests
(even ones refused afterwards) stall every stream and the health probes. So all of it runs on the state's tokenizer
threads (the Rust tokenizer releases the GIL while it works), in this order:

- a chat request's message content must not contain the model's control tokens (`<|im_start|>` and the like): the
  template would pass them through as text, the tokenizer would read them as real control tokens, and an end user
  could forge a turn of another role (a system prompt, say). Such a request is refused with 400 (as tiktoken
  refuses special tokens in text by default), rather than tokenized in pieces, which would change the tokens at the
  pieces' edges for every chat request;
- a prompt (or rendered chat) with more characters than the context window's tokens can hold is refused by its
  length alone, before it is tokenized (`max_chars`);
- then the text is tokenized.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from functools import cached_property
from typing import Any, Callable, TypeVar

from serving.errors import bad_request

T = TypeVar("T")

# A normalizer may make text shorter before it is split (NFC joins a letter and its accent into one character):
# with one, the character bound allows for that rather than refuse a prompt that would fit.
_NORMALIZER_SLACK = 4


class Prompts:
    """Turns one engine's requests into prompt token ids; made once per engine, used from any thread."""

    def __init__(self, tokenizer: Any, window: int, pool: Executor) -> None:
        self.tokenizer = tokenizer
        self.window = window
        self._pool = pool

    async def completion(self, prompt: str) -> list[int]:
        return await self._off_loop(self._completion_ids, prompt)

    async def chat(self, messages: list[dict]) -> list[int]:
        return await self._off_loop(self._chat_ids, messages)

    @cached_property
    def max_chars(self) -> int:
        """The most characters `window` tokens can hold: no prompt longer than this fits, whatever its tokens."""
        return self.window * _chars_per_token_bound(self.tokenizer)

    async def _off_loop(self, work: Callable[[Any], T], argument: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, work, argument)

    def _completion_ids(self, prompt: str) -> list[int]:
        self._check_length(len(prompt), "prompt", "prompt")
        return self.tokenizer.encode(prompt)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise bad_request("This model has no chat template; use /v1/completions with a formatted prompt",
                              param="messages")
        self._refuse_control_tokens(messages)
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja's TemplateError / raise_exception(): the template rejects these messages
            raise bad_request(f"The messages do not fit this model's chat template: {exc}", param="messages") from exc
        self._check_length(len(text), "messages", "messages (in the chat template)")
        # The template already holds any BOS token it wants; adding special tokens again would double it.
        return tokenizer.encode(text, add_special_tokens=False)

    def _check_length(self, chars: int, param: str, what: str) -> None:
        if chars > self.max_chars:
            raise bad_request(
                f"This model's maximum context length is {self.window} tokens. However, your {what} has {chars} "
                f"characters, more than {self.window} tokens of this model can hold ({self.max_chars}). Please reduce "
                f"the length of the {param}.", param=param, code="context_length_exceeded")

    @cached_property
    def _control_tokens(self) -> dict[int, str]:
        """The tokenizer's special added tokens (id -> text): those a chat format is made of."""
        added = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        return {token_id: token.content for token_id, token in added.items() if getattr(token, "special", False)}

    @cached_property
    def _control_token_starts(self) -> frozenset[str]:
        return frozenset(text[0] for text in self._control_tokens.values() if text)

    def _refuse_control_tokens(self, messages: list[dict]) -> None:
        controls, starts = self._control_tokens, self._control_token_starts
        for index, message in enumerate(messages):
            for field in ("content", "name"):
                text = message.get(field)
                # Most text holds none of the characters a control token starts with: it is not tokenized twice.
                if not text or not any(start in text for start in starts):
                    continue
                found = next((controls[token] for token in self._ids_with_added_tokens(text) if token in controls),
                             None)
                if found is not None:
                    raise bad_request(
                        f"messages[{index}].{field} contains {found!r}, a control token of this model's chat format; "
                        "message text cannot hold one (it would start a turn of another role). Remove or change it",
                        param="messages", code="control_token_in_content")

    def _ids_with_added_tokens(self, text: str) -> list[int]:
        """`text`'s token ids as the whole prompt would tokenize it, added (control) tokens matched."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.encode_batch([text], add_special_tokens=False)[0].ids  # releases the GIL while it works
        return self.tokenizer.encode(text, add_special_tokens=False)


def _chars_per_token_bound(tokenizer: Any) -> int:
    """At least as many characters as any one token stands for. A vocabulary entry is written with at least one
    character per character (byte-level BPE: one per byte; SentencePiece: `▁` for a space, `<0x41>` for a byte), and
    added tokens are in the vocabulary too."""
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    exact = backend is not None and backend.normalizer is None
    return longest if exact else longest * _NORMALIZER_SLACK
