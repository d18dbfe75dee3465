"""The metric names the serving image exports, and what each means.

Alerts and dashboard queries are generated from this table only, so a renamed metric breaks render,
not a dashboard in production. The image's own tests check that every name here appears on /metrics.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    type: str
    help: str


BUILTIN_METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("llm_requests_total", "counter", "Requests by model and HTTP status code"),
    Metric("llm_request_duration_seconds", "histogram", "End-to-end request latency"),
    Metric("llm_active_requests", "gauge", "Requests being served right now"),
    Metric("llm_gpu_utilization", "gauge", "GPU utilization percent by gpu_id (NVML)"),
    Metric("llm_requests_waiting", "gauge", "Requests queued for a free engine slot"),
    Metric("llm_requests_running", "gauge", "Requests holding an engine slot"),
    Metric("llm_kv_cache_usage_ratio", "gauge", "Fraction of the KV cache holding live tokens (0..1)"),
    Metric("llm_time_to_first_token_seconds", "histogram", "Time from request to first generated token"),
    Metric("llm_inter_token_latency_seconds", "histogram", "Time between streamed tokens"),
    Metric("llm_prompt_tokens_total", "counter", "Prompt tokens processed"),
    Metric("llm_generation_tokens_total", "counter", "Tokens generated"),
]}


def metric(name: str) -> str:
    """A metric name, checked against the contract (KeyError names the unknown metric)."""
    if name not in BUILTIN_METRICS:
        raise KeyError(f"metric {name!r} is not exported by the serving image; known: {sorted(BUILTIN_METRICS)}")
    return name
