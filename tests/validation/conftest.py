"""Session fixtures for the validation tests: each stack file rendered once, written once, scanned by checkov once.

Stacks are discovered by glob (`Pulumi.*.yaml`, `examples/*.yaml`), so tests parametrize over new stacks
without edits. Broken-manifest tests start from `prod_manifests()`, a fresh deep copy, and break one thing.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from validation.checkov_runner import CheckovError, CheckovReport, find_checkov, lws_pod_templates, run_checkov
from validation.manifests import ROOT, discover_stack_files, render, stack_label, write_dir

STACK_FILES = discover_stack_files()
STACK_IDS = [stack_label(p) for p in STACK_FILES]
PROD = ROOT / "Pulumi.prod.yaml"

_RENDERED: dict[Path, list[dict[str, Any]]] = {}


def manifests_of(stack_file: Path) -> list[dict[str, Any]]:
    """A stack's rendered manifests (rendered once per session; callers must not mutate them)."""
    if stack_file not in _RENDERED:
        _RENDERED[stack_file] = render(stack_file)
    return _RENDERED[stack_file]


def prod_manifests() -> list[dict[str, Any]]:
    """A deep copy of prod's manifests, to break."""
    return copy.deepcopy(manifests_of(PROD))


def keda_manifests() -> list[dict[str, Any]]:
    """prod with its HPA replaced by the equivalent KEDA ScaledObject (autoscaling on the Prometheus load query)."""
    manifests = prod_manifests()
    hpa = pick(manifests, "HorizontalPodAutoscaler")
    manifests.remove(hpa)
    manifests.append({
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": hpa["spec"]["scaleTargetRef"]["name"], "namespace": hpa["metadata"]["namespace"],
                     "labels": hpa["metadata"].get("labels", {})},
        "spec": {
            "scaleTargetRef": hpa["spec"]["scaleTargetRef"],
            "minReplicaCount": hpa["spec"]["minReplicas"], "maxReplicaCount": hpa["spec"]["maxReplicas"],
            "pollingInterval": 15, "cooldownPeriod": 300,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": hpa["spec"]["behavior"]}},
            "triggers": [{"type": "prometheus", "metadata": {
                "serverAddress": "http://prometheus-operated.monitoring.svc:9090",
                "query": "sum(llm_requests_running) + sum(llm_requests_waiting)", "threshold": "32"}}],
        },
    })
    return manifests


def statefulset_manifests() -> list[dict[str, Any]]:
    """A deep copy of the first stack that renders a StatefulSet (the example stack today)."""
    for stack_file in STACK_FILES:
        if any(m["kind"] == "StatefulSet" for m in manifests_of(stack_file)):
            return copy.deepcopy(manifests_of(stack_file))
    pytest.fail("no stack renders a StatefulSet; keep one in examples/ so the StatefulSet checks run")


def leaderworkerset_manifests() -> list[dict[str, Any]]:
    """A deep copy of the first stack that renders a LeaderWorkerSet (the multi-node example today)."""
    for stack_file in STACK_FILES:
        if any(m["kind"] == "LeaderWorkerSet" for m in manifests_of(stack_file)):
            return copy.deepcopy(manifests_of(stack_file))
    pytest.fail("no stack renders a LeaderWorkerSet; keep one in examples/ so the LeaderWorkerSet checks run")


def pick(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of `kind` (named `name`); unnamed, where prod has the model's and the gateway's (Deployment,
    Service, HPA, PDB, ServiceMonitor), the model's."""
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    if name is None and len(found) > 1:
        found = [m for m in found if m["metadata"].get("labels", {}).get("app.kubernetes.io/component")
                 != "llm-gateway"]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def stacks(**kwargs):
    """`@stacks()`: parametrize a test with `stack_file` over every discovered stack."""
    return pytest.mark.parametrize("stack_file", STACK_FILES, ids=STACK_IDS, **kwargs)


@pytest.fixture(scope="session")
def checkov_bin() -> str:
    try:
        return find_checkov()
    except CheckovError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def rendered_dir(tmp_path_factory):
    """`rendered_dir(stack_file)`: the stack written as YAML files, once per session."""
    written: dict[Path, Path] = {}

    def get(stack_file: Path) -> Path:
        if stack_file not in written:
            directory = tmp_path_factory.mktemp(stack_label(stack_file).replace("/", "-"))
            # As `python -m validation` writes it: LeaderWorkerSet pod templates beside it, for checkov.
            write_dir(manifests_of(stack_file) + lws_pod_templates(manifests_of(stack_file)), directory)
            written[stack_file] = directory
        return written[stack_file]
    return get


@pytest.fixture(scope="session")
def checkov_report(rendered_dir, checkov_bin):
    """`checkov_report(stack_file)`: one checkov run per stack per session (checkov takes seconds to start)."""
    reports: dict[Path, CheckovReport] = {}

    def get(stack_file: Path) -> CheckovReport:
        if stack_file not in reports:
            reports[stack_file] = run_checkov(rendered_dir(stack_file), checkov=checkov_bin)
        return reports[stack_file]
    return get
