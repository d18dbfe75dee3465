"""The metric contract: for each serving runtime, the metrics it exports and what each means.

Every autoscaling query (HPA via prometheus-adapter, KEDA), alert expression and dashboard query is built
here from a runtime's *signals* (load, queue, KV cache, latency, errors, ...), so a query can only name a
metric that the chosen runtime exports: asking for anything else raises ContractError, which the program
turns into a config error at render and preview. The serving image's tests check that every builtin name
below appears on its /metrics.
"""
from __future__ import annotations

from dataclasses import dataclass


class ContractError(ValueError):
    pass


@dataclass(frozen=True)
class Metric:
    name: str
    type: str
    help: str


@dataclass(frozen=True)
class Runtime:
    name: str
    model_label: str
    """Label that carries the served model name on the runtime's series."""
    metrics: dict[str, Metric]
    signals: dict[str, str]
    """Role -> metric name. Roles: running, waiting, kv_cache, ttft, latency, requests, generation_tokens;
    optional: gpu_utilization, prefix_cache_queries and prefix_cache_hits."""
    error_matcher: str
    """Label matcher on the `requests` counter that selects server errors."""
    health: dict[str, str]
    """Probe -> HTTP path."""
    default_max_num_seqs: int
    """Sequences a replica decodes together when the stack sets no maxNumSeqs (the image's own default)."""
    default_image: str | None = None
    """Pinned image used when a model of this runtime names none."""

    def metric(self, name: str) -> str:
        if name not in self.metrics:
            raise ContractError(f"metric {name!r} is not exported by the {self.name} runtime "
                                f"(it exports {', '.join(sorted(self.metrics))})")
        return name

    def signal(self, role: str) -> str:
        if role not in self.signals:
            raise ContractError(f"the {self.name} runtime exports no {role.replace('_', ' ')} metric")
        return self.metric(self.signals[role])

    def has(self, role: str) -> bool:
        return role in self.signals


def _metrics(*items: tuple[str, str, str]) -> dict[str, Metric]:
    return {name: Metric(name, kind, text) for name, kind, text in items}


BUILTIN = Runtime(
    name="builtin",
    model_label="model",
    metrics=_metrics(
        ("llm_requests_total", "counter", "Requests by model, status (success or error, the article's values) and "
                                          "HTTP code"),
        ("llm_request_duration_seconds", "histogram", "End-to-end request latency"),
        ("llm_active_requests", "gauge", "Requests being served right now"),
        ("llm_gpu_utilization", "gauge", "GPU utilization percent by gpu_id (NVML)"),
        ("llm_requests_waiting", "gauge", "Requests queued for a free engine slot"),
        ("llm_requests_running", "gauge", "Requests holding an engine slot"),
        ("llm_kv_cache_usage_ratio", "gauge", "Fraction of the KV cache holding live tokens (0..1)"),
        ("llm_time_to_first_token_seconds", "histogram", "Time from request to first generated token"),
        ("llm_inter_token_latency_seconds", "histogram", "Time between streamed tokens"),
        ("llm_prompt_tokens_total", "counter", "Prompt tokens processed"),
        ("llm_generation_tokens_total", "counter", "Tokens generated"),
        ("llm_prefix_cache_queried_tokens_total", "counter", "Prompt tokens looked up in the prefix cache"),
        ("llm_prefix_cache_hit_tokens_total", "counter", "Prompt tokens found in the prefix cache (not prefilled)"),
        ("llm_preemptions_total", "counter", "Running requests preempted (recomputed later) when KV blocks ran out"),
        ("llm_engine_info", "gauge", "1 per pod, labelled with its device, the attention the engine chose at load "
                                     "(triton, flash or sdpa: a GPU pod on sdpa fell back, and its load log says why) "
                                     "and the KV block size"),
        # The names the Gateway API Inference Extension's endpoint picker reads from vLLM.
        ("vllm:num_requests_waiting", "gauge", "Waiting requests (inference-gateway compatible name)"),
        ("vllm:num_requests_running", "gauge", "Running requests (inference-gateway compatible name)"),
        ("vllm:kv_cache_usage_perc", "gauge", "KV-cache use 0..1 (inference-gateway compatible name)"),
        ("vllm:prefix_cache_queries_total", "counter", "Prefix-cache queried tokens (vLLM-compatible name)"),
        ("vllm:prefix_cache_hits_total", "counter", "Prefix-cache hit tokens (vLLM-compatible name)"),
    ),
    signals={"running": "llm_requests_running", "waiting": "llm_requests_waiting",
             "kv_cache": "llm_kv_cache_usage_ratio", "ttft": "llm_time_to_first_token_seconds",
             "latency": "llm_request_duration_seconds", "requests": "llm_requests_total",
             "generation_tokens": "llm_generation_tokens_total", "gpu_utilization": "llm_gpu_utilization",
             "prefix_cache_queries": "llm_prefix_cache_queried_tokens_total",
             "prefix_cache_hits": "llm_prefix_cache_hit_tokens_total", "engine_info": "llm_engine_info"},
    error_matcher='code=~"5.."',
    health={"startup": "/health/startup", "liveness": "/health/live", "readiness": "/health/ready"},
    default_max_num_seqs=64,
)

VLLM = Runtime(
    name="vllm",
    model_label="model_name",
    metrics=_metrics(
        ("vllm:num_requests_running", "gauge", "Requests running on the engine"),
        ("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled"),
        ("vllm:kv_cache_usage_perc", "gauge", "KV-cache use, 1 = 100%"),
        ("vllm:time_to_first_token_seconds", "histogram", "Time to first token"),
        ("vllm:inter_token_latency_seconds", "histogram", "Time between output tokens"),
        ("vllm:e2e_request_latency_seconds", "histogram", "End-to-end request latency"),
        ("vllm:prompt_tokens_total", "counter", "Prefill tokens processed"),
        ("vllm:generation_tokens_total", "counter", "Tokens generated"),
        ("vllm:request_success_total", "counter", "Finished requests by finish reason"),
        ("vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache"),
        ("vllm:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache"),
        # vLLM's API server instruments HTTP with prometheus-fastapi-instrumentator (status grouped as 2xx/5xx).
        ("http_requests_total", "counter", "HTTP requests by handler and grouped status"),
    ),
    signals={"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting",
             "kv_cache": "vllm:kv_cache_usage_perc", "ttft": "vllm:time_to_first_token_seconds",
             "latency": "vllm:e2e_request_latency_seconds", "requests": "http_requests_total",
             "generation_tokens": "vllm:generation_tokens_total",
             "prefix_cache_queries": "vllm:prefix_cache_queries_total",
             "prefix_cache_hits": "vllm:prefix_cache_hits_total"},
    error_matcher='status="5xx"',
    health={"startup": "/health", "liveness": "/health", "readiness": "/health"},
    default_max_num_seqs=256,
    default_image="vllm/vllm-openai:v0.30.0",
)

RUNTIMES = {r.name: r for r in (BUILTIN, VLLM)}

# Series that come from the cluster, not the serving pods; alerts may use them whatever the runtime.
PLATFORM_METRICS = _metrics(
    ("kube_pod_container_status_restarts_total", "counter", "kube-state-metrics: container restarts"),
    ("kube_pod_container_status_waiting_reason", "gauge", "kube-state-metrics: why a container waits"),
    ("kube_horizontalpodautoscaler_status_current_replicas", "gauge", "kube-state-metrics: HPA current replicas"),
    ("kube_horizontalpodautoscaler_spec_max_replicas", "gauge", "kube-state-metrics: HPA maximum"),
    ("kube_horizontalpodautoscaler_spec_min_replicas", "gauge", "kube-state-metrics: HPA minimum"),
    ("certmanager_certificate_expiration_timestamp_seconds", "gauge", "cert-manager: certificate expiry time"),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "dcgm-exporter: GPU utilization percent, with pod labels"),
)


# The gateway's own series (`python -m serving.gateway`), on the gateway pods; `model` is the served model name.
GATEWAY_METRICS = _metrics(
    ("llm_gateway_pending_requests", "gauge", "Requests the gateway holds for a model: no ready pod yet "
                                             "(starting from zero) or every pod at its in-flight bound"),
    ("llm_gateway_requests_total", "counter", "Requests by model and HTTP code, as answered by the gateway"),
    ("llm_gateway_upstream_latency_seconds", "histogram", "Time from sending to a model pod to its first byte"),
    ("llm_gateway_retries_total", "counter", "Requests retried on another pod before their first byte"),
    ("llm_gateway_inflight_requests", "gauge", "Requests in flight per model and pod"),
    ("llm_gateway_ready_pods", "gauge", "Pods the gateway currently sends a model's requests to"),
    ("llm_gateway_tokens_total", "counter", "Tokens by API key name, model and kind (prompt, completion)"),
)


def gateway_metric(name: str) -> str:
    if name not in GATEWAY_METRICS:
        raise ContractError(f"metric {name!r} is not exported by the gateway ({', '.join(sorted(GATEWAY_METRICS))})")
    return name


def platform_metric(name: str) -> str:
    if name not in PLATFORM_METRICS:
        raise ContractError(f"metric {name!r} is not a known cluster metric ({', '.join(sorted(PLATFORM_METRICS))})")
    return name


def runtime(name: str) -> Runtime:
    return RUNTIMES[name]


# ------------------------------------------------------------------------------------------- queries


def _sel(matchers: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(matchers.items())) + "}"


@dataclass(frozen=True)
class ModelQueries:
    """Every PromQL query the platform renders for one model, built only from its runtime's contract."""

    load_total: str
    """Running plus waiting requests across the model's pods, plus those the gateway holds for it when the stack
    has one (KEDA's trigger; it reads 0, not nothing, when the model has no pods)."""
    adapter_rule: dict
    """prometheus-adapter rule serving load per pod as the HPA's Pods metric."""
    error_ratio: str
    ttft_p95: str
    latency_p95: str
    waiting: str
    kv_cache_max: str
    tokens_per_second: str
    replicas: str
    restarts: str
    crash_looping: str
    at_max_replicas: str | None
    gpu_utilization: str | None
    """Average GPU utilization of the model's pods; None when neither the runtime nor a DCGM exporter reports it."""
    above_min_replicas: str | None
    """True while the autoscaler runs more replicas than the minimum."""
    certificate_expiry_seconds: str | None
    prefix_cache_hit_ratio: str | None = None
    """Share of prompt tokens served from the prefix cache over 5 minutes; None when the runtime reports none."""
    gateway_pending: str | None = None
    """Requests the gateway holds for this model (starting from zero or saturated); None without a gateway."""
    attention_fallback: str | None = None
    """GPU pods whose engine reads its KV cache with SDPA, the slowest attention (a faster one did not apply or failed
    its check at load); None when the runtime does not say which attention it runs."""


LOAD_METRIC = "llm_load_per_replica"
"""The Pods metric name prometheus-adapter serves to the HPA."""


def model_queries(rt: Runtime, *, namespace: str, workload: str, served_model_name: str, hpa_name: str | None,
                  min_replicas: int, certificate: str | None, dcgm: bool, gateway: bool = False) -> ModelQueries:
    """Raises ContractError if any query would need a metric the runtime does not export."""
    own = {"namespace": namespace, rt.model_label: served_model_name}
    sel = _sel(own)
    pods = f'namespace="{namespace}",pod=~"{workload}-.*"'
    by = rt.model_label
    hpa = f'namespace="{namespace}",horizontalpodautoscaler="{hpa_name}"'
    gpu = None
    if rt.has("gpu_utilization"):
        gpu = f"avg({rt.signal('gpu_utilization')}{{{pods}}})"
    elif dcgm:
        gpu = f"avg({platform_metric('DCGM_FI_DEV_GPU_UTIL')}{{{pods}}})"
    pending = gateway_pending(namespace, served_model_name) if gateway else None
    return ModelQueries(
        load_total=load_total(rt, own, pending),
        adapter_rule=adapter_rule(rt, LOAD_METRIC),
        error_ratio=error_ratio(rt, pods),
        ttft_p95=quantile(rt, "ttft", 0.95, by, sel),
        latency_p95=quantile(rt, "latency", 0.95, by, sel),
        waiting=f"sum({rt.signal('waiting')}{sel})",
        kv_cache_max=f"max({rt.signal('kv_cache')}{sel})",
        tokens_per_second=f"sum(rate({rt.signal('generation_tokens')}{sel}[1m]))",
        replicas=f"count({rt.signal('running')}{sel})",
        restarts=f"sum(increase({platform_metric('kube_pod_container_status_restarts_total')}{{{pods}}}[15m]))",
        crash_looping=(f"max(max_over_time({platform_metric('kube_pod_container_status_waiting_reason')}"
                       f'{{{pods},reason="CrashLoopBackOff"}}[5m]))'),
        at_max_replicas=None if hpa_name is None else (
            f"max({platform_metric('kube_horizontalpodautoscaler_status_current_replicas')}{{{hpa}}}) >= "
            f"max({platform_metric('kube_horizontalpodautoscaler_spec_max_replicas')}{{{hpa}}})"),
        gpu_utilization=gpu,
        above_min_replicas=None if hpa_name is None else (
            f"max({platform_metric('kube_horizontalpodautoscaler_status_current_replicas')}{{{hpa}}}) > "
            f"{min_replicas}"),
        certificate_expiry_seconds=None if certificate is None else (
            f"min({platform_metric('certmanager_certificate_expiration_timestamp_seconds')}"
            f'{{namespace="{namespace}",name="{certificate}"}}) - time()'),
        gateway_pending=pending,
        attention_fallback=(f'count({rt.signal("engine_info")}{sel[:-1]},device=~"cuda.*",attention="sdpa"}})'
                            if rt.has("engine_info") else None),
        prefix_cache_hit_ratio=(f"sum(rate({rt.signal('prefix_cache_hits')}{sel}[5m])) / "
                                f"sum(rate({rt.signal('prefix_cache_queries')}{sel}[5m]))"
                                if rt.has("prefix_cache_hits") and rt.has("prefix_cache_queries") else None),
    )


def load_per_pod(rt: Runtime, matchers: dict[str, str]) -> str:
    """Requests a pod is working on or queueing: the autoscaling signal (a GPU pod saturates on this, not CPU)."""
    s = _sel(matchers)
    return f"sum by (namespace, pod) ({rt.signal('running')}{s} + {rt.signal('waiting')}{s})"


def gateway_pending(namespace: str, served_model_name: str) -> str:
    return f"sum({gateway_metric('llm_gateway_pending_requests')}" \
           f"{_sel({'namespace': namespace, 'model': served_model_name})})"


def load_total(rt: Runtime, matchers: dict[str, str], pending: str | None = None) -> str:
    """Each term defaults to 0: a sum over no series is no value, and `x + nothing` is nothing, so at zero pods the
    total would vanish instead of counting the requests the gateway holds."""
    s = _sel(matchers)
    terms = [f"sum({rt.signal('running')}{s})", f"sum({rt.signal('waiting')}{s})"] + ([pending] if pending else [])
    return " + ".join(f"({term} or vector(0))" for term in terms)


def adapter_rule(rt: Runtime, metric_name: str) -> dict:
    """A prometheus-adapter rule that serves the per-pod load as a Pods metric named `metric_name`."""
    running, waiting = rt.signal("running"), rt.signal("waiting")
    return {
        "seriesQuery": f'{{__name__="{running}",namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{running}$", "as": metric_name},
        "metricsQuery": (f"sum({running}{{<<.LabelMatchers>>}}) by (<<.GroupBy>>) + "
                         f"sum({waiting}{{<<.LabelMatchers>>}}) by (<<.GroupBy>>)"),
    }


def error_ratio(rt: Runtime, pods: str) -> str:
    """Share of the pods' requests that failed on the server side, over 5 minutes."""
    r = rt.signal("requests")
    return f"sum(rate({r}{{{pods},{rt.error_matcher}}}[5m])) / sum(rate({r}{{{pods}}}[5m]))"


def quantile(rt: Runtime, role: str, q: float, by: str, selector: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({rt.signal(role)}_bucket{selector}[5m])))"
