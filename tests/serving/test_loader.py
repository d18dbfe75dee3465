"""Model-directory validation and loading: every operator mistake gets its one clear message."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from serving.engine import ModelLoadError
from serving.engine.loader import load_model, resolve_device, resolve_dtype, validate_model_dir


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A private copy of the tiny model that a test may damage."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_valid_directory_loads_offline_on_cpu(tiny_model_dir):
    assert validate_model_dir(tiny_model_dir)["model_type"] == "llama"
    loaded = load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.eos_token_ids == (4,)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("Hello world")) == "Hello world"


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model directory .*nowhere does not exist; set the model path"):
        validate_model_dir(tmp_path / "nowhere")


def test_path_is_a_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is not a directory; point it at the directory that holds config.json"):
        validate_model_dir(path)


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="has no config.json; it is not a Hugging Face model directory"):
        validate_model_dir(model_copy)


def test_config_is_not_json(model_copy):
    (model_copy / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelLoadError, match=r"config.json is not valid JSON \(.*\); re-download it"):
        validate_model_dir(model_copy)


def test_unsupported_model_type_lists_supported_ones(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not supported by this engine; supported model "
                                             "types are: llama, mistral, qwen2, qwen3"):
        validate_model_dir(model_copy)


def test_pickle_weights_are_refused(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as error:
        validate_model_dir(model_copy)
    message = str(error.value)
    assert "has no *.safetensors weights (found pytorch_model.bin)" in message
    assert ".bin/pickle weights are not loaded because unpickling can run arbitrary code" in message
    assert "Convert them with safetensors" in message


def test_missing_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    (model_copy / "tokenizer_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"has no tokenizer \(neither tokenizer.json nor tokenizer_config.json\)"):
        validate_model_dir(model_copy)


def test_truncated_safetensors(model_copy):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"weight file .*model.safetensors is corrupt or truncated \(.*\); "
                                             r"re-download it"):
        validate_model_dir(model_copy)


def test_garbage_safetensors(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelLoadError, match="is corrupt or truncated"):
        validate_model_dir(model_copy)


def test_sharded_index_naming_a_missing_shard(model_copy):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model.safetensors",
                                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="names weight shards that are missing: "
                                             "model-00002-of-00002.safetensors; the download is incomplete"):
        validate_model_dir(model_copy)


def test_weights_missing_a_tensor_are_not_randomly_filled(model_copy):
    weights = load_file(model_copy / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lack 1 tensors the architecture needs "
                                             r"\(first: model.layers.1.mlp.up_proj.weight\)"):
        load_model(model_copy, torch.device("cpu"), torch.float32)


def test_auto_device_without_cuda_warns_once_and_uses_cpu_float32(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="serving.engine"):
        device = resolve_device("auto")
    assert device == torch.device("cpu")
    assert resolve_dtype("auto", device) == torch.float32
    warnings = [r for r in caplog.records if r.name == "serving.engine" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "falling back to CPU with float32; generation will be slow" in warnings[0].getMessage()


def test_explicit_cuda_without_gpu_fails_clearly(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="device 'cuda' was requested but no CUDA GPU is visible"):
        resolve_device("cuda")


def test_explicit_cpu_never_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="serving.engine"):
        assert resolve_device("cpu") == torch.device("cpu")
    assert not caplog.records
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
