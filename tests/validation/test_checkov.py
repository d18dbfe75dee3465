"""Layer 2: checkov's Kubernetes checks pass on every stack, offline, with only the reasoned skips in .checkov.yaml.

checkov runs once per stack (session fixture) plus once on a folder of deliberately broken copies of the
prod Deployment and once on prod without the skip file, so the suite stays fast while proving that the
runner reports real failures and that every skip is still needed.
"""
from __future__ import annotations

import copy

import pytest

from tests.validation.conftest import PROD, ROOT, leaderworkerset_manifests, manifests_of, pick, prod_manifests, stacks
from validation.checkov_runner import (
    CheckovReport,
    check_skip_file,
    lws_pod_templates,
    parse_report,
    read_skips,
    run_checkov,
)
from validation.manifests import write_dir

STAGING = ROOT / "Pulumi.staging.yaml"


@stacks()
def test_stack_passes_checkov(stack_file, checkov_report):
    report = checkov_report(stack_file)
    assert report.findings() == []
    workloads = {f"{m['kind']}.{m['metadata']['namespace']}.{m['metadata']['name']}" for m in manifests_of(stack_file)
                 if m["kind"] in ("Deployment", "StatefulSet")}
    workloads |= {f"PodTemplate.{m['metadata']['namespace']}.{m['metadata']['name']}-{role}"
                  for m in manifests_of(stack_file) if m["kind"] == "LeaderWorkerSet" for role in ("leader", "worker")}
    assert workloads and workloads <= {c["resource"] for c in report.passed}, "checkov never checked the workload"


def test_skip_file_is_reasoned_and_allowed():
    skips = read_skips()
    assert skips, "read_skips found no entries in .checkov.yaml"
    assert check_skip_file() == []


def test_skip_file_rules_catch_bad_skips(tmp_path):
    bad = tmp_path / ".checkov.yaml"
    bad.write_text("skip-check:\n  - CKV_K8S_43\n  # CKV_K8S_20 (allowPrivilegeEscalation): the image needs sudo to "
                   "install drivers at start\n  - CKV_K8S_20\n")
    problems = {(f.check, "reason" if "comment" in f.message else "forbidden") for f in check_skip_file(bad)}
    assert problems == {("CKV_K8S_43", "reason"), ("CKV_K8S_20", "forbidden")}


def test_every_skip_is_still_needed(rendered_dir, checkov_bin):
    """Without the skip file, staging (images pinned by version tag) fails exactly the skipped checks: no stale
    skips, nothing else hidden. prod pins every image by digest, which passes both image checks."""
    report = run_checkov(rendered_dir(STAGING), config_file=None, checkov=checkov_bin)
    assert {f.check for f in report.findings()} == {s.check_id for s in read_skips()}
    assert run_checkov(rendered_dir(PROD), config_file=None, checkov=checkov_bin).findings() == []


def _broken(name, breaker):
    deployment = copy.deepcopy(pick(prod_manifests(), "Deployment"))
    deployment["metadata"]["name"] = name
    breaker(deployment["spec"]["template"]["spec"])
    return deployment


def _container_context(**changes):
    return lambda pod: pod["containers"][0]["securityContext"].update(changes)


BROKEN = {
    "privileged": (_container_context(privileged=True), "CKV_K8S_16"),
    "privilege-escalation": (_container_context(allowPrivilegeEscalation=True), "CKV_K8S_20"),
    "writable-root": (_container_context(readOnlyRootFilesystem=False), "CKV_K8S_22"),
    "host-network": (lambda pod: pod.update(hostNetwork=True), "CKV_K8S_19"),
    "token-mounted": (lambda pod: pod.update(automountServiceAccountToken=True), "CKV_K8S_38"),
    "no-liveness-probe": (lambda pod: pod["containers"][0].pop("livenessProbe"), "CKV_K8S_8"),
    "net-raw": (lambda pod: pod["containers"][0]["securityContext"].update(capabilities={"add": ["NET_RAW"]}),
                "CKV_K8S_28"),
}


@pytest.fixture(scope="module")
def broken_report(tmp_path_factory, checkov_bin) -> CheckovReport:
    directory = tmp_path_factory.mktemp("checkov-broken")
    write_dir([_broken(f"broken-{name}", breaker) for name, (breaker, _) in BROKEN.items()], directory)
    return run_checkov(directory, checkov=checkov_bin)


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_pod_fails_checkov(case, broken_report):
    expected = BROKEN[case][1]
    assert (expected, f"Deployment.ai-production.broken-{case}") in broken_report.ids("failed")
    assert any(f.check == expected for f in broken_report.findings())


def test_unchecked_workload_is_a_finding():
    """checkov ignores files it cannot load; the runner reports any workload it did not check."""
    report = parse_report({"check_type": "kubernetes", "summary": {"resource_count": 3},
                           "results": {"passed_checks": [{"check_id": "CKV_K8S_8", "resource": "Deployment.a.b"}]}})
    report.expected_workloads = {"Deployment.a.b", "StatefulSet.a.c"}
    assert [(f.check, f.resource) for f in report.findings()] == [("scan", "StatefulSet.a.c")]


def test_empty_scan_is_a_finding():
    report = parse_report({"passed": 0, "failed": 0, "skipped": 0, "parsing_errors": 0, "resource_count": 0})
    assert [f.check for f in report.findings()] == ["scan"]



def test_leaderworkerset_pods_get_checkov_and_only_headless_workers_skip_the_probe_checks(tmp_path, checkov_bin):
    """The worker template is checked like any pod (here: made privileged, it fails); only the probe checks, which a
    headless worker cannot satisfy, are left to the leader's probes (crossref leaderworkerset-groups)."""
    manifests = leaderworkerset_manifests()
    lws = pick(manifests, "LeaderWorkerSet")
    worker = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    worker["securityContext"]["privileged"] = True
    write_dir(manifests + lws_pod_templates(manifests), tmp_path)
    report = run_checkov(tmp_path, checkov=checkov_bin)
    name = f"PodTemplate.{lws['metadata']['namespace']}.{lws['metadata']['name']}"
    assert ("CKV_K8S_8", f"{name}-worker") in report.ids("failed")
    assert {(f.check, f.resource) for f in report.findings()} == {("CKV_K8S_16", f"{name}-worker")}
    assert ("CKV_K8S_8", f"{name}-leader") in report.ids("passed")
