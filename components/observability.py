"""Observability: metrics scraping, alerts and a dashboard for the serving pods.

With the Prometheus operator: a ServiceMonitor per model, one PrometheusRule with alerts (each with severity,
summary and runbook text) and a Grafana dashboard ConfigMap labelled for the Grafana sidecar. Without it:
the dashboard only, and LLMServing puts `prometheus.io/*` scrape annotations on the pods instead.
Every query names metrics through `metric_contract`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from components.builders import PORT_NAME, SERVING_PORT, labels
from components.metric_contract import metric
from stack_config import ObservabilityConfig


@dataclass(frozen=True)
class ObservabilityArgs:
    namespace: pulumi.Input[str]
    observability: ObservabilityConfig
    model_names: list[str]


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
        if cfg.prometheus_operator:
            for model in args.model_names:
                self.service_monitors.append(k8s.apiextensions.CustomResource(
                    f"{name}-{model}-servicemonitor",
                    api_version="monitoring.coreos.com/v1", kind="ServiceMonitor",
                    metadata={"name": model, "namespace": args.namespace, "labels": labels(model)},
                    spec=service_monitor_spec(model, cfg),
                    opts=child))
            self.rule = k8s.apiextensions.CustomResource(
                f"{name}-rules",
                api_version="monitoring.coreos.com/v1", kind="PrometheusRule",
                metadata={"name": "llm-serving-alerts", "namespace": args.namespace, "labels": common},
                spec={"groups": [{"name": "llm-serving", "rules": alert_rules(cfg)}]},
                opts=child)

        self.dashboard = None
        if cfg.grafana_dashboard:
            self.dashboard = k8s.core.v1.ConfigMap(
                f"{name}-dashboard",
                metadata={"name": "llm-serving-dashboard", "namespace": args.namespace,
                          "labels": {**common, "grafana_dashboard": "1"}},
                data={"llm-serving.json": json.dumps(dashboard(), indent=1, sort_keys=True)},
                opts=child)

        self.register_outputs({
            "serviceMonitors": [m for m in args.model_names] if cfg.prometheus_operator else [],
            "alerts": [r["alert"] for r in alert_rules(cfg)] if cfg.prometheus_operator else [],
        })


def service_monitor_spec(model: str, cfg: ObservabilityConfig) -> dict[str, Any]:
    return {
        "selector": {"matchLabels": {"app": model}},
        "endpoints": [{"port": PORT_NAME, "path": "/metrics", "interval": cfg.scrape_interval, "scheme": "http"}],
    }


def alert_rules(cfg: ObservabilityConfig) -> list[dict[str, Any]]:
    requests, duration = metric("llm_requests_total"), metric("llm_request_duration_seconds")
    ttft, waiting = metric("llm_time_to_first_token_seconds"), metric("llm_requests_waiting")
    kv = metric("llm_kv_cache_usage_ratio")

    def rule(alert: str, expr: str, duration_: str, severity: str, summary: str, runbook: str) -> dict[str, Any]:
        return {"alert": alert, "expr": expr, "for": duration_, "labels": {"severity": severity},
                "annotations": {"summary": summary, "runbook": runbook}}

    return [
        rule("LLMHighErrorRatio",
             f'sum by (model) (rate({requests}{{status=~"5.."}}[5m])) / sum by (model) (rate({requests}[5m]))'
             f" > {cfg.error_ratio_slo}",
             "5m", "critical", "More than {{ $value | humanizePercentage }} of {{ $labels.model }} requests fail",
             "Check the serving pods' logs (JSON, by request_id) and /health/live; a dead engine loop returns 503."),
        rule("LLMTimeToFirstTokenSlow",
             f"histogram_quantile(0.95, sum by (model, le) (rate({ttft}_bucket[5m]))) > {cfg.ttft_slo_seconds}",
             "10m", "warning", "p95 time to first token of {{ $labels.model }} is {{ $value }}s",
             "Requests queue behind full batches: check llm_requests_waiting and whether the HPA is at max."),
        rule("LLMQueueBacklog", f"sum by (model) ({waiting}) > 10", "5m", "warning",
             "{{ $value }} requests of {{ $labels.model }} wait for a slot",
             "Scale out (raise maxReplicas and the GPU quota) or lower per-request max_tokens."),
        rule("LLMKVCacheFull", f"max by (model) ({kv}) > 0.9", "10m", "warning",
             "KV cache of {{ $labels.model }} is over 90% full",
             "New requests will wait; scale out or reduce maxModelLen/maxNumSeqs."),
        rule("LLMSlowRequests",
             f"histogram_quantile(0.95, sum by (model, le) (rate({duration}_bucket[5m]))) > 60",
             "10m", "warning", "p95 request latency of {{ $labels.model }} is {{ $value }}s",
             "Long generations or a saturated replica: compare tokens/s per pod with the benchmarks."),
        rule("LLMPodCrashLooping",
             'increase(kube_pod_container_status_restarts_total{container="llm-api"}[15m]) > 2',
             "0m", "critical", "Serving pod {{ $labels.pod }} restarted {{ $value }} times in 15 minutes",
             "`kubectl logs --previous`: a model that does not fit GPU memory or a bad MODEL_PATH crash-loops."),
    ]


def dashboard() -> dict[str, Any]:
    """A compact Grafana dashboard over the contract's metrics."""
    def panel(pid: int, title: str, expr: str, unit: str, x: int, y: int) -> dict[str, Any]:
        return {"id": pid, "type": "timeseries", "title": title, "datasource": {"type": "prometheus"},
                "gridPos": {"h": 8, "w": 12, "x": x, "y": y}, "fieldConfig": {"defaults": {"unit": unit}},
                "targets": [{"expr": expr, "refId": "A"}]}

    r, d, t = metric("llm_requests_total"), metric("llm_request_duration_seconds"), \
        metric("llm_time_to_first_token_seconds")
    queries = [
        ("Requests/s by status", f"sum by (model, status) (rate({r}[5m]))", "reqps"),
        ("Error ratio", f'sum by (model) (rate({r}{{status=~"5.."}}[5m])) / sum by (model) (rate({r}[5m]))',
         "percentunit"),
        ("Latency p50/p95", f"histogram_quantile(0.95, sum by (model, le) (rate({d}_bucket[5m])))", "s"),
        ("Time to first token p95", f"histogram_quantile(0.95, sum by (model, le) (rate({t}_bucket[5m])))", "s"),
        ("Generated tokens/s", f"sum by (model) (rate({metric('llm_generation_tokens_total')}[1m]))", "short"),
        ("Queue and running", f"sum by (model) ({metric('llm_requests_waiting')})", "short"),
        ("KV cache use", f"max by (model) ({metric('llm_kv_cache_usage_ratio')})", "percentunit"),
        ("GPU utilization", f"avg by (gpu_id) ({metric('llm_gpu_utilization')})", "percent"),
    ]
    panels = [panel(i + 1, title, expr, unit, 12 * (i % 2), 8 * (i // 2)) for i, (title, expr, unit) in
              enumerate(queries)]
    return {"title": "LLM serving", "uid": "llm-serving", "schemaVersion": 39, "time": {"from": "now-1h", "to": "now"},
            "panels": panels}
