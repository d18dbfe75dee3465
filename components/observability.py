"""Observability: metrics scraping, alerts, dashboards and the autoscaling metric rules for the serving pods.

With the Prometheus operator: a ServiceMonitor per model and a PrometheusRule with one alert group per model
(each alert with severity, summary and runbook). Always: a Grafana dashboard ConfigMap per model, labelled for the
Grafana sidecar, and the prometheus-adapter rule config that serves load per replica to the HPA. Without the
operator, LLMServing puts `prometheus.io/*` scrape annotations on the pods instead. Every query comes from
`metric_contract.model_queries`, so it names only metrics the model's runtime exports.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
import yaml

from components.inference_gateway import GATEWAY_NAME, gateway_labels
from llm_platform.builders import PORT_NAME, SERVING_PORT, labels
from llm_platform.config import ModelConfig, ObservabilityConfig
from llm_platform.metric_contract import ModelQueries, gateway_metric

ADAPTER_RULES_CONFIGMAP = "llm-prometheus-adapter-rules"


@dataclass(frozen=True)
class ObservedModel:
    model: ModelConfig
    queries: ModelQueries


@dataclass(frozen=True)
class ObservabilityArgs:
    namespace: pulumi.Input[str]
    observability: ObservabilityConfig
    models: list[ObservedModel]
    gateway: bool = False
    """The stack runs the InferenceGateway: scrape it and alert on what it holds and answers."""


def scrape_annotations(cfg: ObservabilityConfig) -> dict[str, str]:
    """Pod annotations for annotation-based Prometheus scraping (only when there is no operator)."""
    if cfg.prometheus_operator:
        return {}
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(SERVING_PORT), "prometheus.io/path": "/metrics"}


class Observability(pulumi.ComponentResource):
    def __init__(self, name: str, args: ObservabilityArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("llm-platform:index:Observability", name, None, opts)
        cfg = args.observability
        child = pulumi.ResourceOptions(parent=self)
        common = {"app.kubernetes.io/part-of": "llm-platform", "app.kubernetes.io/managed-by": "pulumi"}

        self.service_monitors = []
        self.rule = None
        groups: list[dict[str, Any]] = []
        if cfg.prometheus_operator:
            for observed in args.models:
                model = observed.model
                self.service_monitors.append(k8s.apiextensions.CustomResource(
                    f"{name}-{model.name}-servicemonitor",
                    api_version="monitoring.coreos.com/v1", kind="ServiceMonitor",
                    metadata={"name": model.name, "namespace": args.namespace, "labels": labels(model.name)},
                    spec=service_monitor_spec(model.name, cfg),
                    opts=child))
            if args.gateway:
                self.service_monitors.append(k8s.apiextensions.CustomResource(
                    f"{name}-gateway-servicemonitor",
                    api_version="monitoring.coreos.com/v1", kind="ServiceMonitor",
                    metadata={"name": GATEWAY_NAME, "namespace": args.namespace, "labels": gateway_labels()},
                    spec=service_monitor_spec(GATEWAY_NAME, cfg),
                    opts=child))
            groups = [alert_group(o, cfg) for o in args.models]
            if args.gateway:
                groups.append(gateway_alert_group(args.models, cfg))
            self.rule = k8s.apiextensions.CustomResource(
                f"{name}-rules",
                api_version="monitoring.coreos.com/v1", kind="PrometheusRule",
                metadata={"name": "llm-serving-alerts", "namespace": args.namespace, "labels": common},
                spec={"groups": groups},
                opts=child)

        self.dashboards = []
        if cfg.grafana_dashboard:
            for observed in args.models:
                self.dashboards.append(k8s.core.v1.ConfigMap(
                    f"{name}-{observed.model.name}-dashboard",
                    metadata={"name": f"{observed.model.name}-dashboard", "namespace": args.namespace,
                              "labels": {**common, "grafana_dashboard": "1"}},
                    data={f"{observed.model.name}.json": json.dumps(dashboard(observed), indent=1, sort_keys=True)},
                    opts=child))

        self.adapter_rules = None
        rules = adapter_rules(args.models)
        if rules:
            self.adapter_rules = k8s.core.v1.ConfigMap(
                f"{name}-adapter-rules",
                metadata={"name": ADAPTER_RULES_CONFIGMAP, "namespace": args.namespace, "labels": common},
                data={"config.yaml": yaml.safe_dump({"rules": rules}, sort_keys=False)},
                opts=child)

        monitored = [o.model.name for o in args.models] + ([GATEWAY_NAME] if args.gateway else [])
        self.register_outputs({
            "serviceMonitors": monitored if cfg.prometheus_operator else [],
            "alerts": [r["alert"] for group in groups for r in group["rules"]],
        })


def adapter_rules(models: list[ObservedModel]) -> list[dict[str, Any]]:
    """One prometheus-adapter rule per runtime used by an HPA-scaled model (identical rules deduplicated)."""
    rules: list[dict[str, Any]] = []
    for o in models:
        a = o.model.autoscaling
        if a.enabled and a.mode == "hpa" and o.queries.adapter_rule not in rules:
            rules.append(o.queries.adapter_rule)
    return rules


def service_monitor_spec(model: str, cfg: ObservabilityConfig) -> dict[str, Any]:
    return {
        "selector": {"matchLabels": {"app": model}},
        "endpoints": [{"port": PORT_NAME, "path": "/metrics", "interval": cfg.scrape_interval, "scheme": "http"}],
    }


def _rule(alert: str, expr: str, for_: str, severity: str, summary: str, runbook: str, model: str) -> dict[str, Any]:
    return {"alert": alert, "expr": expr, "for": for_, "labels": {"severity": severity, "llm_model": model},
            "annotations": {"summary": summary, "runbook": runbook}}


def alert_group(o: ObservedModel, cfg: ObservabilityConfig) -> dict[str, Any]:
    """The model's alerts. Each says what is wrong (summary) and what to look at first (runbook)."""
    m, q = o.model, o.queries
    name = m.name
    rules = [
        _rule("LLMHighErrorRatio", f"({q.error_ratio}) > {cfg.error_ratio_slo}", "5m", "critical",
              f"More than {cfg.error_ratio_slo:.0%} of {name} requests fail with 5xx",
              "Read the serving pods' JSON logs by request_id; 503 means the engine loop died or the pod is "
              "draining; check /health/live and recent restarts.", name),
        _rule("LLMTimeToFirstTokenSlow", f"({q.ttft_p95}) > {cfg.ttft_slo_seconds}", "10m", "warning",
              f"p95 time to first token of {name} is over its {cfg.ttft_slo_seconds} s objective",
              "Requests queue behind full batches: look at the queue depth and whether replicas are at the "
              "maximum; raise maxReplicas (and the GPU quota) or lower maxNumSeqs for latency.", name),
        _rule("LLMQueueBacklog", f"({q.waiting}) > {cfg.queue_depth_threshold}", f"{cfg.queue_depth_minutes}m",
              "warning", f"More than {cfg.queue_depth_threshold} {name} requests wait for a slot",
              "Demand exceeds capacity: check the autoscaler (events, prometheus-adapter or KEDA) and the GPU "
              "quota; scale out or lower per-request max_tokens.", name),
        _rule("LLMKVCacheNearlyFull", f"({q.kv_cache_max}) > 0.9", "10m", "warning",
              f"The KV cache of a {name} replica is over 90% full",
              "New requests will wait for memory: scale out, or reduce maxModelLen / maxNumSeqs.", name),
        _rule("LLMPodRestarting", f"({q.restarts}) > 2", "0m", "warning",
              f"{name} containers restarted more than twice in 15 minutes",
              "`kubectl logs --previous`: out-of-memory (model too large for the GPU or memory limit), a bad "
              "MODEL_PATH, or a liveness failure (engine loop died).", name),
        _rule("LLMPodCrashLooping", f"({q.crash_looping}) >= 1", "5m", "critical",
              f"A {name} pod is in CrashLoopBackOff",
              "The container exits at start: read its last log line (a JSON error naming the problem: model "
              "directory, GPU memory, settings) with `kubectl logs --previous`.", name),
    ]
    if q.attention_fallback:
        rules.append(_rule("LLMAttentionFallback", f"({q.attention_fallback}) > 0", "5m", "warning",
                           f"{name} pods decode with SDPA attention on the GPU, the slowest of the engine's three",
                           "Its load log's `attention:` lines say why the Triton and flash kernels were not used (no "
                           "C compiler or Triton in the image, a kernel that disagreed with SDPA on the load check, "
                           "a GPU older than compute capability 8.0, a float32 model); fix that, or set "
                           "ATTENTION_BACKEND to triton so that such a pod fails at load instead.", name))
    if q.at_max_replicas:
        rules.append(_rule("LLMReplicasAtMaximum", q.at_max_replicas, "10m", "warning",
                           f"{name} has run at its maximum replicas for 10 minutes",
                           "The autoscaler cannot add capacity: raise maxReplicas and the GPU quota, or expect "
                           "queueing and slow first tokens.", name))
    if q.gpu_utilization and q.above_min_replicas:
        rules.append(_rule("LLMGpuIdleAboveMinimum",
                           f"({q.gpu_utilization}) < {cfg.gpu_idle_utilization_percent} and on() "
                           f"({q.above_min_replicas})", "30m", "info",
                           f"{name} GPUs are nearly idle while running above the minimum replicas",
                           "Paying for idle GPUs: check the scale-down behavior and the load target per replica; "
                           "lower minReplicas or the target.", name))
    if q.certificate_expiry_seconds:
        rules.append(_rule("LLMCertificateExpiringSoon",
                           f"({q.certificate_expiry_seconds}) < {cfg.certificate_expiry_days * 86400}", "1h",
                           "warning", f"The TLS certificate of {name} expires within {cfg.certificate_expiry_days} "
                                      "days",
                           "cert-manager did not renew it: `kubectl describe certificate` and the ClusterIssuer's "
                           "status; check the ACME challenge reaches the Ingress.", name))
    return {"name": f"llm-serving-{name}", "rules": rules}


def gateway_alert_group(models: list[ObservedModel], cfg: ObservabilityConfig) -> dict[str, Any]:
    """The gateway's alerts: requests it holds too long (a model that cannot start or keep up) and the share of
    requests it answers with a server error (cold-start timeouts, pods failing before their first byte)."""
    requests = gateway_metric("llm_gateway_requests_total")
    rules = []
    for o in models:
        m, q = o.model, o.queries
        if q.gateway_pending is None:
            continue
        rules.append(_rule(
            "LLMGatewayRequestsHeld", f"({q.gateway_pending}) > 0", "15m", "warning",
            f"The gateway has held {m.served_model_name} requests for 15 minutes",
            "No pod of the model becomes ready (scaled to zero and cannot start: look at the pods' events, the "
            "GPU quota and the fill Job), or every pod is at its in-flight bound (look at the autoscaler, "
            "LLMReplicasAtMaximum).", m.name))
    rules.append({"alert": "LLMGatewayServerErrors",
                  "expr": (f"(sum by (model) (rate({requests}{{code=~\"5..\"}}[5m])) / "
                           f"sum by (model) (rate({requests}[5m]))) > {cfg.error_ratio_slo}"),
                  "for": "5m", "labels": {"severity": "critical"},
                  "annotations": {
                      "summary": f"More than {cfg.error_ratio_slo:.0%} of a model's requests fail at the gateway",
                      "runbook": "503 with code model_starting: the model did not become ready within the "
                                 "cold-start timeout; 502: its pods refuse or reset connections (read the gateway's "
                                 "JSON logs by request_id and the pods' restarts)."}})
    return {"name": "llm-gateway", "rules": rules}


def dashboard(o: ObservedModel) -> dict[str, Any]:
    """Request rate, errors, latency and TTFT, tokens/s, queue, KV cache, GPU utilization, replicas."""
    q = o.queries
    queries = [
        ("Error ratio (5xx)", q.error_ratio, "percentunit"),
        ("Request latency p95", q.latency_p95, "s"),
        ("Time to first token p95", q.ttft_p95, "s"),
        ("Generated tokens/s", q.tokens_per_second, "short"),
        ("Requests running + waiting", q.load_total, "short"),
        ("Requests waiting", q.waiting, "short"),
        ("KV cache use (max over replicas)", q.kv_cache_max, "percentunit"),
        ("Replicas reporting", q.replicas, "short"),
    ]
    if q.gpu_utilization:
        queries.append(("GPU utilization", q.gpu_utilization, "percent"))
    if q.prefix_cache_hit_ratio:
        queries.append(("Prefix cache hit ratio (prompt tokens)", q.prefix_cache_hit_ratio, "percentunit"))
    if q.gateway_pending:
        queries.append(("Requests held in the gateway", q.gateway_pending, "short"))
    panels = [{"id": i + 1, "type": "timeseries", "title": title, "datasource": {"type": "prometheus"},
               "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
               "fieldConfig": {"defaults": {"unit": unit}}, "targets": [{"expr": expr, "refId": "A"}]}
              for i, (title, expr, unit) in enumerate(queries)]
    return {"title": f"LLM serving: {o.model.name}", "uid": f"llm-{o.model.name}"[:40], "schemaVersion": 39,
            "time": {"from": "now-1h", "to": "now"}, "panels": panels}
