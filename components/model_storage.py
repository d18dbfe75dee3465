"""ModelStorage: one model's volume, how it is filled from a pinned source, and its backups.

- The model claim (Deployment: one ReadWriteMany claim shared by the replicas; a `pvc://` source uses an existing
  claim instead; a StatefulSet's per-replica volumes come from its volumeClaimTemplates, built here too), created
  from a VolumeSnapshot when `storage.restoreFromSnapshot` is set.
- A fill Job per model and source revision (`python -m serving.fetch` from the serving image): downloads into a
  temporary directory, verifies, writes a manifest and renames into place; `pulumi up` waits for it, then the
  workload rolls (its pod template carries the revision). A StatefulSet's per-replica volumes are created here
  ahead of its pods (one per ordinal up to maxReplicas, under the names its volumeClaimTemplates give, so it adopts
  them), each with its own fill Job, placed beside that replica's pod (a ReadWriteOnce volume mounts on one node).
  Serving pods never download: only fill pods may reach the source.
- The fill's egress NetworkPolicy: its source on one port, nothing else (DNS comes from the namespace policy).
- A snapscheduler SnapshotSchedule for the model volumes, with retention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from llm_platform.builders import (
    FILL_LABEL,
    PART_OF,
    fetch_container,
    labels,
    model_volume_name,
    namespace_selector,
    pod_security_context,
    source_annotations,
    source_credentials_volume,
)
from llm_platform.config import BackupsConfig, dns_name, fill_job_name, model_max_replicas
from llm_platform.model_source import parse_source
from llm_platform.plan import PlannedModel

VOLUME_LABEL = "llm-platform/model-volume"
"""On every model volume: the snapshot schedule selects the claims by it."""
FILL_COMPONENT = "model-fill"
SNAPSHOT_API = "snapshot.storage.k8s.io"
NON_PUBLIC_IPV4 = ["10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"]
"""Excluded from a `0.0.0.0/0` egress: the cluster's own networks and the cloud metadata endpoint."""
NON_PUBLIC_IPV6 = ["fc00::/7", "fe80::/10"]


# ------------------------------------------------------------------------------------------ builders


def volume_labels(model: PlannedModel) -> dict[str, str]:
    return {**labels(model.name), VOLUME_LABEL: model.name}


def model_claim_spec(model: PlannedModel) -> dict[str, Any]:
    access = "ReadWriteOnce" if model.config.workload == "statefulset" else model.storage.access_mode
    spec: dict[str, Any] = {
        "accessModes": [access],
        "storageClassName": model.storage.storage_class,
        "resources": {"requests": {"storage": model.storage.size}},
    }
    if model.storage.restore_from_snapshot:
        spec["dataSource"] = {"apiGroup": SNAPSHOT_API, "kind": "VolumeSnapshot",
                              "name": model.storage.restore_from_snapshot}
    return spec


def fill_labels(model: PlannedModel) -> dict[str, str]:
    """Not the serving pods' `app` label: a Service, PDB or HPA must never count a fill pod."""
    return {"app.kubernetes.io/name": model.name, "app.kubernetes.io/component": FILL_COMPONENT,
            "app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/managed-by": "pulumi", FILL_LABEL: model.name}


def statefulset_claim_names(model: PlannedModel) -> list[str]:
    """The claims a StatefulSet's volumeClaimTemplates name (`<template>-<statefulset>-<ordinal>`), for every ordinal
    up to maxReplicas."""
    return [f"{model.storage.template_name}-{model.name}-{ordinal}"
            for ordinal in range(model_max_replicas(model.config))]


def replica_fill_placement(model: PlannedModel, ordinal: int, scheduling: dict[str, Any]) -> dict[str, Any]:
    """Beside replica `ordinal`'s pod while it runs (its ReadWriteOnce volume is attached to that node, and only
    pods on the same node can mount it), on the GPU nodes (their taints tolerated) so a new volume is provisioned
    where the replica can use it."""
    placement: dict[str, Any] = {k: v for k, v in scheduling.items() if k in ("nodeSelector", "tolerations")}
    placement["affinity"] = {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100,
        "podAffinityTerm": {"labelSelector": {"matchLabels": {
            "statefulset.kubernetes.io/pod-name": f"{model.name}-{ordinal}"}},
            "topologyKey": "kubernetes.io/hostname"}}]}}
    return placement


def fill_job_spec(model: PlannedModel, *, service_account: str, claim_name: str | None = None,
                  placement: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs once per revision; a failed pod is retried and resumes the partial download left on the volume. The retry
    starts only once the failed pod is gone (`podReplacementPolicy: Failed`): two fill pods never write at once."""
    return {
        "backoffLimit": model.config.fill.backoff_limit,
        "podReplacementPolicy": "Failed",
        "activeDeadlineSeconds": model.config.fill.deadline_seconds,
        "template": {
            "metadata": {"labels": fill_labels(model), "annotations": source_annotations(model)},
            "spec": {
                "restartPolicy": "Never",
                "serviceAccountName": service_account,
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": pod_security_context(),
                **(placement or {}),
                # The base model and each LoRA adapter fill their own directories, side by side.
                "containers": [fetch_container(model, fill=True)] + [
                    fetch_container(model, fill=True, adapter=name)
                    for name in sorted(model.config.vllm.lora_adapters)],
                "volumes": [
                    {"name": model_volume_name(model),
                     "persistentVolumeClaim": {"claimName": claim_name or model.storage.claim_name}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": model.config.fill.resources.limits.ephemeral_storage}},
                    *filter(None, [source_credentials_volume(model)]),
                ],
            },
        },
    }


def fill_egress_policy_spec(model: PlannedModel) -> dict[str, Any]:
    """The pods that download (the fill Jobs') reach the source's port and nothing else."""
    peers: list[dict[str, Any]] = []
    for cidr in model.config.fill.egress_cidrs:
        block: dict[str, Any] = {"cidr": cidr}
        if cidr == "0.0.0.0/0":
            block["except"] = NON_PUBLIC_IPV4
        elif cidr == "::/0":
            block["except"] = NON_PUBLIC_IPV6
        peers.append({"ipBlock": block})
    peers.extend({"namespaceSelector": namespace_selector(ns)} for ns in model.config.fill.egress_namespaces)
    return {
        "podSelector": {"matchLabels": {FILL_LABEL: model.name}},
        "policyTypes": ["Egress"],
        "egress": [{"to": peers, "ports": [{"protocol": "TCP", "port": model.config.fill.egress_port}]}],
    }


def snapshot_schedule_spec(model: PlannedModel, backups: BackupsConfig) -> dict[str, Any]:
    retention: dict[str, Any] = {"maxCount": backups.retention}
    if backups.max_age:
        retention["expires"] = backups.max_age
    return {
        "claimSelector": {"matchLabels": {VOLUME_LABEL: model.name}},
        "schedule": backups.schedule,
        "retention": retention,
        "snapshotTemplate": {"snapshotClassName": backups.snapshot_class.name,
                             "labels": {VOLUME_LABEL: model.name}},
    }


def fetches_from_network(model: PlannedModel) -> bool:
    return model.config.source is not None and parse_source(model.config.source).kind != "pvc"


def owns_claim(model: PlannedModel) -> bool:
    source = model.config.source
    return model.config.workload != "statefulset" and not (source and parse_source(source).kind == "pvc")


# ----------------------------------------------------------------------------------------- component


@dataclass(frozen=True)
class ModelStorageArgs:
    namespace: pulumi.Input[str]
    model: PlannedModel
    """The planned model (model_path is the revision directory, claim names resolved)."""
    service_account: str
    network_policies: bool
    backups: BackupsConfig
    scheduling: dict[str, Any] | None = None
    """GpuPool's scheduling fragment: a StatefulSet replica's fill runs on the GPU nodes, beside the replica."""


class ModelStorage(pulumi.ComponentResource):
    claim: k8s.core.v1.PersistentVolumeClaim | None
    fill_job: k8s.batch.v1.Job | None
    replica_claims: list[k8s.core.v1.PersistentVolumeClaim]
    replica_fill_jobs: list[k8s.batch.v1.Job]
    ready: list[pulumi.Resource]
    """What the workload must wait for: the claim, and the fill of the configured revision."""

    def __init__(self, name: str, args: ModelStorageArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("llm-platform:index:ModelStorage", name, None, opts)
        model = args.model
        child = pulumi.ResourceOptions(parent=self)

        def meta(object_name: str, object_labels: dict[str, str],
                 annotations: dict[str, str] | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"name": object_name, "namespace": args.namespace, "labels": object_labels}
            if annotations:
                out["annotations"] = annotations
            return out

        self.claim = None
        self.fill_job = None
        if owns_claim(model):
            self.claim = k8s.core.v1.PersistentVolumeClaim(
                f"{model.name}-model-pvc", metadata=meta(model.storage.claim_name, volume_labels(model)),
                spec=model_claim_spec(model),
                # Earlier releases created the claim under LLMServing: keep its identity, never recreate the volume.
                opts=pulumi.ResourceOptions(parent=self, aliases=[pulumi.Alias(
                    parent=pulumi.create_urn(model.name, "llm-platform:index:LLMServing"))]))

        def fill_job(resource_name: str, job_name: str, claim: k8s.core.v1.PersistentVolumeClaim | None,
                     **spec: Any) -> k8s.batch.v1.Job:
            timeout = f"{model.config.fill.deadline_seconds + 300}s"
            return k8s.batch.v1.Job(
                resource_name,
                metadata=meta(job_name, fill_labels(model), {
                    **source_annotations(model),
                    # A failed fill (bad token, source down) is replaced, so the next `pulumi up` retries it.
                    "pulumi.com/replaceUnready": "true",
                }),
                spec=fill_job_spec(model, service_account=args.service_account, **spec),
                opts=pulumi.ResourceOptions(
                    parent=self, depends_on=[claim] if claim else None,
                    custom_timeouts=pulumi.CustomTimeouts(create=timeout, update=timeout)))

        self.replica_claims, self.replica_fill_jobs = [], []
        if model.config.source is not None and fetches_from_network(model):
            src = parse_source(model.config.source)
            if model.config.workload != "statefulset":  # one shared claim: Deployment, LeaderWorkerSet
                self.fill_job = fill_job(f"{model.name}-fill", fill_job_name(model.config, src.short_id), self.claim)
            else:
                for ordinal, claim_name in enumerate(statefulset_claim_names(model)):
                    claim = k8s.core.v1.PersistentVolumeClaim(
                        f"{model.name}-model-data-{ordinal}", metadata=meta(claim_name, volume_labels(model)),
                        spec=model_claim_spec(model), opts=child)
                    self.replica_claims.append(claim)
                    self.replica_fill_jobs.append(fill_job(
                        f"{model.name}-fill-{ordinal}",
                        dns_name(fill_job_name(model.config, src.short_id)[:58], str(ordinal)),
                        claim, claim_name=claim_name,
                        placement=replica_fill_placement(model, ordinal, args.scheduling or {})))

        self.fill_policy = None
        if args.network_policies and fetches_from_network(model):
            self.fill_policy = k8s.networking.v1.NetworkPolicy(
                f"{model.name}-fill-egress", metadata=meta(f"{model.name}-fill-egress", fill_labels(model)),
                spec=fill_egress_policy_spec(model), opts=child)

        self.snapshot_schedule = None
        if args.backups.enabled and (owns_claim(model) or model.config.workload == "statefulset"):
            self.snapshot_schedule = k8s.apiextensions.CustomResource(
                f"{model.name}-snapshots", api_version="snapscheduler.backube/v1", kind="SnapshotSchedule",
                metadata=meta(f"{model.name}-model-volume", labels(model.name)),
                spec=snapshot_schedule_spec(model, args.backups), opts=child)

        self.ready = [r for r in (self.claim, self.fill_job) if r is not None] + self.replica_fill_jobs
        self.register_outputs({
            "claim": model.storage.claim_name if model.config.workload != "statefulset" else None,
            "modelPath": model.model_path,
            "source": model.config.source,
        })


class VolumeSnapshotClass(pulumi.CustomResource):
    """snapshot.storage.k8s.io/v1 VolumeSnapshotClass (cluster-scoped; its fields sit beside metadata, no spec)."""

    def __init__(self, name: str, *, metadata: dict[str, Any], driver: str, deletion_policy: str,
                 parameters: dict[str, str] | None = None, opts: pulumi.ResourceOptions | None = None):
        props: dict[str, Any] = {"apiVersion": f"{SNAPSHOT_API}/v1", "kind": "VolumeSnapshotClass",
                                 "metadata": metadata, "driver": driver, "deletionPolicy": deletion_policy}
        if parameters:
            props["parameters"] = parameters
        super().__init__(f"kubernetes:{SNAPSHOT_API}/v1:VolumeSnapshotClass", name, props, opts)
