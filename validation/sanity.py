"""Single-object sanity checks on rendered manifests: names, quantities, env, resources and image tags.

Registered in `CHECKS` and run with the cross-reference checks (layer `crossref`). Each mirrors a rule of
kube-score, kube-linter or Polaris, or a rule the API server applies only at admission time.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from llm_platform.quantities import QuantityError, parse_quantity
from validation import kube
from validation.findings import Finding, resource_id

LAYER = "crossref"
Manifests = list[dict[str, Any]]

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?!-))*(?<!-)$")
"""Container port names: at most 15 characters, lowercase letters, digits and single hyphens, one letter."""

LABEL_NAMED = {"Namespace"}
"""Kinds whose names are DNS-1123 labels; Services are stricter still (RFC 1035: start with a letter)."""
REQUIRED_RESOURCES = ("cpu", "memory", "ephemeral-storage")
SECRET_WORDS = {"KEY", "KEYS", "APIKEY", "TOKEN", "PASSWORD", "PASSWD", "PWD", "SECRET", "SECRETS",
                "CREDENTIAL", "CREDENTIALS"}
FILE_POINTER_SUFFIXES = ("_FILE", "_FILES", "_PATH", "_DIR")


def _finding(check: str, m: dict[str, Any], message: str) -> Finding:
    return Finding(LAYER, check, resource_id(m), message)


def _name_problem(value: object, pattern: re.Pattern[str], max_len: int) -> bool:
    return not isinstance(value, str) or len(value) > max_len or not pattern.match(value)


def dns1123_names(ms: Manifests) -> list[Finding]:
    """Object, namespace, container, volume and port names the API server would reject at apply time."""
    out = []
    for m in ms:
        meta = m.get("metadata") or {}
        if m.get("kind") == "Service":
            rule, pattern, limit = "an RFC 1035 label", DNS1035_LABEL, 63
        elif m.get("kind") in LABEL_NAMED:
            rule, pattern, limit = "a DNS-1123 label", DNS1123_LABEL, 63
        else:
            rule, pattern, limit = "a DNS-1123 subdomain", DNS1123_SUBDOMAIN, 253
        if _name_problem(meta.get("name"), pattern, limit):
            out.append(_finding("dns1123-names", m, f"metadata.name {meta.get('name')!r} is not {rule}"))
        if "namespace" in meta and _name_problem(meta["namespace"], DNS1123_LABEL, 63):
            out.append(_finding("dns1123-names", m,
                                f"metadata.namespace {meta['namespace']!r} is not a DNS-1123 label"))
        if m.get("kind") == "Service":
            for port in (m.get("spec") or {}).get("ports") or []:
                if "name" in port and _name_problem(port["name"], DNS1123_LABEL, 63):
                    out.append(_finding("dns1123-names", m, f"port name {port['name']!r} is not a DNS-1123 label"))
    for w, template in ((workload, t) for workload in kube.workloads(ms) for t in kube.pod_templates(workload)):
        spec = template.get("spec") or {}
        for volume in spec.get("volumes") or []:
            if _name_problem(volume.get("name"), DNS1123_LABEL, 63):
                out.append(_finding("dns1123-names", w, f"volume name {volume.get('name')!r} is not a DNS-1123 label"))
        for c in kube.containers(spec):
            if _name_problem(c.get("name"), DNS1123_LABEL, 63):
                out.append(_finding("dns1123-names", w, f"container name {c.get('name')!r} is not a DNS-1123 label"))
            for port in c.get("ports") or []:
                if "name" in port and _name_problem(port["name"], IANA_SVC_NAME, 15):
                    out.append(_finding("dns1123-names", w, f"container port name {port['name']!r} is not an "
                                                            "IANA service name (<= 15 chars, a-z0-9 and '-')"))
    return out


def _quantity_fields(m: dict[str, Any]) -> list[tuple[str, Any]]:
    """(where, value) of every resource quantity the manifest sets."""
    kind, spec = m.get("kind"), m.get("spec") or {}
    found: list[tuple[str, Any]] = []

    def amounts(where: str, mapping: dict[str, Any] | None) -> None:
        found.extend((f"{where}.{key}", value) for key, value in (mapping or {}).items())

    if kind == "ResourceQuota":
        amounts("spec.hard", spec.get("hard"))
    if kind == "LimitRange":
        for i, item in enumerate(spec.get("limits") or []):
            for section in ("default", "defaultRequest", "max", "min", "maxLimitRequestRatio"):
                amounts(f"spec.limits[{i}].{section}", item.get(section))
    if kind == "PersistentVolumeClaim":
        for section in ("requests", "limits"):
            amounts(f"spec.resources.{section}", (spec.get("resources") or {}).get(section))
    if kind in kube.WORKLOAD_KINDS:
        for i, template in enumerate(spec.get("volumeClaimTemplates") or []):
            amounts(f"spec.volumeClaimTemplates[{i}].spec.resources.requests",
                    ((template.get("spec") or {}).get("resources") or {}).get("requests"))
        for template in kube.pod_templates(m):
            pod = template.get("spec") or {}
            for c in kube.containers(pod):
                for section in ("requests", "limits"):
                    amounts(f"container {c.get('name')!r} {section}", (c.get("resources") or {}).get(section))
            for volume in pod.get("volumes") or []:
                if "sizeLimit" in (volume.get("emptyDir") or {}):
                    found.append((f"volume {volume.get('name')!r} emptyDir.sizeLimit",
                                  volume["emptyDir"]["sizeLimit"]))
    return found


def quantities(ms: Manifests) -> list[Finding]:
    out = []
    for m in ms:
        for where, value in _quantity_fields(m):
            try:
                if parse_quantity(value) < 0:
                    out.append(_finding("quantities", m, f"{where}: {value!r} is negative"))
            except QuantityError as exc:
                out.append(_finding("quantities", m, f"{where}: {exc}"))
    return out


def _parsed(value: Any) -> Any:
    try:
        return parse_quantity(value)
    except QuantityError:
        return None


def requests_within_limits(ms: Manifests) -> list[Finding]:
    """requests <= limits; extended resources (GPUs) need requests == limits, or the API server refuses the pod."""
    out = []
    for w, c in kube.workload_containers(ms):
        resources = c.get("resources") or {}
        requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
        for key in sorted(set(requests) & set(limits)):
            request, limit = _parsed(requests[key]), _parsed(limits[key])
            if request is None or limit is None:
                continue
            extended = "/" in key and not key.startswith(("hugepages-", "kubernetes.io/"))
            if request > limit or (extended and request != limit):
                rule = "must equal" if extended else "must not exceed"
                out.append(_finding("requests-within-limits", w, f"container {c.get('name')!r}: {key} request "
                                                                 f"{requests[key]} {rule} the limit {limits[key]}"))
    return out


def container_resources(ms: Manifests) -> list[Finding]:
    out = []
    for w, c in kube.workload_containers(ms):
        resources = c.get("resources") or {}
        for section in ("requests", "limits"):
            missing = [r for r in REQUIRED_RESOURCES if r not in (resources.get(section) or {})]
            if missing:
                out.append(_finding("container-resources", w, f"container {c.get('name')!r} has no {section} for "
                                                              f"{', '.join(missing)}"))
    return out


def _looks_secret(env_name: str) -> bool:
    words = set(re.split(r"[_\-.]", env_name.upper()))
    return bool(words & SECRET_WORDS) or "PASSWORD" in env_name.upper() or "SECRET" in env_name.upper()


def _points_into_mount(env_name: str, value: str, container: dict[str, Any]) -> bool:
    """`API_KEYS_FILE=/var/run/secrets/...`: a path into a mounted volume names a secret, it does not hold one."""
    if not env_name.upper().endswith(FILE_POINTER_SUFFIXES) or not value.startswith("/"):
        return False
    mounts = [m.get("mountPath", "").rstrip("/") for m in container.get("volumeMounts") or []]
    return any(mount and (value == mount or value.startswith(mount + "/")) for mount in mounts)


def env_secret_literal(ms: Manifests) -> list[Finding]:
    """Secret-looking variables must come from a Secret (valueFrom), never a literal in the manifest."""
    out = []
    for w, c in kube.workload_containers(ms):
        for var in c.get("env") or []:
            env_name, value = var.get("name", ""), var.get("value")
            if value and _looks_secret(env_name) and not _points_into_mount(env_name, str(value), c):
                out.append(_finding("env-secret-literal", w, f"container {c.get('name')!r} sets {env_name} as a "
                                                             "literal; use valueFrom.secretKeyRef or a mounted file"))
    return out


def env_duplicates(ms: Manifests) -> list[Finding]:
    out = []
    for w, c in kube.workload_containers(ms):
        seen: set[str] = set()
        for var in c.get("env") or []:
            if var.get("name") in seen:
                out.append(_finding("env-duplicates", w, f"container {c.get('name')!r} sets {var.get('name')} twice; "
                                                         "the last one silently wins"))
            seen.add(var.get("name"))
    return out


def image_reference_problem(image: str | None) -> str | None:
    """None when the image is pinned by digest or a version tag; else why it is not."""
    if not image:
        return "no image"
    if "@" in image:
        return None if re.search(r"@sha256:[0-9a-f]{64}$", image) else f"{image!r} has a malformed digest"
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"{image!r} has no tag (pulls `latest`)"
    if last.rsplit(":", 1)[1] == "latest":
        return f"{image!r} uses the moving tag `latest`"
    return None


def image_pinned(ms: Manifests) -> list[Finding]:
    out = []
    for w, c in kube.workload_containers(ms):
        problem = image_reference_problem(c.get("image"))
        if problem:
            out.append(_finding("image-pinned", w, f"container {c.get('name')!r}: {problem}; pin a version tag "
                                                   "or digest"))
    return out


CHECKS: dict[str, Callable[[Manifests], list[Finding]]] = {
    "dns1123-names": dns1123_names,
    "quantities": quantities,
    "requests-within-limits": requests_within_limits,
    "container-resources": container_resources,
    "env-secret-literal": env_secret_literal,
    "env-duplicates": env_duplicates,
    "image-pinned": image_pinned,
}
