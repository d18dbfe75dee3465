"""Layer 1b: ServiceMonitor, PrometheusRule, ScaledObject, SnapshotSchedule, VolumeSnapshotClass and LeaderWorkerSet
match the shape their published CRDs accept, unknown fields refused."""
from __future__ import annotations

import copy

import pytest

from tests.validation.conftest import (
    keda_manifests,
    leaderworkerset_manifests,
    manifests_of,
    pick,
    prod_manifests,
    stacks,
)
from validation.crds import SCHEMAS, check_crds
from validation.manifests import ROOT

BACKUPS_EXAMPLE = ROOT / "examples" / "Pulumi.prod-statefulset.yaml"


def backup_manifests():
    """The example stack that creates its VolumeSnapshotClass (a deep copy, to break)."""
    return copy.deepcopy(manifests_of(BACKUPS_EXAMPLE))


@stacks()
def test_stack_custom_resources_match_their_crds(stack_file):
    assert check_crds(manifests_of(stack_file)) == []


def test_every_schema_is_exercised_by_these_tests():
    kinds = {m["kind"] for m in prod_manifests() + keda_manifests() + backup_manifests() + leaderworkerset_manifests()}
    assert {kind for _, kind in SCHEMAS} <= kinds


def _monitor(ms):
    return pick(ms, "ServiceMonitor")["spec"]


def _rules(ms):
    return pick(ms, "PrometheusRule")["spec"]["groups"]


BREAKS = {
    "monitor-unknown-spec-field": (lambda ms: _monitor(ms).update(endpoint=[]), "ServiceMonitor", "'endpoint'"),
    "monitor-missing-endpoints": (lambda ms: _monitor(ms).pop("endpoints"), "ServiceMonitor", "'endpoints'"),
    "monitor-missing-selector": (lambda ms: _monitor(ms).pop("selector"), "ServiceMonitor", "'selector'"),
    "monitor-selector-unknown-field": (lambda ms: _monitor(ms)["selector"].update(app="llm-service"),
                                       "ServiceMonitor", "'app'"),
    "endpoint-unknown-field": (lambda ms: _monitor(ms)["endpoints"][0].update(scrapeInterval="15s"),
                               "ServiceMonitor", "'scrapeInterval'"),
    "endpoint-port-not-a-name": (lambda ms: _monitor(ms)["endpoints"][0].update(port=8000),
                                 "ServiceMonitor", "endpoints.0.port"),
    "endpoint-bad-interval": (lambda ms: _monitor(ms)["endpoints"][0].update(interval="15 seconds"),
                              "ServiceMonitor", "endpoints.0.interval"),
    "endpoint-bad-scheme": (lambda ms: _monitor(ms)["endpoints"][0].update(scheme="grpc"),
                            "ServiceMonitor", "endpoints.0.scheme"),
    "group-unknown-field": (lambda ms: _rules(ms)[0].update(alerts=[]), "PrometheusRule", "'alerts'"),
    "group-missing-name": (lambda ms: _rules(ms)[0].pop("name"), "PrometheusRule", "'name'"),
    "group-name-repeated": (lambda ms: _rules(ms).append(dict(_rules(ms)[0])), "PrometheusRule", "used twice"),
    "rule-unknown-field": (lambda ms: _rules(ms)[0]["rules"][0].update(severity="critical"),
                           "PrometheusRule", "'severity'"),
    "rule-missing-expr": (lambda ms: _rules(ms)[0]["rules"][0].pop("expr"), "PrometheusRule", "'expr'"),
    "rule-alert-and-record": (lambda ms: _rules(ms)[0]["rules"][0].update(record="llm:errors:ratio"),
                              "PrometheusRule", "exactly one of `alert` and `record`"),
    "recording-rule-with-for": (lambda ms: _rules(ms)[0]["rules"].append(
        {"record": "llm:requests:rate5m", "expr": "sum(rate(llm_requests_total[5m]))", "for": "5m"}),
        "PrometheusRule", "exactly one of `alert` and `record`"),
    "rule-bad-for": (lambda ms: _rules(ms)[0]["rules"][0].update({"for": "5 minutes"}), "PrometheusRule", ".for"),
    "rule-bad-label-name": (lambda ms: _rules(ms)[0]["rules"][0]["labels"].update({"team-name": "llm"}),
                            "PrometheusRule", "team-name"),
    "missing-namespace": (lambda ms: pick(ms, "PrometheusRule")["metadata"].pop("namespace"),
                          "PrometheusRule", "'namespace'"),
}


def _scaled(ms):
    return pick(ms, "ScaledObject")["spec"]


KEDA_BREAKS = {
    "scaledobject-unknown-spec-field": (lambda ms: _scaled(ms).update(minReplicas=2), "ScaledObject", "'minReplicas'"),
    "scaledobject-missing-triggers": (lambda ms: _scaled(ms).pop("triggers"), "ScaledObject", "'triggers'"),
    "scaledobject-target-unknown-field": (lambda ms: _scaled(ms)["scaleTargetRef"].update(namespace="x"),
                                          "ScaledObject", "'namespace'"),
    "trigger-threshold-not-a-string": (lambda ms: _scaled(ms)["triggers"][0]["metadata"].update(threshold=32),
                                       "ScaledObject", "32 is not of type 'string'"),
    "trigger-unknown-field": (lambda ms: _scaled(ms)["triggers"][0].update(query="up"), "ScaledObject", "'query'"),
    "trigger-bad-metric-type": (lambda ms: _scaled(ms)["triggers"][0].update(metricType="Average"),
                                "ScaledObject", "metricType"),
    "behavior-unknown-field": (lambda ms: _scaled(ms)["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
                               .update(scaleDownDelay=60), "ScaledObject", "'scaleDownDelay'"),
}


def _schedule(ms):
    return pick(ms, "SnapshotSchedule")["spec"]


BACKUP_BREAKS = {
    "schedule-unknown-field": (lambda ms: _schedule(ms).update(keep=7), "SnapshotSchedule", "'keep'"),
    "schedule-not-cron": (lambda ms: _schedule(ms).update(schedule="every night"), "SnapshotSchedule", "schedule"),
    "retention-zero": (lambda ms: _schedule(ms)["retention"].update(maxCount=0), "SnapshotSchedule", "maxCount"),
    "retention-bad-expires": (lambda ms: _schedule(ms)["retention"].update(expires="7d"), "SnapshotSchedule",
                              "expires"),
    "template-unknown-field": (lambda ms: _schedule(ms)["snapshotTemplate"].update(className="x"),
                               "SnapshotSchedule", "'className'"),
    "snapshot-class-namespaced": (lambda ms: pick(ms, "VolumeSnapshotClass")["metadata"].update(namespace="x"),
                                  "VolumeSnapshotClass", "metadata"),
    "snapshot-class-no-driver": (lambda ms: pick(ms, "VolumeSnapshotClass").pop("driver"),
                                 "VolumeSnapshotClass", "'driver'"),
    "snapshot-class-bad-policy": (lambda ms: pick(ms, "VolumeSnapshotClass").update(deletionPolicy="Keep"),
                                  "VolumeSnapshotClass", "deletionPolicy"),
    "snapshot-class-spec": (lambda ms: pick(ms, "VolumeSnapshotClass").update(spec={"driver": "x"}),
                            "VolumeSnapshotClass", "'spec'"),
}


def _lws_spec(ms):
    return pick(ms, "LeaderWorkerSet")["spec"]


LWS_BREAKS = {
    "lws-unknown-spec-field": (lambda ms: _lws_spec(ms).update(groupSize=2), "LeaderWorkerSet", "'groupSize'"),
    "lws-bad-restart-policy": (lambda ms: _lws_spec(ms)["leaderWorkerTemplate"].update(restartPolicy="Always"),
                               "LeaderWorkerSet", "restartPolicy"),
    "lws-no-worker-template": (lambda ms: _lws_spec(ms)["leaderWorkerTemplate"].pop("workerTemplate"),
                               "LeaderWorkerSet", "'workerTemplate'"),
    "lws-bad-startup-policy": (lambda ms: _lws_spec(ms).update(startupPolicy="WorkersFirst"),
                               "LeaderWorkerSet", "startupPolicy"),
    "lws-worker-pod-unknown-field": (
        lambda ms: _lws_spec(ms)["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0].update(gpus=8),
        "LeaderWorkerSet", "workerTemplate.spec.containers.0: Additional properties are not allowed ('gpus'"),
    "lws-leader-pod-bad-type": (
        lambda ms: _lws_spec(ms)["leaderWorkerTemplate"]["leaderTemplate"]["spec"].update(
            terminationGracePeriodSeconds="120"),
        "LeaderWorkerSet", "leaderTemplate.spec.terminationGracePeriodSeconds"),
    "lws-rollout-stuck": (lambda ms: _lws_spec(ms)["rolloutStrategy"]["rollingUpdateConfiguration"].update(
        maxSurge=0, maxUnavailable=0), "LeaderWorkerSet", "both 0"),
}


@pytest.mark.parametrize("case", list(LWS_BREAKS))
def test_broken_leaderworkerset_fails(case):
    breaker, kind, expected_text = LWS_BREAKS[case]
    manifests = leaderworkerset_manifests()
    breaker(manifests)
    findings = check_crds(manifests)
    assert findings and {f.check for f in findings} == {kind}
    assert any(expected_text in f.message for f in findings), findings


def test_keda_scaled_object_passes():
    assert check_crds(keda_manifests()) == []


@pytest.mark.parametrize("case", list(BREAKS) + list(KEDA_BREAKS) + list(BACKUP_BREAKS))
def test_broken_custom_resource_fails(case):
    breaker, kind, expected_text = {**BREAKS, **KEDA_BREAKS, **BACKUP_BREAKS}[case]
    manifests = keda_manifests() if case in KEDA_BREAKS else backup_manifests() if case in BACKUP_BREAKS \
        else prod_manifests()
    breaker(manifests)
    findings = check_crds(manifests)
    assert findings, f"{case}: the broken {kind} passed"
    assert {f.check for f in findings} == {kind}
    assert any(expected_text in f.message for f in findings), findings


def test_valid_recording_rule_passes():
    manifests = prod_manifests()
    _rules(manifests)[0]["rules"].append({"record": "llm:requests:rate5m", "expr": "sum(rate(llm_requests_total[5m]))",
                                          "labels": {"team": "llm"}})
    assert check_crds(manifests) == []
