"""The one result type every validation layer returns, and how a manifest is named in it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class Finding:
    """One problem: which layer and check found it, in which resource, and what is wrong."""

    layer: str
    """schemas, crds, checkov or crossref."""
    check: str
    """The check's id within its layer (a checkov id, `k8s-1.30`, `service-target-port`, ...)."""
    resource: str
    """`Kind/namespace/name` (or `Kind/name` for cluster-scoped objects, a file for parse errors)."""
    message: str


def resource_id(manifest: dict[str, Any]) -> str:
    metadata = manifest.get("metadata") or {}
    parts = [manifest.get("kind", "?"), metadata.get("namespace"), metadata.get("name", "?")]
    return "/".join(str(p) for p in parts if p)
