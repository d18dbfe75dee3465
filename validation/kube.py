"""Small helpers over plain manifests: pod templates, containers, label selectors, lookups by name.

They follow the API's own semantics (a LabelSelector's matchLabels AND matchExpressions; an empty selector
selects everything) so the cross-reference checks agree with what the cluster would do.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Manifest = dict[str, Any]

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod", "LeaderWorkerSet")
SCALABLE_KINDS = ("Deployment", "StatefulSet", "ReplicaSet", "LeaderWorkerSet")
LWS_API = "leaderworkerset.x-k8s.io/v1"


def scale_api(kind: str) -> str:
    """The apiVersion an autoscaler's scaleTargetRef must name for a scalable kind."""
    return LWS_API if kind == "LeaderWorkerSet" else "apps/v1"


def name(m: Manifest) -> str:
    return (m.get("metadata") or {}).get("name", "")


def namespace(m: Manifest) -> str:
    return (m.get("metadata") or {}).get("namespace", "")


def of_kind(manifests: list[Manifest], *kinds: str) -> list[Manifest]:
    return [m for m in manifests if m.get("kind") in kinds]


def find(manifests: list[Manifest], kind: str, ns: str, object_name: str) -> Manifest | None:
    for m in manifests:
        if m.get("kind") == kind and namespace(m) == ns and name(m) == object_name:
            return m
    return None


def pod_template(workload: Manifest) -> dict[str, Any]:
    """`{"metadata": ..., "spec": ...}` of the pods a workload runs (the Pod itself for kind Pod)."""
    kind, spec = workload["kind"], workload.get("spec") or {}
    if kind == "Pod":
        return {"metadata": workload.get("metadata") or {}, "spec": spec}
    if kind == "CronJob":
        return ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
    if kind == "LeaderWorkerSet":
        # The leader's template (the worker template when no leader template is given): what a Service targets.
        group = spec.get("leaderWorkerTemplate") or {}
        return group.get("leaderTemplate") or group.get("workerTemplate") or {}
    return spec.get("template") or {}


def pod_templates(workload: Manifest) -> list[dict[str, Any]]:
    """Every pod template of a workload: a LeaderWorkerSet's leader and worker templates, else the one."""
    if workload["kind"] == "LeaderWorkerSet":
        group = (workload.get("spec") or {}).get("leaderWorkerTemplate") or {}
        return [t for t in (group.get("leaderTemplate"), group.get("workerTemplate")) if t]
    return [pod_template(workload)]


def group_size(workload: Manifest) -> int:
    """Pods per replica: a LeaderWorkerSet's group size, else 1."""
    if workload["kind"] != "LeaderWorkerSet":
        return 1
    return int(((workload.get("spec") or {}).get("leaderWorkerTemplate") or {}).get("size", 1))


def pod_labels(workload: Manifest) -> dict[str, str]:
    return (pod_template(workload).get("metadata") or {}).get("labels") or {}


def template_labels(template: dict[str, Any]) -> dict[str, str]:
    return (template.get("metadata") or {}).get("labels") or {}


def workloads(manifests: list[Manifest]) -> list[Manifest]:
    return of_kind(manifests, *WORKLOAD_KINDS)


def containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Init containers, then app containers."""
    yield from pod_spec.get("initContainers") or []
    yield from pod_spec.get("containers") or []


def workload_containers(manifests: list[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    for w in workloads(manifests):
        for template in pod_templates(w):
            for c in containers(template.get("spec") or {}):
                yield w, c


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions). An empty selector matches every label set."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def map_selector_matches(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    """A Service-style plain map selector; an empty map selects nothing (no Endpoints are managed)."""
    if not selector:
        return False
    return all(labels.get(k) == v for k, v in selector.items())


def selected_workloads(manifests: list[Manifest], ns: str, selector: dict[str, Any] | None, *,
                       plain_map: bool = False) -> list[Manifest]:
    match = map_selector_matches if plain_map else selector_matches
    return [w for w in workloads(manifests) if namespace(w) == ns
            and any(match(selector, template_labels(t)) for t in pod_templates(w))]


def container_port_names(container: dict[str, Any]) -> set[str]:
    return {p["name"] for p in container.get("ports") or [] if p.get("name")}


def container_port_numbers(container: dict[str, Any]) -> set[int]:
    return {p["containerPort"] for p in container.get("ports") or [] if "containerPort" in p}


def port_on_container(port: int | str, container: dict[str, Any]) -> bool:
    """A port reference (name or number) resolves on this container's declared ports."""
    if isinstance(port, str) and not port.isdigit():
        return port in container_port_names(container)
    return int(port) in container_port_numbers(container)
