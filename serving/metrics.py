"""Prometheus metrics, one registry per app; the names are a contract (alerts and autoscaling use them).

Request series (`llm_requests_total`, durations, latencies) are observed by the HTTP layer as requests run.
`llm_requests_total{model, status, code}` keeps the article's `status` values, `success` (an HTTP code below 400) and
`error` (400 and up, 499 for a client that left included), so the article's queries work; `code` is the HTTP code
(`code=~"5.."` picks the server's own failures).
Engine series (queue depth, running requests, KV-cache blocks in use, token totals, prefix-cache lookups and hits,
preemptions, and `llm_engine_info`: the device, the attention implementation the load chose and the block size) and
GPU utilization are read at
scrape time by custom collectors, so they are exactly current and cost nothing between scrapes. The engine
series are also exported under vLLM's names, which the Gateway API Inference Extension's endpoint picker reads.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.engine.interface import EngineStats

REQUEST_DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120)
# Time to first token: dominated by queueing and prefill; from milliseconds (idle GPU) to tens of seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
# Inter-token latency: one decode step, from ~1 ms (captured graphs, small batch) to ~1 s (overload).
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)


class ServerMetrics:
    """The app's metrics. `registry` is what /metrics exposes."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None],
                 gpu_collector: Collector | None = None) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._requests = Counter("llm_requests_total", "API requests by outcome (success/error) and HTTP status code.",
                                 ["model", "status", "code"], registry=self.registry)
        self._duration = Histogram("llm_request_duration_seconds", "API request duration, to the last byte.",
                                   ["model"], buckets=REQUEST_DURATION_BUCKETS, registry=self.registry)
        self._active = Gauge("llm_active_requests", "API requests being served now.", ["model"],
                             registry=self.registry)
        self._ttft = Histogram("llm_time_to_first_token_seconds", "Time from request to its first generated token.",
                               ["model"], buckets=TTFT_BUCKETS, registry=self.registry)
        self._itl = Histogram("llm_inter_token_latency_seconds", "Time between consecutive generated tokens.",
                              ["model"], buckets=ITL_BUCKETS, registry=self.registry)
        self.active = self._active.labels(model_name)
        self.duration = self._duration.labels(model_name)
        self.ttft = self._ttft.labels(model_name)
        self.itl = self._itl.labels(model_name)
        self.registry.register(EngineCollector(model_name, stats))
        if gpu_collector is not None:
            self.registry.register(gpu_collector)

    def count_request(self, status_code: int) -> None:
        outcome = "success" if status_code < 400 else "error"
        self._requests.labels(self.model_name, outcome, str(status_code)).inc()


class EngineCollector:
    """Reads `engine.stats()` at scrape time. Before the engine exists, gauges read 0 (nothing queued or running)."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        self._model_name = model_name
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        waiting = stats.waiting if stats else 0
        running = stats.running if stats else 0
        kv_usage = stats.kv_cache_usage if stats else 0.0
        model = [self._model_name]

        def gauge(name: str, help_text: str, value: float, label: str = "model") -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, help_text, labels=[label])
            family.add_metric(model, value)
            return family

        def counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, help_text, labels=["model"])
            family.add_metric(model, value)
            return family

        yield gauge("llm_requests_waiting", "Requests admitted and waiting for an engine slot.", waiting)
        yield gauge("llm_requests_running", "Requests holding an engine slot (prefill or decode).", running)
        yield gauge("llm_kv_cache_usage_ratio", "Fraction (0..1) of the KV cache's blocks held by running requests.",
                    kv_usage)
        yield counter("llm_prompt_tokens", "Prompt tokens admitted by the engine.",
                      stats.prompt_tokens_total if stats else 0)
        yield counter("llm_generation_tokens", "Tokens generated by the engine.",
                      stats.generation_tokens_total if stats else 0)
        queried = stats.prefix_cache_queried_tokens_total if stats else 0
        hits = stats.prefix_cache_hit_tokens_total if stats else 0
        preemptions = stats.preemptions_total if stats else 0
        yield counter("llm_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache at admission.",
                      queried)
        yield counter("llm_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache (not prefilled again).",
                      hits)
        yield counter("llm_preemptions", "Requests preempted to be recomputed because KV blocks ran out.", preemptions)
        if stats and stats.attention:
            info = GaugeMetricFamily("llm_engine_info", "1, labelled with how the engine runs: its device, the "
                                     "attention that reads the KV cache (triton, flash or sdpa) and the KV block size.",
                                     labels=["model", "device", "attention", "block_size"])
            info.add_metric([self._model_name, stats.device, stats.attention, str(stats.kv_block_size)], 1)
            yield info

        def vllm_counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, help_text, labels=["model_name"])
            family.add_metric(model, value)
            return family

        # vLLM's names, for the Gateway API Inference Extension endpoint picker (v1's prefix-cache counters count
        # tokens, as ours do).
        yield gauge("vllm:num_requests_waiting", "Requests waiting (vLLM name).", waiting, "model_name")
        yield gauge("vllm:num_requests_running", "Requests running (vLLM name).", running, "model_name")
        yield gauge("vllm:gpu_cache_usage_perc", "KV-cache usage 0..1 (vLLM's older name).", kv_usage, "model_name")
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage 0..1 (vLLM name).", kv_usage, "model_name")
        yield vllm_counter("vllm:prefix_cache_queries", "Prefix-cache queries in tokens (vLLM name).", queried)
        yield vllm_counter("vllm:prefix_cache_hits", "Prefix-cache hits in tokens (vLLM name).", hits)
        yield vllm_counter("vllm:num_preemptions", "Preemptions (vLLM name).", preemptions)
