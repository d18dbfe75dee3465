"""Cross-reference checks between rendered objects (what kube-score, kube-linter and Polaris check).

Each check is a function from all manifests of a stack to findings, registered in `CHECKS` under a stable
id. The API server accepts every one of these mistakes; they only show up later as a Service with no
endpoints, an Ingress returning 503, an HPA stuck at `<unknown>`, or a node drain that never finishes.
Single-object sanity checks (names, quantities, env, resources, images) live in `sanity.py`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from validation import kube, sanity
from validation.findings import Finding, resource_id

LAYER = "crossref"
Manifests = list[dict[str, Any]]


def _finding(check: str, m: dict[str, Any], message: str) -> Finding:
    return Finding(LAYER, check, resource_id(m), message)


def service_selects_pods(ms: Manifests) -> list[Finding]:
    out = []
    for svc in kube.of_kind(ms, "Service"):
        spec = svc.get("spec") or {}
        selector = spec.get("selector")
        if spec.get("type") == "ExternalName":
            continue
        if not kube.selected_workloads(ms, kube.namespace(svc), selector, plain_map=True):
            out.append(_finding("service-selects-pods", svc, f"selector {selector} matches no workload's pods"))
    return out


def service_target_port(ms: Manifests) -> list[Finding]:
    out = []
    for svc in kube.of_kind(ms, "Service"):
        spec = svc.get("spec") or {}
        targets = kube.selected_workloads(ms, kube.namespace(svc), spec.get("selector"), plain_map=True)
        for w in targets:
            pod_containers = list(kube.containers(kube.pod_template(w).get("spec") or {}))
            for port in spec.get("ports") or []:
                target = port.get("targetPort", port.get("port"))
                if not any(kube.port_on_container(target, c) for c in pod_containers):
                    out.append(_finding("service-target-port", svc,
                                        f"port {port.get('name') or port.get('port')}: targetPort {target!r} is not a "
                                        f"container port of {resource_id(w)}"))
    return out


def _service_port_exists(svc: dict[str, Any], port: dict[str, Any]) -> bool:
    ports = (svc.get("spec") or {}).get("ports") or []
    if "number" in port:
        return any(p.get("port") == port["number"] for p in ports)
    return any(p.get("name") == port.get("name") for p in ports)


def ingress_backend(ms: Manifests) -> list[Finding]:
    out = []
    for ing in kube.of_kind(ms, "Ingress"):
        spec = ing.get("spec") or {}
        backends = [spec["defaultBackend"]] if "defaultBackend" in spec else []
        for rule in spec.get("rules") or []:
            backends.extend(p.get("backend") or {} for p in (rule.get("http") or {}).get("paths") or [])
        for backend in backends:
            ref = backend.get("service")
            if ref is None:
                continue
            svc = kube.find(ms, "Service", kube.namespace(ing), ref.get("name"))
            if svc is None:
                out.append(_finding("ingress-backend", ing, f"backend Service {ref.get('name')!r} does not exist"))
            elif not _service_port_exists(svc, ref.get("port") or {}):
                out.append(_finding("ingress-backend", ing,
                                    f"backend port {ref.get('port')} is not a port of Service {ref.get('name')!r}"))
    return out


def _hpa_target(ms: Manifests, hpa: dict[str, Any]) -> dict[str, Any] | None:
    ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
    target = kube.find(ms, ref.get("kind", ""), kube.namespace(hpa), ref.get("name", ""))
    if target is None or ref.get("kind") not in kube.SCALABLE_KINDS \
            or ref.get("apiVersion") != kube.scale_api(ref["kind"]):
        return None
    return target


def hpa_target(ms: Manifests) -> list[Finding]:
    out = []
    for hpa in kube.of_kind(ms, "HorizontalPodAutoscaler"):
        if _hpa_target(ms, hpa) is None:
            ref = (hpa.get("spec") or {}).get("scaleTargetRef")
            out.append(_finding("hpa-target", hpa, f"scaleTargetRef {ref} names no Deployment/StatefulSet "
                                                   f"(apps/v1) or LeaderWorkerSet ({kube.LWS_API}) in this namespace"))
    return out


def hpa_metric_requests(ms: Manifests) -> list[Finding]:
    """Utilization targets are relative to requests: a container without the request leaves the HPA blind."""
    out = []
    for hpa in kube.of_kind(ms, "HorizontalPodAutoscaler"):
        target = _hpa_target(ms, hpa)
        if target is None:
            continue
        pod_containers = list(kube.containers(kube.pod_template(target).get("spec") or {}))
        for metric in (hpa.get("spec") or {}).get("metrics") or []:
            source = metric.get("resource") or metric.get("containerResource")
            if not source or (source.get("target") or {}).get("type") != "Utilization":
                continue
            wanted = [c for c in pod_containers if metric.get("type") != "ContainerResource"
                      or c.get("name") == source.get("container")]
            for c in wanted:
                if source["name"] not in ((c.get("resources") or {}).get("requests") or {}):
                    out.append(_finding("hpa-metric-requests", hpa,
                                        f"{source['name']} utilization target, but container {c.get('name')!r} of "
                                        f"{resource_id(target)} has no {source['name']} request"))
    return out


def pdb_selector(ms: Manifests) -> list[Finding]:
    out = []
    for pdb in kube.of_kind(ms, "PodDisruptionBudget"):
        selector = (pdb.get("spec") or {}).get("selector")
        if not kube.selected_workloads(ms, kube.namespace(pdb), selector):
            out.append(_finding("pdb-selector", pdb, f"selector {selector} matches no workload's pods"))
    return out


def _scaled_object_target(ms: Manifests, scaled: dict[str, Any]) -> dict[str, Any] | None:
    ref = (scaled.get("spec") or {}).get("scaleTargetRef") or {}
    kind = ref.get("kind", "Deployment")
    target = kube.find(ms, kind, kube.namespace(scaled), ref.get("name", ""))
    if target is None or kind not in kube.SCALABLE_KINDS or ref.get("apiVersion", "apps/v1") != kube.scale_api(kind):
        return None
    return target


def _min_replicas(ms: Manifests, workload: dict[str, Any]) -> int:
    """The fewest running pods: an HPA's minReplicas, a ScaledObject's minReplicaCount (at least 1: at zero
    there is nothing to drain), else spec.replicas."""
    for hpa in kube.of_kind(ms, "HorizontalPodAutoscaler"):
        if _hpa_target(ms, hpa) is workload:
            return int(hpa["spec"].get("minReplicas", 1))
    for scaled in kube.of_kind(ms, "ScaledObject"):
        if _scaled_object_target(ms, scaled) is workload:
            return max(1, int(scaled["spec"].get("minReplicaCount", 0)))
    return int((workload.get("spec") or {}).get("replicas", 1))


def scaledobject_target(ms: Manifests) -> list[Finding]:
    """A KEDA ScaledObject scales an existing workload, and nothing else autoscales it (two HPAs fight)."""
    out = []
    for scaled in kube.of_kind(ms, "ScaledObject"):
        target = _scaled_object_target(ms, scaled)
        if target is None:
            out.append(_finding("scaledobject-target", scaled, f"scaleTargetRef {scaled['spec'].get('scaleTargetRef')} "
                                                               "names no Deployment/StatefulSet (apps/v1) here"))
            continue
        rivals = [h for h in kube.of_kind(ms, "HorizontalPodAutoscaler") if _hpa_target(ms, h) is target]
        if rivals:
            out.append(_finding("scaledobject-target", scaled, f"{resource_id(target)} is also scaled by "
                                                               f"{resource_id(rivals[0])}; KEDA creates its own HPA"))
    return out


def _scaled(value: int | str, total: int) -> int:
    """intstr percentages are rounded up, as the disruption controller does."""
    if isinstance(value, str) and value.endswith("%"):
        return math.ceil(total * int(value[:-1]) / 100)
    return int(value)


def pdb_allows_disruption(ms: Manifests) -> list[Finding]:
    out = []
    for pdb in kube.of_kind(ms, "PodDisruptionBudget"):
        spec = pdb.get("spec") or {}
        matched = [w for w in kube.selected_workloads(ms, kube.namespace(pdb), spec.get("selector"))
                   if w["kind"] in kube.SCALABLE_KINDS]
        if not matched:
            continue
        pods = sum(_min_replicas(ms, w) * kube.group_size(w) for w in matched)
        if "maxUnavailable" in spec:
            allowed = min(_scaled(spec["maxUnavailable"], pods), pods)
        else:
            allowed = pods - _scaled(spec.get("minAvailable", 0), pods)
        if allowed < 1:
            budget = {k: spec[k] for k in ("minAvailable", "maxUnavailable") if k in spec}
            out.append(_finding("pdb-allows-disruption", pdb,
                                f"{budget} allows {max(allowed, 0)} voluntary disruptions at the minimum of {pods} "
                                "pod(s), so every node drain blocks"))
    return out


def _policy_types(policy: dict[str, Any]) -> set[str]:
    spec = policy.get("spec") or {}
    if "policyTypes" in spec:
        return set(spec["policyTypes"])
    return {"Ingress", "Egress"} if "egress" in spec else {"Ingress"}


def networkpolicy_covers_pods(ms: Manifests) -> list[Finding]:
    """Every pod is selected by policies that restrict both its ingress and its egress (kube-score)."""
    out = []
    for w in kube.workloads(ms):
        for template in kube.pod_templates(w):
            covered: set[str] = set()
            for policy in kube.of_kind(ms, "NetworkPolicy"):
                if kube.namespace(policy) == kube.namespace(w) and kube.selector_matches(
                        (policy.get("spec") or {}).get("podSelector"), kube.template_labels(template)):
                    covered |= _policy_types(policy)
            missing = {"Ingress", "Egress"} - covered
            if missing:
                out.append(_finding("networkpolicy-covers-pods", w,
                                    f"no NetworkPolicy restricts {' or '.join(sorted(missing))} for its pods "
                                    f"{kube.template_labels(template)}"))
    return out


def networkpolicy_selects_pods(ms: Manifests) -> list[Finding]:
    """A policy with a non-empty podSelector that selects nothing is dead (kube-linter dangling-networkpolicy)."""
    out = []
    for policy in kube.of_kind(ms, "NetworkPolicy"):
        selector = (policy.get("spec") or {}).get("podSelector") or {}
        if selector and not kube.selected_workloads(ms, kube.namespace(policy), selector):
            out.append(_finding("networkpolicy-selects-pods", policy, f"podSelector {selector} matches no pods"))
    return out


def probe_ports(ms: Manifests) -> list[Finding]:
    out = []
    for w, c in kube.workload_containers(ms):
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.get(probe_name) or {}
            for handler in ("httpGet", "tcpSocket", "grpc"):
                port = (probe.get(handler) or {}).get("port")
                if port is not None and not kube.port_on_container(port, c):
                    out.append(_finding("probe-ports", w, f"container {c.get('name')!r} {probe_name}.{handler}.port "
                                                          f"{port!r} is not one of its ports"))
    return out


def workload_selector(ms: Manifests) -> list[Finding]:
    out = []
    for w in kube.workloads(ms):
        if w["kind"] in ("Pod", "CronJob", "Job", "LeaderWorkerSet"):
            continue
        selector = (w.get("spec") or {}).get("selector")
        if not selector or not kube.selector_matches(selector, kube.pod_labels(w)):
            out.append(_finding("workload-selector", w, f"selector {selector} does not match the pod template labels "
                                                        f"{kube.pod_labels(w)}"))
    return out


def statefulset_service(ms: Manifests) -> list[Finding]:
    """A StatefulSet's serviceName must be an existing headless Service selecting its pods (kube-score)."""
    out = []
    for sts in kube.of_kind(ms, "StatefulSet"):
        service_name = (sts.get("spec") or {}).get("serviceName")
        svc = kube.find(ms, "Service", kube.namespace(sts), service_name or "")
        if svc is None or svc["spec"].get("clusterIP") != "None" \
                or not kube.map_selector_matches(svc["spec"].get("selector"), kube.pod_labels(sts)):
            out.append(_finding("statefulset-service", sts, f"serviceName {service_name!r} is not a headless Service "
                                                            "selecting its pods"))
    return out


_BUILTIN = {("ServiceAccount", "default"), ("PriorityClass", "system-cluster-critical"),
            ("PriorityClass", "system-node-critical")}


def pod_references(ms: Manifests) -> list[Finding]:
    """ServiceAccount, PriorityClass, PVCs, Secrets and ConfigMaps a pod uses exist; mounts name volumes."""
    out = []
    for w, template in ((workload, t) for workload in kube.workloads(ms) for t in kube.pod_templates(workload)):
        ns, spec = kube.namespace(w), template.get("spec") or {}
        wanted: list[tuple[str, str, str]] = []
        if spec.get("serviceAccountName"):
            wanted.append(("ServiceAccount", ns, spec["serviceAccountName"]))
        if spec.get("priorityClassName"):
            wanted.append(("PriorityClass", "", spec["priorityClassName"]))
        for volume in spec.get("volumes") or []:
            if "persistentVolumeClaim" in volume:
                wanted.append(("PersistentVolumeClaim", ns, volume["persistentVolumeClaim"].get("claimName", "")))
            if "secret" in volume and not volume["secret"].get("optional"):
                wanted.append(("Secret", ns, volume["secret"].get("secretName", "")))
            if "configMap" in volume and not volume["configMap"].get("optional"):
                wanted.append(("ConfigMap", ns, volume["configMap"].get("name", "")))
        for kind, ref_ns, ref in wanted:
            if (kind, ref) not in _BUILTIN and kube.find(ms, kind, ref_ns, ref) is None:
                out.append(_finding("pod-references", w, f"uses {kind} {ref!r}, which is not rendered"))
        volume_names = {v.get("name") for v in spec.get("volumes") or []}
        volume_names |= {kube.name(t) for t in (w.get("spec") or {}).get("volumeClaimTemplates") or []}
        for c in kube.containers(spec):
            for mount in c.get("volumeMounts") or []:
                if mount.get("name") not in volume_names:
                    out.append(_finding("pod-references", w, f"container {c.get('name')!r} mounts volume "
                                                             f"{mount.get('name')!r}, which the pod does not define"))
    return out


def servicemonitor_target(ms: Manifests) -> list[Finding]:
    """A ServiceMonitor selects a Service whose named port exists (the operator matches Service port names)."""
    out = []
    for sm in kube.of_kind(ms, "ServiceMonitor"):
        spec = sm.get("spec") or {}
        ns_selector = spec.get("namespaceSelector") or {}
        namespaces = None if ns_selector.get("any") else set(ns_selector.get("matchNames") or [kube.namespace(sm)])
        services = [s for s in kube.of_kind(ms, "Service")
                    if (namespaces is None or kube.namespace(s) in namespaces)
                    and kube.selector_matches(spec.get("selector"), (s.get("metadata") or {}).get("labels") or {})]
        if not services:
            out.append(_finding("servicemonitor-target", sm, f"selector {spec.get('selector')} matches no Service "
                                                             "labels"))
            continue
        for endpoint in spec.get("endpoints") or []:
            port = endpoint.get("port")
            names = {p.get("name") for s in services for p in (s.get("spec") or {}).get("ports") or []}
            if port is not None and port not in names:
                out.append(_finding("servicemonitor-target", sm, f"endpoint port {port!r} is not a named port of "
                                                                 f"{', '.join(resource_id(s) for s in services)}"))
    return out


def leaderworkerset_groups(ms: Manifests) -> list[Finding]:
    """A LeaderWorkerSet group serves through its leader only and lives or dies as a whole: a Service that selects
    workers sends clients to pods with no API; a group that does not recreate on a pod restart keeps serving with
    a pipeline stage missing (hangs); `LeaderReady` never starts workers whose leader waits for them; a PDB must
    select the whole group, so that a drain counts the group it takes down."""
    out = []
    for lws in kube.of_kind(ms, "LeaderWorkerSet"):
        spec = lws.get("spec") or {}
        group = spec.get("leaderWorkerTemplate") or {}
        templates = kube.pod_templates(lws)
        leader, workers = templates[0], templates[-1]
        size = kube.group_size(lws)
        if size > 1 and group.get("restartPolicy", "RecreateGroupOnPodRestart") != "RecreateGroupOnPodRestart":
            out.append(_finding("leaderworkerset-groups", lws, f"restartPolicy {group.get('restartPolicy')!r}: a "
                                                               "group must be recreated when one of its pods restarts"))
        leader_container = ((leader.get("spec") or {}).get("containers") or [{}])[0]
        if size > 1 and not {"livenessProbe", "readinessProbe"} <= set(leader_container):
            out.append(_finding("leaderworkerset-groups", lws, "the leader has no liveness and readiness probes: "
                                                               "they are the group's health (workers are headless)"))
        if size > 1 and spec.get("startupPolicy") == "LeaderReady":
            out.append(_finding("leaderworkerset-groups", lws, "startupPolicy LeaderReady: the leader becomes ready "
                                                               "only once its workers joined, which start after it"))
        for svc in kube.of_kind(ms, "Service"):
            selector = (svc.get("spec") or {}).get("selector")
            if kube.namespace(svc) != kube.namespace(lws) or not selector:
                continue
            if size > 1 and kube.map_selector_matches(selector, kube.template_labels(workers)):
                out.append(_finding("leaderworkerset-groups", svc, f"selector {selector} selects the worker pods of "
                                                                   f"{resource_id(lws)}; select the leaders only"))
        for pdb in kube.of_kind(ms, "PodDisruptionBudget"):
            selector = (pdb.get("spec") or {}).get("selector")
            if kube.namespace(pdb) != kube.namespace(lws):
                continue
            matches = [kube.selector_matches(selector, kube.template_labels(t)) for t in (leader, workers)]
            if any(matches) and not all(matches):
                out.append(_finding("leaderworkerset-groups", pdb, f"selects only part of the groups of "
                                                                   f"{resource_id(lws)}; select leaders and workers"))
            budget = (pdb.get("spec") or {}).get("maxUnavailable")
            if all(matches) and isinstance(budget, int) and budget % size:
                out.append(_finding("leaderworkerset-groups", pdb, f"maxUnavailable {budget} is not whole groups of "
                                                                   f"{size} pods of {resource_id(lws)}"))
    return out


CHECKS: dict[str, Callable[[Manifests], list[Finding]]] = {
    "service-selects-pods": service_selects_pods,
    "service-target-port": service_target_port,
    "ingress-backend": ingress_backend,
    "hpa-target": hpa_target,
    "hpa-metric-requests": hpa_metric_requests,
    "scaledobject-target": scaledobject_target,
    "pdb-selector": pdb_selector,
    "pdb-allows-disruption": pdb_allows_disruption,
    "networkpolicy-covers-pods": networkpolicy_covers_pods,
    "networkpolicy-selects-pods": networkpolicy_selects_pods,
    "probe-ports": probe_ports,
    "workload-selector": workload_selector,
    "statefulset-service": statefulset_service,
    "pod-references": pod_references,
    "servicemonitor-target": servicemonitor_target,
    "leaderworkerset-groups": leaderworkerset_groups,
    **sanity.CHECKS,
}


def check_crossref(manifests: Manifests) -> list[Finding]:
    """Every cross-reference and sanity check over one stack's manifests."""
    return [finding for check in CHECKS.values() for finding in check(manifests)]
