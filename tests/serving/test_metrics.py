"""The request counter's labels: the article's `status` values, the HTTP code in its own `code` label."""
from __future__ import annotations

from serving.metrics import ServerMetrics


def test_requests_keep_the_article_status_values_with_the_http_code_in_its_own_label():
    metrics = ServerMetrics("tiny", lambda: None)
    for code in (200, 200, 400, 499, 503):
        metrics.count_request(code)
    counted = {(sample.labels["status"], sample.labels["code"]): sample.value
               for family in metrics.registry.collect() if family.name == "llm_requests"
               for sample in family.samples if sample.name == "llm_requests_total"}
    assert counted == {("success", "200"): 2, ("error", "400"): 1, ("error", "499"): 1, ("error", "503"): 1}
    family = next(family for family in metrics.registry.collect() if family.name == "llm_requests")
    assert {tuple(sorted(sample.labels)) for sample in family.samples} == {("code", "model", "status")}


def test_engine_series_carry_the_prefix_cache_and_preemption_counters_under_our_names_and_vllms():
    from serving.engine.interface import EngineStats

    stats = EngineStats(waiting=0, running=1, max_running=4, kv_cache_usage=0.25, kv_cache_capacity_tokens=1024,
                        prompt_tokens_total=300, generation_tokens_total=20, loop_alive=True, device="cpu",
                        prefix_cache_queried_tokens_total=300, prefix_cache_hit_tokens_total=128,
                        preemptions_total=2, attention="triton", kv_block_size=16)
    metrics = ServerMetrics("tiny", lambda: stats)
    values = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
              for family in metrics.registry.collect() for sample in family.samples}
    ours, theirs = (("model", "tiny"),), (("model_name", "tiny"),)
    assert values[("llm_prefix_cache_queried_tokens_total", ours)] == 300
    assert values[("llm_prefix_cache_hit_tokens_total", ours)] == 128
    assert values[("llm_preemptions_total", ours)] == 2
    assert values[("llm_kv_cache_usage_ratio", ours)] == 0.25
    assert values[("vllm:prefix_cache_queries_total", theirs)] == 300
    assert values[("vllm:prefix_cache_hits_total", theirs)] == 128
    assert values[("vllm:num_preemptions_total", theirs)] == 2


def test_the_engine_info_says_which_attention_the_load_chose_once_an_engine_exists():
    from serving.engine.interface import EngineStats

    def info(stats):
        return [(sample.labels, sample.value) for family in ServerMetrics("tiny", lambda: stats).registry.collect()
                if family.name == "llm_engine_info" for sample in family.samples]

    assert info(None) == []  # loading: no engine, no info
    stats = EngineStats(waiting=0, running=0, max_running=4, kv_cache_usage=0.0, kv_cache_capacity_tokens=1024,
                        prompt_tokens_total=0, generation_tokens_total=0, loop_alive=True, device="cuda:0",
                        attention="sdpa", kv_block_size=32)
    assert info(stats) == [({"model": "tiny", "device": "cuda:0", "attention": "sdpa", "block_size": "32"}, 1.0)]
