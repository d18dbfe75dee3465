"""The server's settings: one frozen `Settings`, read once from command-line flags and environment variables.

A flag wins over its environment variable, which wins over the default. Every value is checked here, so a
bad value stops the process before it listens, with one line that names the flag or variable, the value and
what is allowed (`SettingsError`; `python -m serving` prints it and exits 2).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from serving.api_keys import KeyFileError, read_keys_file
from serving.engine.block_manager import BLOCK_SIZES
from serving.engine.config import ATTENTION_CHOICES
from serving.options import (
    LOG_LEVELS,
    Option,
    auto_switch,
    choice,
    fraction,
    non_negative_float,
    option_parser,
    port,
    positive_float,
    positive_int,
    read_options,
    switch,
    whole_number,
)

DEFAULT_PORT = 8000
DEFAULT_HOST = "0.0.0.0"
DEFAULT_DRAIN_SECONDS = 30.0
# The largest body, unless MAX_BODY_BYTES says otherwise, follows the context window: room for a window's worth of
# prompt however it is written (token ids, JSON-escaped non-ASCII text), plus the request's other fields.
BODY_BYTES_PER_TOKEN = 32
BODY_OVERHEAD_BYTES = 64 * 1024
# Until the model is loaded the window is unknown (API requests are refused with 503 then anyway).
BODY_BYTES_BEFORE_LOAD = 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0
DEFAULT_BODY_TIMEOUT_SECONDS = 30.0


class SettingsError(ValueError):
    """A flag or environment variable has a value the server cannot run with."""


@dataclass(frozen=True)
class Settings:
    model_path: Path
    """Directory of a Hugging Face model (`config.json`, safetensors, tokenizer)."""
    model_name: str
    """The name clients send as `model`; defaults to the model directory's base name."""
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_keys_file: Path | None = None
    """Keys file (`serving.api_keys`: plain or NAME:KEY lines), re-read when it changes; None: no file."""
    api_key: str | None = field(default=None, repr=False)
    """One more accepted key (API_KEY, e.g. from a Secret). With neither a file nor this key the API is open."""
    max_num_seqs: int | None = None
    """Requests decoded together (engine slots); None keeps the engine's default."""
    max_model_len: int | None = None
    """Context window (prompt + output tokens); None takes the model's own."""
    max_queue: int | None = None
    """Requests allowed to wait for a slot before new ones get 429; None keeps the engine's default."""
    device: str | None = None
    """`auto`, `cuda` or `cpu`; None lets the engine choose (auto)."""
    dtype: str | None = None
    """`auto`, `bfloat16`, `float16` or `float32`; None lets the engine choose (auto)."""
    gpu_memory_utilization: float | None = None
    """Fraction of GPU memory the engine may use for weights and KV cache; None keeps the engine's default."""
    cuda_graphs: bool | None = None
    """Decode from CUDA graphs on a GPU; None keeps the engine's default (on)."""
    max_prefill_tokens: int | None = None
    """Chunked-prefill budget per engine step; None keeps the engine's default."""
    attention_backend: str | None = None
    """`auto`, `triton`, `flash` or `sdpa`: how attention reads the KV cache; None lets the engine choose (auto)."""
    block_size: int | None = None
    """Tokens per KV-cache block (a power of two up to 256); None keeps the engine's default (16)."""
    enable_prefix_caching: bool | None = None
    """Reuse the KV cache of prompts' shared full blocks across requests; None keeps the engine's default (on)."""
    overlap: bool | None = None
    """Overlap the engine's host work with the device (steps launched from tokens still on it); None: on CUDA only."""
    engine_process: bool = True
    """Run the engine in a child process, so HTTP streaming and the engine's Python do not share one GIL
    (`serving.engine.process`); off runs it on a thread of the server's process."""
    max_body_bytes: int | None = None
    """Largest request body; None derives it from the context window (`default_max_body_bytes`)."""
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    """Open connections beyond this are closed as they arrive."""
    header_timeout_seconds: float = DEFAULT_HEADER_TIMEOUT_SECONDS
    """A request's headers must arrive within this long (408 and close)."""
    body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT_SECONDS
    """A request's whole body must arrive within this long after its headers (408 and close)."""
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    """After SIGTERM, how long in-flight requests may run before they are aborted."""
    log_level: str = "info"

    @property
    def auth_enabled(self) -> bool:
        return self.api_keys_file is not None or bool(self.api_key)


def default_max_body_bytes(max_model_len: int) -> int:
    """The body limit for a context window of `max_model_len` tokens when MAX_BODY_BYTES is not set."""
    return BODY_OVERHEAD_BYTES + BODY_BYTES_PER_TOKEN * max_model_len


def _block_size(text: str) -> int:
    value = whole_number(text)
    if value not in BLOCK_SIZES:
        raise ValueError(f"must be one of {', '.join(map(str, BLOCK_SIZES))}")
    return value


_OPTIONS = tuple(Option(*option) for option in (
    ("model_path", "--model-path", "MODEL_PATH", str, "model directory (required)"),
    ("model_name", "--model-name", "MODEL_NAME", str, "served model name (default: the directory's base name)"),
    ("host", "--host", "HOST", str, f"bind address (default {DEFAULT_HOST})"),
    ("port", "--port", "PORT", port, f"listen port (default {DEFAULT_PORT})"),
    ("api_keys_file", "--api-keys-file", "API_KEYS_FILE", str,
     "file of API keys, one per line, plain or NAME:KEY (# comments); re-read when it changes"),
    ("max_num_seqs", "--max-num-seqs", "MAX_NUM_SEQS", positive_int, "requests decoded together"),
    ("max_model_len", "--max-model-len", "MAX_MODEL_LEN", positive_int, "context window in tokens"),
    ("max_queue", "--max-queue", "MAX_QUEUE", positive_int, "waiting requests before 429"),
    ("device", "--device", "DEVICE", choice("auto", "cuda", "cpu"),
     "auto, cuda or cpu (default auto: CUDA if visible)"),
    ("dtype", "--dtype", "DTYPE", choice("auto", "bfloat16", "float16", "float32"),
     "auto, bfloat16, float16 or float32 (default auto: bfloat16 on GPU, float32 on CPU)"),
    ("gpu_memory_utilization", "--gpu-memory-utilization", "GPU_MEMORY_UTILIZATION", fraction,
     "fraction of GPU memory for the engine"),
    ("cuda_graphs", "--cuda-graphs", "CUDA_GRAPHS", switch,
     "on or off: decode from CUDA graphs on a GPU (default on)"),
    ("max_prefill_tokens", "--max-prefill-tokens", "MAX_PREFILL_TOKENS", positive_int,
     "prompt tokens prefilled per engine step (default 2048)"),
    ("attention_backend", "--attention-backend", "ATTENTION_BACKEND", choice(*ATTENTION_CHOICES),
     "auto, triton, flash or sdpa: how attention reads the KV cache (default auto: the Triton decode kernel with flash "
     "prefill where they apply)"),
    ("block_size", "--block-size", "BLOCK_SIZE", _block_size,
     "tokens per KV-cache block: a power of two up to 256 (default 16)"),
    ("enable_prefix_caching", "--enable-prefix-caching", "ENABLE_PREFIX_CACHING", switch,
     "on or off: reuse the KV cache of prompts' shared full blocks across requests (default on)"),
    ("overlap", "--overlap", "OVERLAP", auto_switch,
     "auto, on or off: launch each engine step before the last one's tokens are read back (default auto: on CUDA)"),
    ("engine_process", "--engine-process", "ENGINE_PROCESS", switch,
     "on or off: run the engine in a process of its own, apart from HTTP streaming (default on)"),
    ("max_body_bytes", "--max-body-bytes", "MAX_BODY_BYTES", positive_int,
     f"largest request body (default {BODY_OVERHEAD_BYTES} + {BODY_BYTES_PER_TOKEN} per token of the context window)"),
    ("max_connections", "--max-connections", "MAX_CONNECTIONS", positive_int,
     f"open connections; more are closed as they arrive (default {DEFAULT_MAX_CONNECTIONS})"),
    ("header_timeout_seconds", "--header-timeout-seconds", "HEADER_TIMEOUT_SECONDS", positive_float,
     f"time for a request's headers to arrive, else 408 (default {DEFAULT_HEADER_TIMEOUT_SECONDS:g})"),
    ("body_timeout_seconds", "--body-timeout-seconds", "BODY_TIMEOUT_SECONDS", positive_float,
     f"time for a request's body to arrive after its headers, else 408 (default {DEFAULT_BODY_TIMEOUT_SECONDS:g})"),
    ("drain_seconds", "--drain-seconds", "DRAIN_SECONDS", non_negative_float,
     f"grace period after SIGTERM (default {DEFAULT_DRAIN_SECONDS:g})"),
    ("log_level", "--log-level", "LOG_LEVEL", choice(*LOG_LEVELS), "log level (default info)"),
))


def build_parser() -> argparse.ArgumentParser:
    return option_parser(
        "python -m serving",
        "OpenAI-compatible LLM server. Every flag can also be set by the environment variable shown.",
        "API_KEY (environment only, e.g. from a Kubernetes Secret) adds one key to those of API_KEYS_FILE; with no "
        "key configured the API is open.", _OPTIONS, SettingsError)


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from flags (`argv`, without the program name) and environment; raise SettingsError."""
    environ = os.environ if environ is None else environ
    flags = vars(build_parser().parse_args(list(argv) if argv is not None else None))
    values = read_options(flags, _OPTIONS, environ, SettingsError)

    if "model_path" not in values:
        raise SettingsError("no model: pass --model-path DIR or set MODEL_PATH")
    model_path = Path(str(values.pop("model_path"))).expanduser()
    if not model_path.is_dir():
        raise SettingsError(f"model path {str(model_path)!r} is not a directory; point --model-path/MODEL_PATH at a "
                            "Hugging Face model directory")
    model_name = str(values.pop("model_name", "") or "").strip() or model_path.resolve().name

    api_keys_file = Path(str(values.pop("api_keys_file"))) if "api_keys_file" in values else None
    if api_keys_file is not None:
        try:
            read_keys_file(api_keys_file)  # a bad file stops the process here; a bad replacement later is logged
        except KeyFileError as exc:
            raise SettingsError(str(exc)) from None
    api_key = environ.get("API_KEY", "").strip() or None
    return Settings(model_path=model_path, model_name=model_name, api_keys_file=api_keys_file, api_key=api_key,
                    **values)
