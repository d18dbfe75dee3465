"""ClusterAddons: pinned Helm releases for the pieces a cluster may lack, each switched on per stack, and the
VolumeSnapshotClass the model-volume backups use.

kube-prometheus-stack (Prometheus operator, Grafana with the dashboard sidecar, kube-state-metrics),
prometheus-adapter (with the load-per-replica rules rendered from the metric contract), KEDA, the NVIDIA device
plugin, the DCGM exporter, snapscheduler and the LeaderWorkerSet controller. Created first, so the CRDs and metrics
APIs exist before the workloads use them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pulumi
import pulumi_kubernetes as k8s

from components.model_storage import VolumeSnapshotClass
from llm_platform.config import AddonsConfig, BackupsConfig, GpuPoolConfig, HelmAddon, ObservabilityConfig


@dataclass(frozen=True)
class Chart:
    chart: str
    repo: str
    version: str
    """The chart version this release of the platform pins."""
    namespace: str


CHARTS = {
    "kube_prometheus_stack": Chart("kube-prometheus-stack", "https://prometheus-community.github.io/helm-charts",
                                   "62.7.0", "monitoring"),
    "prometheus_adapter": Chart("prometheus-adapter", "https://prometheus-community.github.io/helm-charts",
                                "4.11.0", "monitoring"),
    "keda": Chart("keda", "https://kedacore.github.io/charts", "2.15.1", "keda"),
    "nvidia_device_plugin": Chart("nvidia-device-plugin", "https://nvidia.github.io/k8s-device-plugin", "0.16.2",
                                  "nvidia-device-plugin"),
    "dcgm_exporter": Chart("dcgm-exporter", "https://nvidia.github.io/dcgm-exporter/helm-charts", "3.5.0",
                           "nvidia-device-plugin"),
    "snapscheduler": Chart("snapscheduler", "https://backube.github.io/helm-charts", "3.4.0", "backube-snapscheduler"),
    # kubernetes-sigs/lws, published as an OCI chart (no index.yaml); chart version = LWS release.
    "leader_worker_set": Chart("lws", "oci://registry.k8s.io/lws/charts", "0.10.0", "lws-system"),
}


@dataclass(frozen=True)
class ClusterAddonsArgs:
    addons: AddonsConfig
    observability: ObservabilityConfig
    gpu_pool: GpuPoolConfig
    adapter_rules: list[dict[str, Any]] = field(default_factory=list)
    """prometheus-adapter rules from the metric contract (Observability renders the same rules as a ConfigMap)."""
    backups: BackupsConfig = field(default_factory=BackupsConfig)
    """When backups are on and name a CSI driver, the VolumeSnapshotClass the model-volume snapshots use."""


class ClusterAddons(pulumi.ComponentResource):
    releases: dict[str, k8s.helm.v3.Release]

    def __init__(self, name: str, args: ClusterAddonsArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("llm-platform:index:ClusterAddons", name, None, opts)
        self.releases = {}
        for key, chart in CHARTS.items():
            addon: HelmAddon = getattr(args.addons, key)
            if not addon.enabled:
                continue
            # An OCI chart is named by its full reference; a classic repository by name plus repository_opts.
            oci = chart.repo.startswith("oci://")
            self.releases[key] = k8s.helm.v3.Release(
                f"{name}-{chart.chart}",
                name=chart.chart,
                chart=f"{chart.repo}/{chart.chart}" if oci else chart.chart,
                version=addon.version or chart.version,
                repository_opts=None if oci else k8s.helm.v3.RepositoryOptsArgs(repo=chart.repo),
                namespace=addon.namespace or chart.namespace,
                create_namespace=True,
                atomic=True,
                values=merge_dotted(base_values(key, args), addon.values),
                opts=pulumi.ResourceOptions(parent=self))
        self.snapshot_class = None
        snap = args.backups.snapshot_class
        if args.backups.enabled and snap.driver:
            self.snapshot_class = VolumeSnapshotClass(
                f"{name}-volume-snapshot-class",
                metadata={"name": snap.name, "labels": {"app.kubernetes.io/part-of": "llm-platform",
                                                        "app.kubernetes.io/managed-by": "pulumi"}},
                driver=snap.driver, deletion_policy=snap.deletion_policy, parameters=dict(snap.parameters),
                opts=pulumi.ResourceOptions(parent=self))
        self.register_outputs({"releases": {
            k: f"{CHARTS[k].chart}@{getattr(args.addons, k).version or CHARTS[k].version}" for k in self.releases}})


def base_values(key: str, args: ClusterAddonsArgs) -> dict[str, Any]:
    """What each chart needs to work with the rest of the platform."""
    if key == "kube_prometheus_stack":
        return {
            # Pick up ServiceMonitors and PrometheusRules from every namespace, not only the chart's own release.
            "prometheus": {"prometheusSpec": {"serviceMonitorSelectorNilUsesHelmValues": False,
                                              "ruleSelectorNilUsesHelmValues": False}},
            "grafana": {"sidecar": {"dashboards": {"enabled": True, "label": "grafana_dashboard",
                                                   "searchNamespace": "ALL"}}},
        }
    if key == "prometheus_adapter":
        url = urlparse(args.observability.prometheus_url)
        return {"prometheus": {"url": f"{url.scheme}://{url.hostname}", "port": url.port or 9090},
                "rules": {"default": False, "custom": args.adapter_rules}}
    if key in ("nvidia_device_plugin", "dcgm_exporter"):
        values: dict[str, Any] = {}
        if args.gpu_pool.node_selector:
            values["nodeSelector"] = dict(args.gpu_pool.node_selector)
        if args.gpu_pool.tolerations:
            values["tolerations"] = [{k: v for k, v in vars(t).items() if v is not None}
                                     for t in args.gpu_pool.tolerations]
        if key == "dcgm_exporter":
            values["serviceMonitor"] = {"enabled": args.observability.prometheus_operator}
        return values
    return {}


def merge_dotted(values: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    """Apply `a.b.c: value` overrides onto nested chart values."""
    import copy

    merged = copy.deepcopy(values)
    for dotted, value in overrides.items():
        node = merged
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return merged
