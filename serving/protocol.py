"""Pydantic models of the OpenAI-compatible API: what clients send and what the server answers.

Requests validate strictly (a string where a number belongs is a 400 naming the field, not a silent
coercion). Fields that OpenAI defines but this server does not implement are declared, so that setting one
is a 400 naming it rather than a silently different answer; fields nobody defines are ignored, as OpenAI's
own clients expect. Extensions beyond OpenAI (vLLM's names): `ignore_eos`, `min_tokens`.
"""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
# Stop strings are matched on every streamed delta: bound them (OpenAI and vLLM allow 4 strings).
MAX_STOP_STRINGS = 4
MAX_STOP_STRING_CHARS = 256


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


# OpenAI parameters this server does not implement, with the values that mean "not used": anything else is a 400.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
}


class BaseGenerationRequest(_Request):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: list[str] = Field(default_factory=list)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions (vLLM's names): force output lengths for benchmarks, suppress early end-of-sequence.
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)

    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(value)} stop strings were sent; at most {MAX_STOP_STRINGS} are allowed")
        for index, item in enumerate(value):
            if len(item) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop string {index} is {len(item)} characters long; at most {MAX_STOP_STRING_CHARS} "
                                 "are allowed")
        return value

    def unsupported_parameter(self) -> tuple[str, str] | None:
        """(parameter, message) for the first parameter set here that this server does not implement."""
        used = [name for name in _NEUTRAL
                if name in type(self).model_fields and getattr(self, name) not in _NEUTRAL[name]]
        if used:
            them = "it" if len(used) == 1 else "them"
            return used[0], (f"Unsupported parameter(s): {', '.join(used)}; this server does not implement {them}, "
                             f"remove {them} from the request")
        if self.n not in (None, 1):
            return "n", f"n={self.n} is not supported; this server returns exactly one choice per request (n=1)"
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(BaseGenerationRequest):
    prompt: str | list[int]
    """A string or a list of token ids; a one-element list of either is unwrapped (OpenAI's batch form)."""
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError(f"a list of {len(value)} prompts is not supported; send one prompt per request")
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and set(map(type, value)) <= {int}:  # JSON's integers (not booleans), at C speed
            return value
        raise ValueError("prompt must be a string, a list of token ids, or a one-element list of either")


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                if isinstance(part, dict) and part.get("type") != "text":
                    raise ValueError(f"content part type {part.get('type')!r} is not supported; only 'text' parts")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(BaseGenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None

    def requested_max_tokens(self) -> int | None:
        # OpenAI deprecated max_tokens for chat in favour of max_completion_tokens; accept either.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses -------------------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llm-platform"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
