"""Guardrails: the namespace and everything that keeps it safe and bounded.

Namespace with Pod Security Admission labels, ResourceQuota, LimitRange, one PodDisruptionBudget per model
(always allowing at least one voluntary disruption), default-deny NetworkPolicies with explicit allows
(DNS included), the serving ServiceAccount (no token automount) and the API-key Secret from pulumi_random.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
import pulumi_random as random

from llm_platform.builders import (
    API_KEYS_FILE_KEY,
    SERVING_PORT,
    caller_peers,
    dns_egress_rule,
    group_network_policy_spec,
    namespace_selector,
    selector_labels,
    serving_pods_selector,
)
from llm_platform.config import GPU_RESOURCE, GuardrailsConfig

MANAGED_LABELS = {"app.kubernetes.io/part-of": "llm-platform", "app.kubernetes.io/managed-by": "pulumi"}


@dataclass(frozen=True)
class GuardrailsArgs:
    namespace: str
    guardrails: GuardrailsConfig
    model_names: list[str]
    """One PodDisruptionBudget per model, selecting its pods."""
    ingress_controller_namespace: str | None = None
    """The ingress controller's namespace, when the models have their own Ingress: it must reach the pods."""
    prometheus_namespace: str | None = None
    """Prometheus's namespace, when something scrapes the pods."""
    gateway_pods: dict[str, str] | None = None
    """With the InferenceGateway: the labels of its pods, the only callers (besides Prometheus) the model pods
    then accept."""
    group_sizes: dict[str, int] = field(default_factory=dict)
    """Pods per replica of the models that run as LeaderWorkerSet groups: their PDBs count whole groups, and their
    pods may reach each other."""


class Guardrails(pulumi.ComponentResource):
    namespace: k8s.core.v1.Namespace
    namespace_name: pulumi.Output[str]
    service_account_name: str = "llm-serving"
    api_key_secret_name: str = "llm-api-keys"
    api_key: pulumi.Output[str]
    """The generated API key; a secret output."""

    def __init__(self, name: str, args: GuardrailsArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("llm-platform:index:Guardrails", name, None, opts)
        g = args.guardrails
        child = pulumi.ResourceOptions(parent=self)

        self.namespace = k8s.core.v1.Namespace(
            f"{name}-namespace",
            metadata={"name": args.namespace, "labels": {**MANAGED_LABELS, **pod_security_labels(g)}},
            opts=child,
        )
        # Every namespaced child depends on the Namespace through this output.
        self.namespace_name = self.namespace.metadata.apply(lambda m: m["name"] if isinstance(m, dict) else m.name)
        ns = self.namespace_name

        def meta(object_name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
            return {"name": object_name, "namespace": ns, "labels": {**MANAGED_LABELS, **(labels or {})}}

        self.quota = None
        if g.resource_quota.enabled:
            self.quota = k8s.core.v1.ResourceQuota(
                f"{name}-quota", metadata=meta(g.resource_quota.name),
                spec={"hard": resource_quota_hard(g)}, opts=child)

        self.limit_range = None
        if g.limit_range.enabled:
            self.limit_range = k8s.core.v1.LimitRange(
                f"{name}-limits", metadata=meta(g.limit_range.name),
                spec={"limits": [limit_range_item(g)]}, opts=child)

        self.pdbs = [
            k8s.policy.v1.PodDisruptionBudget(
                f"{name}-{model}-pdb", metadata=meta(f"{model}-pdb", selector_labels(model)),
                spec=pdb_spec(g, model, args.group_sizes.get(model, 1)), opts=child)
            for model in args.model_names
        ]

        self.service_account = k8s.core.v1.ServiceAccount(
            f"{name}-serviceaccount", metadata=meta(self.service_account_name),
            automount_service_account_token=False, opts=child)

        password = random.RandomPassword(
            f"{name}-api-key", length=g.api_key_length, special=False, opts=child)
        self.api_key = pulumi.Output.secret(password.result)
        self.api_key_secret = k8s.core.v1.Secret(
            f"{name}-api-key-secret", metadata=meta(self.api_key_secret_name), type="Opaque",
            string_data={API_KEYS_FILE_KEY: self.api_key}, opts=child)

        self.network_policies = []
        if g.network_policies:
            for policy_name, spec in network_policy_specs(
                    g, ingress_controller_namespace=args.ingress_controller_namespace,
                    prometheus_namespace=args.prometheus_namespace, gateway_pods=args.gateway_pods,
                    group_sizes=args.group_sizes).items():
                self.network_policies.append(k8s.networking.v1.NetworkPolicy(
                    f"{name}-{policy_name}", metadata=meta(policy_name), spec=spec, opts=child))

        self.register_outputs({
            "namespace": self.namespace_name,
            "serviceAccount": self.service_account_name,
            "apiKeySecret": self.api_key_secret_name,
            "apiKey": self.api_key,
        })


def pod_security_labels(g: GuardrailsConfig) -> dict[str, str]:
    """The level at a pinned version: with `latest`, a cluster upgrade could start refusing running pods' specs."""
    labels: dict[str, str] = {}
    for mode in ("enforce", "audit", "warn"):
        labels[f"pod-security.kubernetes.io/{mode}"] = g.pod_security
        labels[f"pod-security.kubernetes.io/{mode}-version"] = g.pod_security_version
    return labels


def resource_quota_hard(g: GuardrailsConfig) -> dict[str, str]:
    q = g.resource_quota
    hard = {
        "requests.cpu": q.requests_cpu,
        "requests.memory": q.requests_memory,
        f"requests.{GPU_RESOURCE}": str(q.gpus),
        "limits.cpu": q.limits_cpu,
        "limits.memory": q.limits_memory,
        # Kubernetes enforces only requests.* for extended resources; the limits key documents the same cap.
        f"limits.{GPU_RESOURCE}": str(q.gpus),
        "persistentvolumeclaims": str(q.persistent_volume_claims),
    }
    for storage_class, size in sorted(q.storage_by_class.items()):
        hard[f"{storage_class}.storageclass.storage.k8s.io/requests.storage"] = size
    return hard


def limit_range_item(g: GuardrailsConfig) -> dict[str, Any]:
    lr = g.limit_range
    return {
        "type": "Container",
        "default": {"cpu": lr.default_cpu, "memory": lr.default_memory,
                    "ephemeral-storage": lr.default_ephemeral_storage},
        "defaultRequest": {"cpu": lr.default_request_cpu, "memory": lr.default_request_memory,
                           "ephemeral-storage": lr.default_request_ephemeral_storage},
    }


def pdb_spec(g: GuardrailsConfig, model_name: str, group_size: int = 1) -> dict[str, Any]:
    """maxUnavailable by default: the article's minAvailable 2 over 2 replicas blocked every node drain.

    For a LeaderWorkerSet the budget covers whole groups: it selects leaders and workers, and counts in pods of
    `group_size`, since evicting any one pod recreates (takes down) its whole group."""
    spec: dict[str, Any] = {"selector": {"matchLabels": selector_labels(model_name)},
                            # Pods that never became ready must not block drains either.
                            "unhealthyPodEvictionPolicy": "AlwaysAllow"}
    if g.pdb.max_unavailable is not None:
        spec["maxUnavailable"] = g.pdb.max_unavailable * group_size
    elif g.pdb.min_available is not None:  # validation requires one of the two
        spec["minAvailable"] = g.pdb.min_available * group_size
    return spec


def network_policy_specs(g: GuardrailsConfig, *, ingress_controller_namespace: str | None = None,
                         prometheus_namespace: str | None = None, gateway_pods: dict[str, str] | None = None,
                         group_sizes: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Default deny for the namespace, DNS for everyone, and the serving pods' explicit allows: the stack's callers
    (allowFrom, the ingress controller, Prometheus), or with the gateway only the gateway's pods and Prometheus;
    the pods of a LeaderWorkerSet group reach each other."""
    scrapers = [prometheus_namespace] if prometheus_namespace else []
    if gateway_pods is not None:
        callers = [{"podSelector": {"matchLabels": dict(gateway_pods)}}] + \
            [{"namespaceSelector": namespace_selector(ns)} for ns in scrapers]
    else:
        callers = caller_peers(g.allow_from, ([ingress_controller_namespace] if ingress_controller_namespace
                                              else []) + scrapers)
    serving = {"matchLabels": serving_pods_selector()}
    specs: dict[str, dict[str, Any]] = {
        "default-deny-all": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
        "allow-dns-egress": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [dns_egress_rule()]},
        "llm-serving-ingress": {
            "podSelector": serving,
            "policyTypes": ["Ingress"],
            "ingress": [{"from": callers, "ports": [{"protocol": "TCP", "port": SERVING_PORT}]}],
        },
    }
    if g.egress_to.namespaces:
        specs["llm-serving-egress"] = {
            "podSelector": serving,
            "policyTypes": ["Egress"],
            "egress": [{
                "to": [{"namespaceSelector": namespace_selector(ns)} for ns in g.egress_to.namespaces],
                "ports": [{"protocol": "TCP", "port": port} for port in g.egress_to.ports],
            }],
        }
    for model_name, size in sorted((group_sizes or {}).items()):
        if size > 1:
            specs[f"{model_name}-group"] = group_network_policy_spec(model_name)
    return specs
