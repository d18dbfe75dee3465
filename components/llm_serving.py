"""LLMServing: one model's serving stack.

Deployment (shared model PVC), StatefulSet (one volume per replica) or LeaderWorkerSet (vLLM across nodes: one
group of pods per replica on the shared model PVC, the Service on the leaders), Service, Ingress with cert-manager
TLS, autoscaling/v2 HPA with the article's behavior, probes against the image's health contract, a rolling
update that can always make progress, and the restricted security context. One instance per model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from components.model_storage import model_claim_spec, volume_labels
from llm_platform.builders import (
    PORT_NAME,
    ROLE_LABEL,
    SERVING_PORT,
    hpa_spec,
    keda_scaled_object_spec,
    labels,
    leader_worker_set_spec,
    pod_spec,
    selector_labels,
    service_selector,
    source_annotations,
)
from llm_platform.config import GPU_RESOURCE, LWS_API, IngressConfig, workload_name
from llm_platform.plan import PlannedModel


@dataclass(frozen=True)
class LLMServingArgs:
    namespace: pulumi.Input[str]
    model: PlannedModel
    ingress: IngressConfig
    host: str | None
    """Ingress host for this model (None when the stack has no Ingress)."""
    tls_secret_name: str
    """Secret cert-manager writes this model's certificate into."""
    service_account: str
    api_key_secret: str
    scheduling: dict[str, Any]
    """GPU scheduling fragment from GpuPool."""
    gpu_resource: str = GPU_RESOURCE
    pod_annotations: dict[str, str] | None = None
    """Extra pod-template annotations (e.g. Prometheus scrape hints without the operator)."""
    target_load_per_replica: int = 1
    """Running plus waiting requests per replica at which the autoscaler adds replicas (from the plan)."""
    load_query: str = ""
    """PromQL for the model's total load (KEDA's trigger), from the metric contract."""
    prometheus_url: str = ""
    storage_ready: list[pulumi.Resource] | None = None
    """ModelStorage's claim and fill Job: the workload rolls only once the configured revision is on the volume."""
    progress_deadline_seconds: int = 600
    """The Deployment's progressDeadlineSeconds (from the plan: image pull, model check and startup budget)."""
    gateway_endpoints: bool = False
    """Behind the InferenceGateway: a headless Service publishing the ready pods, through which it finds them."""


class LLMServing(pulumi.ComponentResource):
    workload: k8s.apps.v1.Deployment | k8s.apps.v1.StatefulSet | k8s.apiextensions.CustomResource
    service: k8s.core.v1.Service
    endpoint: pulumi.Output[str]
    """Where clients reach the OpenAI API: https://host when an Ingress exists, else the in-cluster URL."""

    def __init__(self, name: str, args: LLMServingArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("llm-platform:index:LLMServing", name, None, opts)
        model = args.model
        if not isinstance(model, PlannedModel):
            raise TypeError(f"LLMServing needs a planned model (llm_platform.stack plans the rollout and the startup "
                            f"probe budget), not a {type(model).__name__}")
        child = pulumi.ResourceOptions(parent=self)
        common = labels(model.name)

        def meta(object_name: str) -> dict[str, Any]:
            return {"name": object_name, "namespace": args.namespace, "labels": common}

        template = {
            "metadata": {"labels": common,
                         "annotations": {**(args.pod_annotations or {}), **source_annotations(model)}},
            "spec": pod_spec(model, service_account=args.service_account, api_key_secret=args.api_key_secret,
                             scheduling=args.scheduling, gpu_resource=args.gpu_resource),
        }
        if not template["metadata"]["annotations"]:
            del template["metadata"]["annotations"]

        # When the HPA owns the replica count, `pulumi up` must not reset it to the configured start value.
        replica_opts = pulumi.ResourceOptions(parent=self, ignore_changes=["spec.replicas"]) \
            if model.config.autoscaling.enabled else child

        self.headless_service = None
        storage_ready = list(args.storage_ready or [])
        if model.config.workload == "leaderworkerset":
            def group_template(role: str) -> dict[str, Any]:
                metadata = {**template["metadata"], "labels": {**template["metadata"]["labels"], ROLE_LABEL: role}}
                if role == "worker" and "annotations" in metadata:
                    # Workers serve no /metrics: Prometheus scrape hints belong on the leaders only.
                    metadata["annotations"] = {k: v for k, v in metadata["annotations"].items()
                                               if not k.startswith("prometheus.io/")}
                    if not metadata["annotations"]:
                        del metadata["annotations"]
                return {**template, "metadata": metadata,
                        "spec": pod_spec(model, service_account=args.service_account,
                                         api_key_secret=args.api_key_secret, scheduling=args.scheduling,
                                         gpu_resource=args.gpu_resource, role="server" if role == "leader" else role)}

            self.workload = k8s.apiextensions.CustomResource(
                f"{name}-leaderworkerset", api_version=LWS_API, kind="LeaderWorkerSet",
                metadata=meta(workload_name(model.config)),
                spec=leader_worker_set_spec(model, group_template("leader"), group_template("worker")),
                opts=pulumi.ResourceOptions.merge(replica_opts, pulumi.ResourceOptions(depends_on=storage_ready)))
        elif model.config.workload == "deployment":
            self.workload = k8s.apps.v1.Deployment(
                f"{name}-deployment", metadata=meta(model.name),
                spec={
                    "replicas": model.config.replicas,
                    "revisionHistoryLimit": 5,
                    # Past the default 600 s a large model's start (pull, check, load) reads as a failed rollout.
                    "progressDeadlineSeconds": args.progress_deadline_seconds,
                    "selector": {"matchLabels": selector_labels(model.name)},
                    "strategy": {"type": "RollingUpdate", "rollingUpdate": {
                        "maxSurge": model.rollout.max_surge, "maxUnavailable": model.rollout.max_unavailable}},
                    "template": template,
                },
                opts=pulumi.ResourceOptions.merge(replica_opts, pulumi.ResourceOptions(depends_on=storage_ready)))
        else:
            self.headless_service = k8s.core.v1.Service(
                f"{name}-headless", metadata=meta(f"{model.name}-headless"),
                spec={"clusterIP": "None", "selector": selector_labels(model.name), "publishNotReadyAddresses": True,
                      "ports": [{"name": PORT_NAME, "port": SERVING_PORT, "targetPort": PORT_NAME,
                                 "protocol": "TCP"}]},
                opts=child)
            self.workload = k8s.apps.v1.StatefulSet(
                f"{name}-statefulset", metadata=meta(model.name),
                spec={
                    "replicas": model.config.replicas,
                    "serviceName": f"{model.name}-headless",
                    # Pods load weights independently; starting them one by one only multiplies cold start.
                    "podManagementPolicy": "Parallel",
                    "revisionHistoryLimit": 5,
                    "selector": {"matchLabels": selector_labels(model.name)},
                    "updateStrategy": {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxUnavailable": max(1, model.rollout.max_unavailable)}},
                    "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
                    "template": template,
                    "volumeClaimTemplates": [{
                        "metadata": {"name": model.storage.template_name, "labels": volume_labels(model)},
                        "spec": model_claim_spec(model),
                    }],
                },
                opts=pulumi.ResourceOptions.merge(replica_opts, pulumi.ResourceOptions(depends_on=storage_ready)))

        self.service = k8s.core.v1.Service(
            f"{name}-service", metadata=meta(model.name), spec=service_spec(model), opts=child)

        self.endpoints_service = None
        if args.gateway_endpoints:
            # Ready pods only (publishNotReadyAddresses false): a starting or draining pod gets no new request.
            # On a LeaderWorkerSet, the leaders only: workers serve no HTTP.
            self.endpoints_service = k8s.core.v1.Service(
                f"{name}-endpoints", metadata=meta(f"{model.name}-endpoints"),
                spec={"clusterIP": "None", "selector": service_selector(model), "publishNotReadyAddresses": False,
                      "ports": [{"name": PORT_NAME, "port": SERVING_PORT, "targetPort": PORT_NAME,
                                 "protocol": "TCP"}]},
                opts=child)

        self.hpa = None
        self.scaled_object = None
        kind = {"deployment": "Deployment", "statefulset": "StatefulSet",
                "leaderworkerset": "LeaderWorkerSet"}[model.config.workload]
        target = workload_name(model.config)
        after_workload = pulumi.ResourceOptions(parent=self, depends_on=[self.workload])
        if model.config.autoscaling.enabled and model.config.autoscaling.mode == "hpa":
            self.hpa = k8s.autoscaling.v2.HorizontalPodAutoscaler(
                f"{name}-hpa", metadata=meta(f"{model.name}-hpa"),
                spec=hpa_spec(model, kind, args.target_load_per_replica, target), opts=after_workload)
        elif model.config.autoscaling.enabled:
            self.scaled_object = k8s.apiextensions.CustomResource(
                f"{name}-scaledobject", api_version="keda.sh/v1alpha1", kind="ScaledObject",
                metadata=meta(model.name),
                spec=keda_scaled_object_spec(model, kind, query=args.load_query, prometheus_url=args.prometheus_url,
                                             target_load=args.target_load_per_replica, name=target),
                opts=after_workload)

        self.ingress = None
        if args.ingress.enabled and args.host:
            self.ingress = k8s.networking.v1.Ingress(
                f"{name}-ingress",
                metadata={**meta(model.name), "annotations": ingress_annotations(args.ingress)},
                spec=ingress_spec(args.ingress, args.host, model, args.tls_secret_name),
                opts=child)
            scheme = "https" if args.ingress.tls else "http"
            self.endpoint = pulumi.Output.from_input(f"{scheme}://{args.host}/v1")
        else:
            self.endpoint = pulumi.Output.concat(
                "http://", model.name, ".", args.namespace, f".svc.cluster.local:{model.config.service_port}/v1")

        self.register_outputs({"endpoint": self.endpoint, "workload": workload_name(model.config),
                               "service": model.name})


def service_spec(model: PlannedModel) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": model.config.service_type,
        "selector": service_selector(model),
        "ports": [{"name": PORT_NAME, "port": model.config.service_port, "targetPort": PORT_NAME, "protocol": "TCP"}],
    }
    if model.config.service_type == "LoadBalancer":
        # Validation requires the ranges: a load balancer without them is plain HTTP open to the internet.
        spec["loadBalancerSourceRanges"] = list(model.config.load_balancer_source_ranges)
        spec["externalTrafficPolicy"] = model.config.external_traffic_policy
    return spec


def ingress_annotations(ingress: IngressConfig) -> dict[str, str]:
    annotations = dict(ingress.annotations)
    if ingress.tls:
        annotations["cert-manager.io/cluster-issuer"] = ingress.cluster_issuer
    return annotations


def ingress_spec(ingress: IngressConfig, host: str, model: PlannedModel, tls_secret_name: str) -> dict[str, Any]:
    """`spec.ingressClassName`, not the deprecated `kubernetes.io/ingress.class` annotation. Only the OpenAI API
    (`/v1`) is routed: `/metrics` and `/health/*` stay inside the cluster, for Prometheus and the kubelet."""
    spec: dict[str, Any] = {
        "ingressClassName": ingress.class_name,
        "rules": [{"host": host, "http": {"paths": [{
            "path": "/v1", "pathType": "Prefix",
            "backend": {"service": {"name": model.name, "port": {"number": model.config.service_port}}},
        }]}}],
    }
    if ingress.tls:
        spec["tls"] = [{"hosts": [host], "secretName": tls_secret_name}]
    return spec
