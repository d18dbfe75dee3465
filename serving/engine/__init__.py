"""The inference engine: continuous batching over a Hugging Face model behind one narrow interface.

`LLMEngine` is imported lazily so that code needing only the interface types (the HTTP layer and its
tests with a fake engine) does not import torch and transformers.
"""
from typing import TYPE_CHECKING

from serving.engine.config import EngineConfig
from serving.engine.interface import (
    Engine,
    EngineDeadError,
    EngineError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    ModelLoadError,
    QueueFullError,
    SamplingParams,
    TokenOutput,
)

if TYPE_CHECKING:
    from serving.engine.engine import LLMEngine

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "EngineStats",
    "FinishReason",
    "GenerationRequest",
    "LLMEngine",
    "ModelInfo",
    "ModelLoadError",
    "QueueFullError",
    "SamplingParams",
    "TokenOutput",
]


def __getattr__(name: str) -> "type[LLMEngine]":
    if name == "LLMEngine":
        from serving.engine.engine import LLMEngine

        return LLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
