"""The gateway's Prometheus metrics, one registry per app. The names are a contract: the platform's KEDA trigger
reads `llm_gateway_pending_requests`, and its dashboards and alerts read the rest.

Labels stay bounded: `model` is a routed model (or `unknown` for a name no route has, `none` for a body without
one), `pod` a pod address the gateway sends to, `key` a key's name from the keys file (`anonymous` when the API is
open). A key itself never appears in a label.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Time to first byte from a pod: prefill plus the pod's own queue; milliseconds to tens of seconds.
UPSTREAM_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
UNKNOWN_MODEL = "unknown"
NO_MODEL = "none"
ANONYMOUS = "anonymous"


class GatewayMetrics:
    def __init__(self, models: list[str]) -> None:
        self.registry = CollectorRegistry()
        self.pending = Gauge("llm_gateway_pending_requests",
                             "Requests waiting in the gateway: held for a model's cold start, or queued while "
                             "every pod is full.", ["model"], registry=self.registry)
        self.requests = Counter("llm_gateway_requests_total", "API requests answered by the gateway, by HTTP code.",
                                ["model", "code"], registry=self.registry)
        self.upstream_latency = Histogram("llm_gateway_upstream_latency_seconds",
                                          "Time from sending a request to a pod to its first response byte.",
                                          ["model"], buckets=UPSTREAM_LATENCY_BUCKETS, registry=self.registry)
        self.retries = Counter("llm_gateway_retries_total",
                               "Requests sent again to a pod after one failed before its first byte.",
                               ["model"], registry=self.registry)
        self.inflight = Gauge("llm_gateway_inflight_requests", "Requests this gateway has outstanding on a pod.",
                              ["model", "pod"], registry=self.registry)
        self.ready_pods = Gauge("llm_gateway_ready_pods", "Pods of a model the gateway sees ready (0: scaled to zero "
                                "or starting).", ["model"], registry=self.registry)
        self.tokens = Counter("llm_gateway_tokens_total", "Tokens used, by key name, model and kind "
                              "(prompt or completion).", ["key", "model", "kind"], registry=self.registry)
        for model in models:  # every model's series exists from the start, at 0 (a KEDA query then has a value)
            self.pending.labels(model).set(0)
            self.ready_pods.labels(model).set(0)
            self.retries.labels(model)
            self.upstream_latency.labels(model)
