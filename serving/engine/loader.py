"""Validate a Hugging Face model directory and load its model and tokenizer, offline and safely.

Every problem an operator can cause (wrong path, missing or pickle-only weights, a truncated download,
an architecture the runner does not implement) raises `ModelLoadError` with one message that says what
is wrong and what to do, before any weight is read. Nothing here touches the network or runs code
shipped with the model (`trust_remote_code` stays off).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch

from serving.engine.interface import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger("serving.engine")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Architectures whose HF modules `ModelRunner` drives (Llama-style decoder layers, optional q/k norms)."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    eos_token_ids: tuple[int, ...]
    """EOS ids from generation_config.json, config.json and the tokenizer, merged: chat models often
    end turns with a token that only one of them names."""


def resolve_device(requested: str) -> torch.device:
    """Turn the configured device into a torch device; warn once when `auto` falls back to CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if requested == "cuda":
        raise ModelLoadError(
            "device 'cuda' was requested but no CUDA GPU is visible to PyTorch "
            "(torch.cuda.is_available() is False); check the GPU request and NVIDIA runtime, or set device 'cpu'"
        )
    logger.warning(
        "No CUDA GPU is visible: falling back to CPU with float32; generation will be slow "
        "(fine for development and tests, not for serving)"
    )
    return torch.device("cpu")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[requested]


def validate_model_dir(path: str | os.PathLike) -> dict:
    """Check that `path` is a loadable model directory and return its parsed config.json."""
    directory = Path(path)
    if not directory.exists():
        raise ModelLoadError(f"model directory {directory} does not exist; set the model path to a Hugging Face "
                             "model directory (config.json, *.safetensors, tokenizer files)")
    if not directory.is_dir():
        raise ModelLoadError(f"model path {directory} is not a directory; point it at the directory that holds "
                             "config.json, the *.safetensors weights and the tokenizer files")
    config = _read_config(directory)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{directory / 'config.json'}: model_type {model_type!r} is not supported by this engine; "
            f"supported model types are: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _check_weights(directory)
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"model directory {directory} has no tokenizer (neither tokenizer.json nor tokenizer_config.json); "
            "copy the tokenizer files from the model's repository into it"
        )
    return config


def load_model(path: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Validate, then load weights and tokenizer from local files only and move the model to `device`."""
    validate_model_dir(path)
    # Belt and braces next to local_files_only: no hub call may run even from a code path that ignores it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # progress bars would garble the server's line-based logs

    directory = str(Path(path))
    try:
        # Straight onto the target device (accelerate's device_map): staging an 8B bf16 model in host RAM
        # first would need 16 GB there and get the pod OOM-killed under a 16Gi memory limit.
        loaded = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, local_files_only=True, output_loading_info=True,
            device_map={"": str(device)},
        )
        # With output_loading_info, (model, loading info); transformers' annotation knows only the model.
        model, info = cast("tuple[PreTrainedModel, dict[str, list[str]]]", loaded)
    except Exception as exc:  # transformers raises many types; the operator needs one message
        raise ModelLoadError(f"loading the weights in {directory} failed: {exc}") from exc
    # transformers initialises missing tensors randomly with only a warning; serving that would be silent garbage.
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ModelLoadError(
            f"the weights in {directory} lack {len(missing)} tensors the architecture needs "
            f"(first: {', '.join(missing[:3])}); the download is incomplete or belongs to another model"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"loading the tokenizer in {directory} failed: {exc}") from exc
    model = model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, eos_token_ids=_eos_token_ids(model, tokenizer))


def _read_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"model directory {directory} has no config.json; it is not a Hugging Face model "
                             "directory (download the full model repository, not only the weights)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON ({exc}); re-download it") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} must hold a JSON object, found {type(config).__name__}; re-download it")
    return config


def _check_weights(directory: Path) -> None:
    from safetensors import safe_open

    weight_files = sorted(directory.glob("*.safetensors"))
    if not weight_files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_WEIGHT_SUFFIXES)
        found = f" (found {', '.join(pickles)})" if pickles else ""
        raise ModelLoadError(
            f"model directory {directory} has no *.safetensors weights{found}; .bin/pickle weights are not "
            "loaded because unpickling can run arbitrary code. Convert them with safetensors "
            "(load the model and call save_pretrained(dir, safe_serialization=True)) or download the "
            "safetensors variant"
        )
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            shards = set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{index_path} is not a valid safetensors index ({exc}); re-download it") from exc
        missing = sorted(name for name in shards if not (directory / name).is_file())
        if missing:
            raise ModelLoadError(f"{index_path} names weight shards that are missing: {', '.join(missing)}; "
                                 "the download is incomplete, re-download them")
    for weight_file in weight_files:
        # safe_open reads only the header and checks that the data it describes covers the file exactly,
        # which catches truncated or interrupted downloads without reading the tensors.
        try:
            with safe_open(str(weight_file), framework="pt"):
                pass
        except Exception as exc:
            raise ModelLoadError(
                f"weight file {weight_file} is corrupt or truncated ({exc}); re-download it"
            ) from exc


def _eos_token_ids(model: torch.nn.Module, tokenizer: object) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)
