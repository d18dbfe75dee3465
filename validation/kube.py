"""Small helpers over plain manifests: pod templates, containers, label selectors, lookups by name.

They follow the API's own semantics (a LabelSelector's matchLabels AND matchExpressions; an empty selector
selects everything) so the cross-reference checks agree with what the cluster would do.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Manifest = dict[str, Any]

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod")
SCALABLE_KINDS = ("Deployment", "StatefulSet", "ReplicaSet")


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
    return spec.get("template") or {}


def pod_labels(workload: Manifest) -> dict[str, str]:
    return (pod_template(workload).get("metadata") or {}).get("labels") or {}


def workloads(manifests: list[Manifest]) -> list[Manifest]:
    return of_kind(manifests, *WORKLOAD_KINDS)


def containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Init containers, then app containers."""
    yield from pod_spec.get("initContainers") or []
    yield from pod_spec.get("containers") or []


def workload_containers(manifests: list[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    for w in workloads(manifests):
        for c in containers(pod_template(w).get("spec") or {}):
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
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selected_workloads(manifests: list[Manifest], ns: str, selector: dict[str, Any] | None, *,
                       plain_map: bool = False) -> list[Manifest]:
    match = map_selector_matches if plain_map else selector_matches
    return [w for w in workloads(manifests) if namespace(w) == ns and match(selector, pod_labels(w))]


def container_port_names(container: dict[str, Any]) -> set[str]:
    return {p["name"] for p in container.get("ports") or [] if p.get("name")}


def container_port_numbers(container: dict[str, Any]) -> set[int]:
    return {p["containerPort"] for p in container.get("ports") or [] if "containerPort" in p}


def port_on_container(port: int | str, container: dict[str, Any]) -> bool:
    """A port reference (name or number) resolves on this container's declared ports."""
    if isinstance(port, str) and not port.isdigit():
        return port in container_port_names(container)
    return int(port) in container_port_numbers(container)
