"""The messages on the pipe between the HTTP process and the engine process (`serving.engine.process`).

One named tuple per kind, pickled as they are: each side matches on the type, and a field has a name where a bare
tuple had a position. The outputs inside `Outputs` stay plain tuples, since the engine sends one per running request
per step (pickling 256 `TokenOutput` named tuples takes 13x as long as 256 plain tuples: 204 against 15 us on the
development VM, on the engine's critical path); a message itself is one per step.
"""
from __future__ import annotations

from typing import NamedTuple

from serving.engine.interface import EngineStats, FinishReason, GenerationRequest, ModelInfo

# ---- HTTP process -> engine process ------------------------------------------------------------------------------


class Start(NamedTuple):
    """Run the engine's warm-up; the engine answers `Started` or `StartFailed`."""


class Add(NamedTuple):
    """Submit a request; the engine answers with its `Outputs`, or `Rejected`."""

    request: GenerationRequest


class Abort(NamedTuple):
    request_id: str


class Shutdown(NamedTuple):
    """Abort everything, stop the engine and exit; the engine answers `Stopped`."""


# ---- engine process -> HTTP process ------------------------------------------------------------------------------


class Loaded(NamedTuple):
    """The model is loaded: the first message, or `LoadFailed`."""

    model_info: ModelInfo
    tokenizer: object
    stats: EngineStats


class LoadFailed(NamedTuple):
    kind: str
    """The exception's class name: `ModelLoadError` is re-raised as one in the HTTP process."""
    message: str


class Started(NamedTuple):
    stats: EngineStats


class StartFailed(NamedTuple):
    message: str


Output = tuple[str, tuple[int, ...] | None, FinishReason | BaseException | None]
"""(request_id, token_ids, finish_reason) for a `TokenOutput`, or (request_id, None, error) for an EngineError."""


class Outputs(NamedTuple):
    """One engine step's outputs for this pipe, with a stats snapshot taken as they were sent."""

    outputs: list[Output]
    stats: EngineStats


class Rejected(NamedTuple):
    """`Add` failed in the engine (a race the HTTP process's own checks could not see)."""

    request_id: str
    error: BaseException


class Stopped(NamedTuple):
    stats: EngineStats
