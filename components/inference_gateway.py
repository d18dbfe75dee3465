"""InferenceGateway: the stack's one OpenAI endpoint, in front of every model.

The gateway (`python -m serving.gateway`, from the serving image, no GPU) routes each request by its `model` to
that model's pods, found through a headless Service per model (LLMServing creates `<model>-endpoints`, which
publishes ready pods only). It balances by least outstanding requests with prefix affinity, holds requests while
a model starts from zero (its pending count is part of the model's KEDA trigger) and queues them past each pod's
in-flight bound. This component creates the gateway Deployment (two replicas by default), its Service, the
stack's one Ingress with cert-manager TLS (only `/v1` is routed: health and metrics stay in the cluster), a PDB,
an HPA on CPU, the routes ConfigMap, and the NetworkPolicies that let the ingress controller and the allowed
callers reach the gateway and the gateway reach the model pods (Guardrails then lets the model pods accept
only the gateway and Prometheus).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from llm_platform.builders import (
    API_KEYS_DIR,
    API_KEYS_FILE_KEY,
    PART_OF,
    PORT_NAME,
    SERVING_PORT,
    caller_peers,
    container_security_context,
    pod_security_context,
    probe,
    serving_pods_selector,
)
from llm_platform.config import PRESTOP_SLEEP_SECONDS, AllowFromConfig, GatewayConfig, IngressConfig, ProbeConfig

GATEWAY_NAME = "llm-gateway"
GATEWAY_COMPONENT = "llm-gateway"
ROUTES_DIR = "/etc/llm-gateway"
ROUTES_FILE_KEY = "routes.json"
SERVICE_PORT = 80
INGRESS_PATH = "/v1"
"""Only the OpenAI API is public: /health/* and /metrics are for the kubelet and Prometheus inside the cluster."""
STREAM_TIMEOUT_SECONDS = 600
"""ingress-nginx read timeout beyond a cold start: a non-streamed generation sends nothing until it is done."""

_LIVENESS = ProbeConfig(initial_delay_seconds=5, period_seconds=10, timeout_seconds=5, failure_threshold=3)
_READINESS = ProbeConfig(initial_delay_seconds=2, period_seconds=5, timeout_seconds=3, failure_threshold=2)


@dataclass(frozen=True)
class GatewayRoute:
    """One model behind the gateway, as the routes file names it."""

    served_model_name: str
    """The `model` clients send."""
    service: str
    """The model's headless Service (`<model>-endpoints`), whose DNS records are its ready pods."""
    cold_start_timeout_seconds: int
    """How long a request is held while the model has no ready pod (from the plan)."""
    max_inflight_per_pod: int
    """Requests sent one pod at once before the gateway queues more (from the plan)."""
    max_queue: int
    """Requests held for the model (starting, or every pod at its bound) before 429."""


@dataclass(frozen=True)
class InferenceGatewayArgs:
    namespace: pulumi.Input[str]
    namespace_name: str
    """The namespace as text, for the Services' DNS names in the routes file."""
    gateway: GatewayConfig
    image: str
    """The serving image, pinned (llm_platform.config.gateway_image)."""
    routes: list[GatewayRoute]
    ingress: IngressConfig
    allow_from: AllowFromConfig
    """Callers besides the ingress controller that may reach the gateway (the same as the models had)."""
    service_account: str
    api_key_secret: str
    network_policies: bool = True
    prometheus_namespace: str | None = None
    """Prometheus's namespace: it scrapes the gateway's /metrics."""
    tls_secret_name: str | None = None
    pod_annotations: dict[str, str] | None = None
    priority_class_name: str | None = None


class InferenceGateway(pulumi.ComponentResource):
    deployment: k8s.apps.v1.Deployment
    service: k8s.core.v1.Service
    endpoint: pulumi.Output[str]
    """Where clients reach every model: https://host/v1 with an Ingress, else the in-cluster URL."""

    def __init__(self, name: str, args: InferenceGatewayArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("llm-platform:index:InferenceGateway", name, None, opts)
        gw = args.gateway
        child = pulumi.ResourceOptions(parent=self)
        common = gateway_labels()

        def meta(object_name: str) -> dict[str, Any]:
            return {"name": object_name, "namespace": args.namespace, "labels": common}

        routes = routes_document(args.routes, args.namespace_name)
        self.routes = k8s.core.v1.ConfigMap(
            f"{name}-routes", metadata=meta(f"{GATEWAY_NAME}-routes"), data={ROUTES_FILE_KEY: routes}, opts=child)

        template = {
            "metadata": {"labels": common, "annotations": {
                **(args.pod_annotations or {}),
                # A new routes file is a new pod template, so the gateway rolls onto it.
                "llm-platform/routes-sha256": hashlib.sha256(routes.encode()).hexdigest()[:16]}},
            "spec": gateway_pod_spec(gw, args.image, service_account=args.service_account,
                                     api_key_secret=args.api_key_secret,
                                     priority_class_name=args.priority_class_name),
        }
        self.deployment = k8s.apps.v1.Deployment(
            f"{name}-deployment", metadata=meta(GATEWAY_NAME),
            spec={
                "replicas": gw.replicas,
                "revisionHistoryLimit": 5,
                "selector": {"matchLabels": gateway_selector()},
                # No GPU to wait for: a surge pod is cheap, so an update never lowers capacity.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": template,
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.routes], ignore_changes=["spec.replicas"]))

        self.service = k8s.core.v1.Service(
            f"{name}-service", metadata=meta(GATEWAY_NAME),
            spec={"type": "ClusterIP", "selector": gateway_selector(),
                  "ports": [{"name": PORT_NAME, "port": SERVICE_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}]},
            opts=child)

        self.pdb = k8s.policy.v1.PodDisruptionBudget(
            f"{name}-pdb", metadata=meta(f"{GATEWAY_NAME}-pdb"),
            spec={"selector": {"matchLabels": gateway_selector()}, "maxUnavailable": 1,
                  "unhealthyPodEvictionPolicy": "AlwaysAllow"},
            opts=child)

        self.hpa = k8s.autoscaling.v2.HorizontalPodAutoscaler(
            f"{name}-hpa", metadata=meta(f"{GATEWAY_NAME}-hpa"), spec=gateway_hpa_spec(gw),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.deployment]))

        self.network_policies = []
        if args.network_policies:
            for policy_name, spec in gateway_network_policy_specs(
                    args.allow_from, ingress_namespace=args.ingress.controller_namespace if args.ingress.enabled
                    else None, prometheus_namespace=args.prometheus_namespace).items():
                self.network_policies.append(k8s.networking.v1.NetworkPolicy(
                    f"{name}-{policy_name}", metadata=meta(policy_name), spec=spec, opts=child))

        self.ingress = None
        if args.ingress.enabled and args.ingress.host is not None:  # validation requires the host with an Ingress
            host = args.ingress.host
            self.ingress = k8s.networking.v1.Ingress(
                f"{name}-ingress",
                metadata={**meta(GATEWAY_NAME), "annotations": gateway_ingress_annotations(
                    args.ingress, max(r.cold_start_timeout_seconds for r in args.routes))},
                spec=gateway_ingress_spec(args.ingress, host, args.tls_secret_name),
                opts=child)
            self.endpoint = pulumi.Output.from_input(f"{'https' if args.ingress.tls else 'http'}://{host}{INGRESS_PATH}")
        else:
            self.endpoint = pulumi.Output.concat(
                "http://", GATEWAY_NAME, ".", args.namespace, f".svc.cluster.local:{SERVICE_PORT}{INGRESS_PATH}")

        self.register_outputs({"endpoint": self.endpoint, "deployment": GATEWAY_NAME,
                               "models": [r.served_model_name for r in args.routes]})


# ------------------------------------------------------------------------------------- pure builders


def gateway_selector() -> dict[str, str]:
    return {"app": GATEWAY_NAME}


def gateway_labels() -> dict[str, str]:
    return {**gateway_selector(), "app.kubernetes.io/name": GATEWAY_NAME,
            "app.kubernetes.io/component": GATEWAY_COMPONENT, "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/managed-by": "pulumi"}


def gateway_pods_selector() -> dict[str, str]:
    """Selects the gateway's pods (the model pods' NetworkPolicy admits them)."""
    return {"app.kubernetes.io/component": GATEWAY_COMPONENT, "app.kubernetes.io/part-of": PART_OF}


def endpoints_service_name(model_name: str) -> str:
    """The headless Service through which the gateway finds one model's ready pods."""
    return f"{model_name}-endpoints"


def routes_document(routes: list[GatewayRoute], namespace: str) -> str:
    """The gateway's routes file. Service names are namespace-qualified but not cluster-domain-qualified, so the
    pod's DNS search path completes them whatever the cluster domain is."""
    return json.dumps({"models": [{
        "model": r.served_model_name,
        "service": f"{r.service}.{namespace}.svc",
        "port": SERVING_PORT,
        "coldStartTimeoutSeconds": r.cold_start_timeout_seconds,
        "maxQueue": r.max_queue,
        "maxInflightPerPod": r.max_inflight_per_pod,
    } for r in routes]}, indent=1, sort_keys=True)


def gateway_container(gw: GatewayConfig, image: str) -> dict[str, Any]:
    amounts = gw.resources
    return {
        "name": GATEWAY_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "serving.gateway"],
        "env": [
            {"name": "PORT", "value": str(SERVING_PORT)},
            {"name": "ROUTES_FILE", "value": f"{ROUTES_DIR}/{ROUTES_FILE_KEY}"},
            {"name": "API_KEYS_FILE", "value": f"{API_KEYS_DIR}/{API_KEYS_FILE_KEY}"},
            {"name": "DRAIN_SECONDS", "value": str(gw.drain_seconds)},
            {"name": "HOME", "value": "/tmp"},
        ],
        "ports": [{"name": PORT_NAME, "containerPort": SERVING_PORT, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": amounts.requests.cpu, "memory": amounts.requests.memory,
                         "ephemeral-storage": amounts.requests.ephemeral_storage},
            "limits": {"cpu": amounts.limits.cpu, "memory": amounts.limits.memory,
                       "ephemeral-storage": amounts.limits.ephemeral_storage},
        },
        "volumeMounts": [{"name": "routes", "mountPath": ROUTES_DIR, "readOnly": True},
                         {"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "livenessProbe": probe("/health/live", _LIVENESS),
        "readinessProbe": probe("/health/ready", _READINESS),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def gateway_pod_spec(gw: GatewayConfig, image: str, *, service_account: str, api_key_secret: str,
                     priority_class_name: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": gw.termination_grace_period_seconds,
        "containers": [gateway_container(gw, image)],
        "volumes": [
            {"name": "routes", "configMap": {"name": f"{GATEWAY_NAME}-routes", "defaultMode": 0o444}},
            {"name": "api-keys", "secret": {"secretName": api_key_secret, "defaultMode": 0o440,
                                            "items": [{"key": API_KEYS_FILE_KEY, "path": API_KEYS_FILE_KEY}]}},
            {"name": "tmp", "emptyDir": {"sizeLimit": gw.resources.limits.ephemeral_storage}},
        ],
        # Replicas on different nodes, so a node failure or drain leaves the endpoint up.
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": gateway_selector()}}],
    }
    if priority_class_name:
        spec["priorityClassName"] = priority_class_name
    return spec


def gateway_hpa_spec(gw: GatewayConfig) -> dict[str, Any]:
    a = gw.autoscaling
    return {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY_NAME},
        "minReplicas": a.min_replicas,
        "maxReplicas": a.max_replicas,
        "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
            "type": "Utilization", "averageUtilization": a.target_cpu_utilization}}}],
        # Out fast on a burst; in slowly, since a removed replica's streams must drain first.
        "behavior": {
            "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max", "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 30},
                {"type": "Pods", "value": 2, "periodSeconds": 30}]},
            "scaleDown": {"stabilizationWindowSeconds": 300, "policies": [
                {"type": "Pods", "value": 1, "periodSeconds": 60}]},
        },
    }


def gateway_ingress_annotations(ingress: IngressConfig, longest_cold_start_seconds: int) -> dict[str, str]:
    """cert-manager's issuer; for ingress-nginx, streams unbuffered and a read timeout that outlasts a cold start
    (its 60 s default would cut every request held while a model starts). The stack's own annotations win."""
    annotations: dict[str, str] = {}
    if ingress.class_name == "nginx":
        timeout = str(longest_cold_start_seconds + STREAM_TIMEOUT_SECONDS)
        annotations.update({
            "nginx.ingress.kubernetes.io/proxy-buffering": "off",
            "nginx.ingress.kubernetes.io/proxy-read-timeout": timeout,
            "nginx.ingress.kubernetes.io/proxy-send-timeout": timeout,
        })
    if ingress.tls:
        annotations["cert-manager.io/cluster-issuer"] = ingress.cluster_issuer
    annotations.update(ingress.annotations)
    return annotations


def gateway_ingress_spec(ingress: IngressConfig, host: str, tls_secret_name: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ingressClassName": ingress.class_name,
        "rules": [{"host": host, "http": {"paths": [{
            "path": INGRESS_PATH, "pathType": "Prefix",
            "backend": {"service": {"name": GATEWAY_NAME, "port": {"number": SERVICE_PORT}}},
        }]}}],
    }
    if ingress.tls:
        spec["tls"] = [{"hosts": [host], "secretName": tls_secret_name or ingress.tls_secret_name}]
    return spec


def gateway_network_policy_specs(allow_from: AllowFromConfig, *, ingress_namespace: str | None,
                                 prometheus_namespace: str | None) -> dict[str, dict[str, Any]]:
    """Who may call the gateway (the ingress controller, the allowed callers, Prometheus), and that the gateway
    may call the model pods. DNS egress comes from Guardrails' namespace-wide policy."""
    callers = caller_peers(allow_from, [ns for ns in (ingress_namespace, prometheus_namespace) if ns])
    port = [{"protocol": "TCP", "port": SERVING_PORT}]
    gateway = {"matchLabels": gateway_pods_selector()}
    return {
        "llm-gateway-ingress": {"podSelector": gateway, "policyTypes": ["Ingress"],
                                "ingress": [{"from": callers, "ports": port}]},
        "llm-gateway-egress": {"podSelector": gateway, "policyTypes": ["Egress"],
                               "egress": [{"to": [{"podSelector": {"matchLabels": serving_pods_selector()}}],
                                           "ports": port}]},
    }
