"""Kubernetes OpenAPI schema validation of every manifest, for each Kubernetes version we support.

Uses kubernetes-validate's published schemas in strict mode (unknown fields are errors). Custom resources
that `crds.py` checks are skipped here; any other kind without a schema is a finding, never silently passed.
"""
from __future__ import annotations

from typing import Any

import kubernetes_validate

from validation.crds import is_custom_resource
from validation.findings import Finding, resource_id

LAYER = "schemas"
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")
"""The oldest and newest minor versions the platform supports; both must be shipped by kubernetes-validate."""


def check_schemas(manifests: list[dict[str, Any]], versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> list[Finding]:
    findings: list[Finding] = []
    for version in versions:
        check = f"k8s-{version.rsplit('.', 1)[0]}" if version.count(".") == 2 else f"k8s-{version}"
        for m in manifests:
            if is_custom_resource(m):
                continue
            try:
                kubernetes_validate.validate(m, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.absolute_path) or "(root)"
                findings.append(Finding(LAYER, check, resource_id(m), f"{where}: {exc.message}"))
            except kubernetes_validate.SchemaNotFoundError as exc:
                findings.append(Finding(LAYER, check, resource_id(m),
                                        f"no schema for {exc.api_version} {exc.kind} in Kubernetes {exc.version}; "
                                        "a custom resource needs a structural schema in validation/crds.py"))
    return findings
