"""The engine's two attention implementations over the token-major KV cache, and how one is chosen.

The flash path's plumbing (cache viewed as rows, cumulative offsets, per-sequence lengths, grouped-query folding)
runs on CPU against `flash_reference`, a stand-in that computes what the kernel computes and refuses what it
refuses; the kernel itself runs in the GPU tests at the end.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from contextlib import contextmanager

import pytest
import torch

from serving.engine import EngineConfig, LLMEngine, ModelLoadError
from serving.engine import cuda_graphs as cuda_graphs_module
from serving.engine import engine as engine_module
from serving.engine.attention import (
    AttentionShape,
    ChunkSpan,
    FlashAttention,
    SdpaAttention,
    disagreement,
    select_attention,
)
from serving.engine.cuda_graphs import capture_decode_graphs
from tests.serving.flash_reference import flash_varlen_reference
from tests.serving.test_engine import (  # noqa: F401 - make_engine and hf_model are fixtures used here
    RecordedDecodeGraphs,
    greedy_tokens,
    hf_greedy,
    hf_model,
    load_hf,
    make_engine,
    random_prompt,
)

# A scale other than the kernel's default (head_dim ** -0.5 = 0.25), so a call that drops it is caught.
SHAPE = AttentionShape(num_heads=8, num_kv_heads=2, head_dim=16, scale=0.2, num_slots=6, max_model_len=64,
                       device=torch.device("cpu"))


def random_cache(shape: AttentionShape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    dims = (shape.num_slots, shape.max_model_len, shape.num_kv_heads, shape.head_dim)
    return torch.randn(dims, generator=generator), torch.randn(dims, generator=generator)


def both() -> tuple[FlashAttention, SdpaAttention]:
    return FlashAttention(SHAPE, flash_varlen_reference), SdpaAttention(SHAPE)


def test_flash_decode_matches_sdpa_for_rows_of_different_lengths():
    flash, sdpa = both()
    k_layer, v_layer = random_cache(SHAPE)
    query = torch.randn(5, SHAPE.num_heads, SHAPE.head_dim, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([1, 48, 17, 40, 2], dtype=torch.int32)  # under a KV bucket (48) shorter than a slot
    # What the runner gathers for a step: [B, kv_len, ...], contiguous.
    k_layer, v_layer = k_layer[:5, :48].contiguous(), v_layer[:5, :48].contiguous()
    got = flash.decode_gathered(query, k_layer, v_layer, flash.gathered_plan(lengths, 48))
    expected = sdpa.decode_gathered(query, k_layer, v_layer, sdpa.gathered_plan(lengths, 48))
    assert got.shape == (5, SHAPE.num_heads * SHAPE.head_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Each row is its own slot's sequence: a row computed alone gives the same result.
    alone = sdpa.decode_gathered(query[3:4].clone(), k_layer[3:].clone(), v_layer[3:].clone(),
                                 sdpa.gathered_plan(lengths[3:4], 48))
    torch.testing.assert_close(got[3:4], alone, atol=1e-5, rtol=1e-5)


def test_flash_decode_reads_only_each_rows_own_tokens():
    """K/V past each row's length, and in slots beyond the batch, are NaN: flash never reads them."""
    flash, sdpa = both()
    k_layer, v_layer = random_cache(SHAPE, seed=2)
    lengths = torch.tensor([3, 30, 64], dtype=torch.int32)
    query = torch.randn(3, SHAPE.num_heads, SHAPE.head_dim, generator=torch.Generator().manual_seed(3))
    expected = sdpa.decode_gathered(query, k_layer, v_layer, sdpa.gathered_plan(lengths, 64))
    for row, length in enumerate(lengths.tolist()):
        k_layer[row, length:] = float("nan")
        v_layer[row, length:] = float("nan")
    k_layer[3:] = float("nan")
    v_layer[3:] = float("nan")
    got = flash.decode_gathered(query, k_layer, v_layer, flash.gathered_plan(lengths, 64))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_flash_prefill_matches_sdpa_for_first_and_later_chunks_out_of_slot_order():
    flash, sdpa = both()
    k_layer, v_layer = random_cache(SHAPE, seed=4)
    # Slot 4's first 10 tokens; slot 1's tokens 20..29 after a cached prefix; slot 2's single token 50. The K/V
    # each chunk reads (up to its end) packed one after the other, as the runner gathers them through block tables.
    spans = [ChunkSpan(kv_start=0, first=0, last=10, start=0, end=10),
             ChunkSpan(kv_start=10, first=10, last=20, start=20, end=30),
             ChunkSpan(kv_start=40, first=20, last=21, start=50, end=51)]
    k_layer = torch.cat([k_layer[4, :10], k_layer[1, :30], k_layer[2, :51]])
    v_layer = torch.cat([v_layer[4, :10], v_layer[1, :30], v_layer[2, :51]])
    query = torch.randn(21, SHAPE.num_heads, SHAPE.head_dim, generator=torch.Generator().manual_seed(5))
    got = flash.prefill(query, k_layer, v_layer, flash.prefill_plan(spans))
    expected = sdpa.prefill(query, k_layer, v_layer, sdpa.prefill_plan(spans))
    assert got.shape == (21, SHAPE.num_heads * SHAPE.head_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def ignores_lengths(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *args, seqused_k=None, **kwargs):
    """A kernel that attends over whole slots: the bug that reading padding would be."""
    return flash_varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max(max_k, SHAPE.max_model_len),
                                  *args, seqused_k=None, **kwargs)


def test_the_load_check_catches_a_kernel_that_disagrees_and_auto_falls_back_to_sdpa(caplog):
    assert disagreement(lambda shape: FlashAttention(shape, flash_varlen_reference), SHAPE, torch.float32) is None
    reason = disagreement(lambda shape: FlashAttention(shape, ignores_lengths), SHAPE, torch.float32)
    assert reason is not None and reason.startswith("its decode differs from sdpa's by up to")
    with caplog.at_level(logging.INFO, logger="serving.engine"):
        chosen = select_attention("auto", SHAPE, torch.float32, flash_forward=ignores_lengths)
    assert chosen.name == "sdpa"
    assert "attention: sdpa (flash is not used: its decode differs" in caplog.text
    assert "WARNING" in caplog.text  # the kernel applies but disagrees: loudly
    with pytest.raises(ModelLoadError, match=r"attention \(ATTENTION_BACKEND\) is flash, but the flash kernel "
                                             "cannot be used: its decode differs .*; set it to auto or sdpa"):
        select_attention("flash", SHAPE, torch.float32, flash_forward=ignores_lengths)
    assert select_attention("auto", SHAPE, torch.float32, flash_forward=flash_varlen_reference).name == "flash"
    assert select_attention("sdpa", SHAPE, torch.float32, flash_forward=flash_varlen_reference).name == "sdpa"


def test_flash_is_refused_where_the_kernel_cannot_run(make_engine, caplog):
    with pytest.raises(ModelLoadError, match=r"flash kernel cannot be used: it needs a CUDA device \(the engine "
                                             r"runs on cpu\); set it to auto or sdpa"):
        make_engine(attention="flash")
    with caplog.at_level(logging.INFO, logger="serving.engine"):
        engine = make_engine()
    assert engine.runner.attention.name == "sdpa"
    assert "flash is not used: it needs a CUDA device" in caplog.text
    assert "WARNING" not in caplog.text  # where flash cannot apply, choosing sdpa is no news


@pytest.fixture
def flash_on_cpu(monkeypatch):
    """Engines built in this test select attention with the CPU stand-in as the flash kernel."""
    monkeypatch.setattr(engine_module, "select_attention",
                        functools.partial(select_attention, flash_forward=flash_varlen_reference))


class RefusingDecodeGraphs(RecordedDecodeGraphs):
    """Recorded (CPU) decode graphs whose capture fails for the attention implementations named in `refuse`, as
    capture does for a kernel that synchronises with the host."""

    refuse: tuple[str, ...] = ()

    @classmethod
    def for_runner(cls, runner):
        graphs = super().for_runner(runner)
        graphs.attention_name = runner.attention.name
        return graphs

    @contextmanager
    def _recorder(self):
        if self.attention_name in self.refuse:
            raise RuntimeError(f"operation not permitted when stream is capturing ({self.attention_name})")
        with super()._recorder() as record:
            yield record


def test_engine_with_flash_attention_matches_hf_greedy_through_joins_chunks_and_graph_buckets(
        make_engine, flash_on_cpu, tmp_path):
    from tests.serving.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", max_position_embeddings=1024)
    engine = make_engine(model_dir, max_num_seqs=4, max_prefill_tokens_per_step=48)
    runner = engine.runner
    assert runner.attention.name == "flash"
    graphs = RecordedDecodeGraphs.for_runner(runner)
    graphs.capture()
    runner.use_graphs(graphs)
    cases = [(random_prompt(length, seed=90 + length), max_tokens)
             for length, max_tokens in [(3, 40), (300, 30), (17, 30), (1, 9), (64, 50), (9, 5), (250, 20)]]

    results = asyncio.run(greedy_tokens(engine, cases))
    hf = load_hf(model_dir)
    for (prompt, max_tokens), tokens in zip(cases, results):
        assert tokens == hf_greedy(hf, prompt, max_tokens)
    # Every decode step of the longest request (its first token is from prefill), over several graph shapes.
    assert len(graphs.replayed) >= 49 and len(set(graphs.replayed)) >= 3


def test_graph_capture_that_fails_with_flash_is_done_with_sdpa_under_auto(make_engine, flash_on_cpu, monkeypatch,
                                                                          caplog, hf_model):
    monkeypatch.setattr(cuda_graphs_module, "DecodeGraphs", type("FlashRefused", (RefusingDecodeGraphs,),
                                                            {"refuse": ("flash",)}))
    engine = make_engine()
    assert engine.runner.attention.name == "flash"
    with caplog.at_level(logging.WARNING, logger="serving.engine"):
        assert capture_decode_graphs(engine.runner, "auto") is True
    assert engine.runner.attention.name == "sdpa" and engine.runner.graphs is not None
    assert "CUDA graph capture with flash attention failed (RuntimeError: operation not permitted" in caplog.text
    assert "capturing with sdpa attention" in caplog.text
    prompt = random_prompt(12, seed=6)
    assert asyncio.run(greedy_tokens(engine, [(prompt, 10)])) == [hf_greedy(hf_model, prompt, 10)]
    # An explicit flash keeps flash and decodes eagerly instead.
    explicit = make_engine(attention="flash")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="serving.engine"):
        assert capture_decode_graphs(explicit.runner, "flash") is False
    assert explicit.runner.attention.name == "flash" and explicit.runner.graphs is None
    assert "CUDA graph capture failed, decoding eagerly with flash attention" in caplog.text


def test_when_sdpa_capture_fails_too_the_engine_keeps_flash_and_decodes_eagerly(make_engine, flash_on_cpu,
                                                                               monkeypatch, caplog):
    monkeypatch.setattr(cuda_graphs_module, "DecodeGraphs", type("BothRefused", (RefusingDecodeGraphs,),
                                                            {"refuse": ("flash", "sdpa")}))
    engine = make_engine()
    with caplog.at_level(logging.WARNING, logger="serving.engine"):
        assert capture_decode_graphs(engine.runner, "auto") is False
    assert engine.runner.attention.name == "flash" and engine.runner.graphs is None
    assert "capturing with sdpa attention" in caplog.text
    assert "decoding eagerly with flash attention" in caplog.text


def test_engine_config_rejects_an_unknown_attention():
    with pytest.raises(ValueError, match="attention: 'xformers' is not one of 'auto', 'triton', 'flash', 'sdpa'"):
        EngineConfig(attention="xformers")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_flash_kernel_agrees_with_sdpa_and_the_cpu_stand_in_on_the_gpu():
    """The real kernel against SDPA on the GPU (bf16), and against the stand-in the CPU tests trust."""
    shape = AttentionShape(num_heads=32, num_kv_heads=8, head_dim=64, scale=0.125, num_slots=8,
                           max_model_len=1024, device=torch.device("cuda"))
    flash = FlashAttention(shape)
    assert disagreement(FlashAttention, shape, torch.bfloat16) is None
    k_layer, v_layer = (tensor.to("cuda", torch.bfloat16) for tensor in random_cache(shape, seed=7))
    query = torch.randn(8, 32, 64, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([1, 1024, 300, 77, 513, 2, 640, 999], dtype=torch.int32, device="cuda")
    got = flash.decode_gathered(query, k_layer, v_layer, flash.gathered_plan(lengths, 1024))
    stand_in = FlashAttention(dataclasses.replace(shape, device=torch.device("cpu")), flash_varlen_reference)
    expected = stand_in.decode_gathered(query.cpu(), k_layer.cpu(), v_layer.cpu(),
                                        stand_in.gathered_plan(lengths.cpu(), 1024))
    torch.testing.assert_close(got.cpu().float(), expected.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_engine_on_the_gpu_uses_flash_and_graphs_replay_its_eager_tokens(tmp_path):
    from tests.serving.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", max_position_embeddings=1024)
    cases = [(random_prompt(length, seed=70 + length), max_tokens)
             for length, max_tokens in [(3, 90), (9, 7), (17, 60), (40, 12), (300, 260), (1, 33), (64, 120)]]

    def run(cuda_graphs: bool):
        engine = LLMEngine.from_model_dir(model_dir, EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=4,
                                                                  cuda_graphs=cuda_graphs, attention="flash"))
        assert engine.runner.attention.name == "flash"
        assert (engine.runner.graphs is not None) == cuda_graphs, "graph capture failed (see the warning log)"
        return asyncio.run(greedy_tokens(engine, cases, shutdown=True))

    assert run(True) == run(False)
