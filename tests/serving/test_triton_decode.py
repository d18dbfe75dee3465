"""The Triton decode kernel that reads the paged KV cache in place (`serving.engine.paged_decode`), and the engine
with it.

On CPU the kernel runs in Triton's interpreter (`TRITON_INTERPRET=1`), which executes the same kernel source with
NumPy: indexing through the block tables, the masks, the online softmax and the split merge are all checked here in
float32. Compilation for the GPU, bfloat16 and speed are the GPU tests' (at the end) and `gpu_session.sh`'s.
"""
from __future__ import annotations

import asyncio
import logging
import math

import pytest
import torch

from serving.engine import ModelLoadError
from serving.engine import paged_decode as paged_decode_module
from serving.engine.attention import (
    AttentionShape,
    SdpaAttention,
    TritonAttention,
    disagreement,
    select_attention,
)
from serving.engine.paged_decode import DecodeLaunch, paged_decode, plan_launch
from tests.serving.test_engine import (  # noqa: F401 - make_engine and hf_model are fixtures used here
    RecordedDecodeGraphs,
    greedy_tokens,
    hf_greedy,
    hf_model,
    load_hf,
    make_engine,
    random_prompt,
)

SHAPE = AttentionShape(num_heads=8, num_kv_heads=2, head_dim=16, scale=0.2, num_slots=6, max_model_len=256,
                       device=torch.device("cpu"), block_size=16)


@pytest.fixture
def interpreted(monkeypatch):
    """Triton kernels built in this test run in Triton's CPU interpreter.

    Triton 3.6's interpreter holds every scalar as a one-element array and turns it into a loop bound with
    `int(array)`, which NumPy 2.4 refuses for arrays of one dimension: the bound is read as the array's one element
    instead (what the compiled kernel does with a scalar)."""
    if torch.cuda.is_available():  # Triton's library was imported compiled (tests/serving/conftest.py)
        pytest.skip("on a GPU machine the kernel is compiled: the GPU tests below check it")
    from triton.runtime import interpreter

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)


def reference(query, k_blocks, v_blocks, tables, lengths, scale) -> torch.Tensor:
    """Attention of each row's one query token over its tokens, read block by block, in float64."""
    batch, heads, dim = query.shape
    _, size, kv_heads, _ = k_blocks.shape
    out = []
    for row in range(batch):
        length = int(lengths[row])
        blocks = tables[row, : math.ceil(length / size)]
        keys = k_blocks[blocks].flatten(0, 1)[:length].double().repeat_interleave(heads // kv_heads, dim=1)
        values = v_blocks[blocks].flatten(0, 1)[:length].double().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,thd->ht", query[row].double(), keys) * scale
        out.append(torch.einsum("ht,thd->hd", scores.softmax(-1), values))
    return torch.stack(out)


def paged_case(*, rows: int, heads: int, kv_heads: int, dim: int, size: int, width: int, lengths: list[int],
               seed: int):
    """A pool with every row's blocks shuffled through it, NaN everywhere no row's valid tokens are (the unused
    blocks, the tails of the last blocks): a kernel that reads past a row's length returns NaN."""
    generator = torch.Generator().manual_seed(seed)
    pool = rows * width + 3
    k_blocks = torch.full((pool, size, kv_heads, dim), float("nan"))
    v_blocks = torch.full((pool, size, kv_heads, dim), float("nan"))
    tables = (torch.randperm(pool, generator=generator)[: rows * width]).view(rows, width)
    for row, length in enumerate(lengths):
        for position in range(length):
            block, offset = int(tables[row, position // size]), position % size
            k_blocks[block, offset] = torch.randn(kv_heads, dim, generator=generator)
            v_blocks[block, offset] = torch.randn(kv_heads, dim, generator=generator)
    query = torch.randn(rows, heads, dim, generator=generator)
    return query, k_blocks, v_blocks, tables, torch.tensor(lengths, dtype=torch.int32)


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "size"), [(8, 2, 16, 16), (4, 4, 32, 8), (12, 4, 24, 32)],
                         ids=["grouped", "one-query-head-per-kv-head", "head-dim-not-a-power-of-two"])
@pytest.mark.parametrize("multiprocessors", [1, 1000], ids=["one-split", "split-rows"])
def test_the_kernel_reads_each_rows_blocks_in_place_up_to_its_length(interpreted, heads, kv_heads, dim, size,
                                                                    multiprocessors):
    width = 768 // size  # the step's bucket: 768 tokens, more than the longest row
    lengths = [1, 384, 37, 200, size, size + 1]
    query, k_blocks, v_blocks, tables, lengths_t = paged_case(rows=6, heads=heads, kv_heads=kv_heads, dim=dim,
                                                              size=size, width=width, lengths=lengths, seed=size)
    launch = plan_launch(6, kv_heads, 768, dim, multiprocessors)
    assert launch.num_splits == (1 if multiprocessors == 1 else 3)  # at most one split per 256 tokens
    got = paged_decode(query, k_blocks, v_blocks, tables, lengths_t, 0.2, launch)
    assert got.shape == (6, heads, dim) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), reference(query, k_blocks, v_blocks, tables, lengths_t, 0.2),
                               atol=1e-5, rtol=1e-5)


def test_splits_past_a_short_rows_length_are_weighed_at_zero(interpreted):
    """Four splits of 256 over a 1,024 bucket: row 0's one token lies in the first, rows 1 and 2 end inside the
    second and the fourth; the empty splits must not dilute the merge."""
    query, k_blocks, v_blocks, tables, lengths = paged_case(rows=3, heads=4, kv_heads=2, dim=16, size=16, width=64,
                                                            lengths=[1, 300, 1000], seed=3)
    launch = DecodeLaunch(num_splits=4, split_len=256, tile=64)
    got = paged_decode(query, k_blocks, v_blocks, tables, lengths, 0.25, launch)
    torch.testing.assert_close(got.double(), reference(query, k_blocks, v_blocks, tables, lengths, 0.25),
                               atol=1e-5, rtol=1e-5)


def test_the_launch_splits_rows_only_where_rows_leave_multiprocessors_idle():
    # The benchmark's shape on an H100/H200 (132 multiprocessors, 8 KV heads).
    assert plan_launch(256, 8, 1024, 64, 132) == DecodeLaunch(num_splits=1, split_len=1024, tile=64)
    assert plan_launch(16, 8, 1024, 64, 132) == DecodeLaunch(num_splits=3, split_len=384, tile=64)
    # Never a split under 256 tokens, never more than the bucket holds.
    assert plan_launch(1, 8, 256, 64, 132).num_splits == 1
    assert plan_launch(1, 8, 128 * 1024, 128, 132) == DecodeLaunch(num_splits=33, split_len=4032, tile=64)
    assert plan_launch(2, 4, 4096, 256, 132).tile == 32
    for batch, kv_len in [(1, 256), (3, 768), (5, 2048), (64, 4096), (2, 131072)]:
        launch = plan_launch(batch, 8, kv_len, 128, 132)
        assert launch.split_len % launch.tile == 0
        assert (launch.num_splits - 1) * launch.split_len < kv_len <= launch.num_splits * launch.split_len


def test_triton_attention_agrees_with_sdpa_through_the_load_check(interpreted):
    assert disagreement(lambda shape: TritonAttention(shape, SdpaAttention(shape), multiprocessors=1000), SHAPE,
                        torch.float32) is None


def test_auto_chooses_triton_and_falls_back_loudly_when_it_disagrees(interpreted, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="serving.engine"):
        chosen = select_attention("auto", SHAPE, torch.float32)
    assert chosen.name == "triton"
    assert "attention: triton (decode reads the paged cache in place; sdpa prefill)" in caplog.text

    def one_token_short(query, k_blocks, v_blocks, tables, lengths, scale, launch):
        return paged_decode(query, k_blocks, v_blocks, tables, (lengths - 1).clamp(min=1), scale, launch)

    monkeypatch.setattr(paged_decode_module, "paged_decode", one_token_short)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="serving.engine"):
        assert select_attention("auto", SHAPE, torch.float32).name == "sdpa"
    assert "WARNING" in caplog.text
    assert "the Triton decode kernel is not used: its decode differs from sdpa's by up to" in caplog.text
    with pytest.raises(ModelLoadError, match=r"attention \(ATTENTION_BACKEND\) is triton, but the Triton decode "
                                             r"kernel cannot be used: its decode differs .*; set it to auto, flash or "
                                             "sdpa"):
        select_attention("triton", SHAPE, torch.float32)


def test_triton_is_refused_where_the_kernel_cannot_run(make_engine, caplog):
    """On CPU without the interpreter: an explicit triton fails the load saying why; auto quietly takes SDPA."""
    with pytest.raises(ModelLoadError, match=r"the Triton decode kernel cannot be used: it needs a CUDA device \(the "
                                             r"engine runs on cpu\); set it to auto, flash or sdpa"):
        make_engine(attention="triton")
    with caplog.at_level(logging.INFO, logger="serving.engine"):
        assert make_engine().runner.attention.name == "sdpa"
    assert "the Triton decode kernel is not used: it needs a CUDA device" in caplog.text
    assert "WARNING" not in caplog.text


def test_engine_with_the_triton_kernel_matches_hf_greedy_through_joins_chunks_blocks_and_graph_buckets(
        interpreted, make_engine, tmp_path):
    """Decode through the kernel in every step (recorded graphs over several buckets, several splits per row) while
    requests join and leave and prompts are prefilled in chunks: the tokens are HF's."""
    from tests.serving.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", max_position_embeddings=1024)
    engine = make_engine(model_dir, max_num_seqs=4, max_prefill_tokens_per_step=48, block_size=8)
    runner = engine.runner
    assert runner.attention.name == "triton"
    graphs = RecordedDecodeGraphs.for_runner(runner)
    graphs.capture()
    runner.use_graphs(graphs)
    cases = [(random_prompt(length, seed=190 + length), max_tokens)
             for length, max_tokens in [(3, 30), (290, 20), (17, 12), (1, 6), (250, 8)]]
    results = asyncio.run(greedy_tokens(engine, cases))
    hf = load_hf(model_dir)
    for (prompt, max_tokens), tokens in zip(cases, results):
        assert tokens == hf_greedy(hf, prompt, max_tokens)
    assert len(set(graphs.replayed)) >= 2


def test_engine_steps_times_the_kernel_beside_sdpa_with_the_same_results(interpreted, tmp_path):
    """The benchmark's triton rows (decode steps through the runner, attention alone over shuffled blocks) run the
    kernel and agree with sdpa; flash, which has no CPU form, is skipped with its reason."""
    import json

    from serving.bench import engine_steps

    out = tmp_path / "steps.json"
    assert engine_steps.main(["--shape", "tiny", "--device", "cpu", "--batches", "3", "--kv-len", "256",
                              "--prompts", "2", "--prompt-len", "16", "--repeat", "1", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["skipped"] == {"flash": "it needs a CUDA device (the engine runs on cpu)"}
    assert [row["attention"] for row in result["decode"]] == ["sdpa", "triton"]
    assert [(row["attention"], row["same_result"]) for row in result["attention"]] == [("sdpa", True),
                                                                                      ("triton", True)]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 8, 256])
def test_the_compiled_kernel_agrees_with_float64_on_the_gpu_in_bfloat16(batch):
    """The Llama-3.2-1B head shape, blocks shuffled through the pool, rows of every length up to a 1,024 bucket,
    with the launch the engine would use (splits at small batches)."""
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(batch)
    size, width = 16, 64
    pool = batch * width + 1
    k_blocks = torch.randn(pool, size, 8, 64, generator=generator).to(device, torch.bfloat16)
    v_blocks = torch.randn(pool, size, 8, 64, generator=generator).to(device, torch.bfloat16)
    tables = torch.randperm(pool, generator=generator)[: batch * width].view(batch, width).to(device)
    lengths = torch.randint(1, 1025, (batch,), generator=generator, dtype=torch.int32)
    lengths[0] = 1024
    query = torch.randn(batch, 32, 64, generator=generator).to(device, torch.bfloat16)
    launch = plan_launch(batch, 8, 1024, 64, torch.cuda.get_device_properties(device).multi_processor_count)
    out = torch.full((batch, 32, 64), float("nan"), device=device, dtype=torch.bfloat16)
    out.copy_(paged_decode(query, k_blocks, v_blocks, tables, lengths.to(device), 0.125, launch))
    expected = reference(query.cpu(), k_blocks.cpu(), v_blocks.cpu(), tables.cpu(), lengths, 0.125)
    error = (out.cpu().double() - expected).norm() / expected.norm()
    assert error < 1e-2, f"relative error {error:.3g} (launch {launch})"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_engine_on_the_gpu_chooses_triton_and_graphs_replay_its_eager_tokens(tmp_path):
    from serving.engine import EngineConfig, LLMEngine
    from tests.serving.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", max_position_embeddings=1024)
    cases = [(random_prompt(length, seed=70 + length), max_tokens)
             for length, max_tokens in [(3, 90), (9, 7), (17, 60), (40, 12), (300, 260), (1, 33), (64, 120)]]

    def run(cuda_graphs: bool):
        engine = LLMEngine.from_model_dir(model_dir, EngineConfig(device="cuda", dtype="bfloat16", max_num_seqs=4,
                                                                  cuda_graphs=cuda_graphs))
        assert engine.runner.attention.name == "triton", "auto did not choose triton (see the log for why)"
        assert (engine.runner.graphs is not None) == cuda_graphs, "graph capture failed (see the warning log)"
        return asyncio.run(greedy_tokens(engine, cases, shutdown=True))

    assert run(True) == run(False)
