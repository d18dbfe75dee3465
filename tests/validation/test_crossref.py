"""Layer 3: objects reference each other correctly and each object is sane (kube-score/kube-linter/Polaris rules).

Every registered check has at least one case below that breaks exactly one thing in a real rendered stack
and must produce that check's finding; a check that cannot fail is caught by
`test_every_check_has_a_breaking_case`.
"""
from __future__ import annotations

import pytest

from tests.validation.conftest import (
    keda_manifests,
    leaderworkerset_manifests,
    manifests_of,
    pick,
    prod_manifests,
    stacks,
    statefulset_manifests,
)
from validation.crossref import CHECKS, check_crossref
from validation.sanity import _looks_secret, image_reference_problem


@stacks()
def test_stack_passes_crossref(stack_file):
    assert check_crossref(manifests_of(stack_file)) == []


def test_keda_variant_passes_crossref():
    assert check_crossref(keda_manifests()) == []


def _deployment(ms):
    return pick(ms, "Deployment")


def _pod(ms):
    return _deployment(ms)["spec"]["template"]["spec"]


def _container(ms):
    return _pod(ms)["containers"][0]


def _set(getter, key, value):
    def breaker(ms):
        getter(ms)[key] = value
    return breaker


def _drop_kind(kind):
    def breaker(ms):
        ms[:] = [m for m in ms if m["kind"] != kind]
    return breaker


def _pdb_min_available(value):
    def breaker(ms):
        spec = pick(ms, "PodDisruptionBudget")["spec"]
        del spec["maxUnavailable"]
        spec["minAvailable"] = value
    return breaker


def _remove_resource(section, resource):
    def breaker(ms):
        del _container(ms)["resources"][section][resource]
    return breaker


def _append_env(name, value):
    def breaker(ms):
        _container(ms)["env"].append({"name": name, "value": value})
    return breaker


def _sts_service_name(ms):
    pick(ms, "StatefulSet")["spec"]["serviceName"] = "llm-service-peers"


# (check id, case name, breaker, manifests factory)
CASES = [
    ("service-selects-pods", "selector-typo", lambda ms: pick(ms, "Service", "llm-service")["spec"].update(selector={"app": "llm"}),
     prod_manifests),
    ("service-target-port", "unknown-name",
     lambda ms: pick(ms, "Service", "llm-service")["spec"]["ports"][0].update(targetPort="metrics"), prod_manifests),
    ("service-target-port", "unknown-number",
     lambda ms: pick(ms, "Service", "llm-service")["spec"]["ports"][0].update(targetPort=9000), prod_manifests),
    ("ingress-backend", "missing-service", lambda ms: pick(ms, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]
     ["backend"]["service"].update(name="llm-svc"), prod_manifests),
    ("ingress-backend", "missing-port", lambda ms: pick(ms, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]
     ["backend"]["service"].update(port={"number": 8080}), prod_manifests),
    ("hpa-target", "missing-deployment",
     lambda ms: pick(ms, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].update(name="llm-svc"), prod_manifests),
    ("hpa-target", "wrong-kind",
     lambda ms: pick(ms, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].update(kind="StatefulSet"),
     prod_manifests),
    ("hpa-metric-requests", "no-cpu-request", _remove_resource("requests", "cpu"), prod_manifests),
    ("scaledobject-target", "missing-deployment",
     lambda ms: pick(ms, "ScaledObject")["spec"]["scaleTargetRef"].update(name="llm-svc"), keda_manifests),
    ("scaledobject-target", "also-scaled-by-hpa",
     lambda ms: ms.append(pick(prod_manifests(), "HorizontalPodAutoscaler")), keda_manifests),
    ("pdb-selector", "selector-typo",
     lambda ms: pick(ms, "PodDisruptionBudget")["spec"].update(selector={"matchLabels": {"app": "llm"}}),
     prod_manifests),
    ("pdb-allows-disruption", "max-unavailable-0",
     lambda ms: pick(ms, "PodDisruptionBudget")["spec"].update(maxUnavailable=0), prod_manifests),
    ("pdb-allows-disruption", "min-available-equals-hpa-min", _pdb_min_available(2), prod_manifests),
    ("pdb-allows-disruption", "min-available-100-percent", _pdb_min_available("100%"), prod_manifests),
    ("pdb-allows-disruption", "min-available-equals-keda-min", _pdb_min_available(2), keda_manifests),
    ("networkpolicy-covers-pods", "no-policies", _drop_kind("NetworkPolicy"), prod_manifests),
    ("networkpolicy-selects-pods", "selector-typo", lambda ms: pick(ms, "NetworkPolicy", "llm-serving-ingress")
     ["spec"]["podSelector"]["matchLabels"].update({"app.kubernetes.io/component": "llm-server"}), prod_manifests),
    ("probe-ports", "unknown-name",
     lambda ms: _container(ms)["readinessProbe"]["httpGet"].update(port="metrics"), prod_manifests),
    ("probe-ports", "unknown-number",
     lambda ms: _container(ms)["livenessProbe"]["httpGet"].update(port=8080), prod_manifests),
    ("workload-selector", "selector-not-template",
     lambda ms: _deployment(ms)["spec"]["selector"].update(matchLabels={"app": "llm"}), prod_manifests),
    ("statefulset-service", "missing-headless-service", _sts_service_name, statefulset_manifests),
    ("pod-references", "service-account", _set(_pod, "serviceAccountName", "llm-sa"), prod_manifests),
    ("pod-references", "priority-class", _set(_pod, "priorityClassName", "llm-batch"), prod_manifests),
    ("pod-references", "pvc", lambda ms: _pod(ms)["volumes"][0]["persistentVolumeClaim"].update(claimName="models"),
     prod_manifests),
    ("pod-references", "secret", lambda ms: _pod(ms)["volumes"][2]["secret"].update(secretName="llm-keys"),
     prod_manifests),
    ("pod-references", "volume-mount", lambda ms: _container(ms)["volumeMounts"][0].update(name="weights"),
     prod_manifests),
    ("servicemonitor-target", "selector-typo",
     lambda ms: pick(ms, "ServiceMonitor")["spec"].update(selector={"matchLabels": {"app": "llm"}}), prod_manifests),
    ("servicemonitor-target", "unknown-port",
     lambda ms: pick(ms, "ServiceMonitor")["spec"]["endpoints"][0].update(port="metrics"), prod_manifests),
    ("dns1123-names", "object-name",
     lambda ms: pick(ms, "ServiceAccount")["metadata"].update(name="LLM_Serving"), prod_manifests),
    ("dns1123-names", "container-name", _set(_container, "name", "LLM-API"), prod_manifests),
    ("dns1123-names", "container-port-name",
     lambda ms: _container(ms)["ports"][0].update(name="openai-http-port"), prod_manifests),
    ("quantities", "container-memory",
     lambda ms: _container(ms)["resources"]["limits"].update(memory="16GB"), prod_manifests),
    ("quantities", "quota", lambda ms: pick(ms, "ResourceQuota")["spec"]["hard"].update({"limits.cpu": "lots"}),
     prod_manifests),
    ("requests-within-limits", "cpu-request-above-limit",
     lambda ms: _container(ms)["resources"]["requests"].update(cpu="16"), prod_manifests),
    ("requests-within-limits", "gpu-request-not-limit",
     lambda ms: _container(ms)["resources"]["limits"].update({"nvidia.com/gpu": "2"}), prod_manifests),
    ("container-resources", "no-ephemeral-storage-limit", _remove_resource("limits", "ephemeral-storage"),
     prod_manifests),
    ("container-resources", "no-memory-request", _remove_resource("requests", "memory"), prod_manifests),
    ("env-secret-literal", "token-literal", _append_env("HF_TOKEN", "hf_abcdef"), prod_manifests),
    ("env-secret-literal", "file-pointer-outside-mounts", _append_env("DB_PASSWORD_FILE", "/etc/db-password"),
     prod_manifests),
    ("env-duplicates", "model-name-twice", _append_env("MODEL_NAME", "other"), prod_manifests),
    ("image-pinned", "latest", _set(_container, "image", "registry.example.com/llm-serving:latest"), prod_manifests),
    ("image-pinned", "no-tag", _set(_container, "image", "registry.example.com:5000/llm-serving"), prod_manifests),
]


def _lws(ms):
    return pick(ms, "LeaderWorkerSet")


def _lws_template(role):
    def get(ms):
        return _lws(ms)["spec"]["leaderWorkerTemplate"][f"{role}Template"]
    return get


def _uncover_lws_workers(ms):
    """Only the worker template loses the labels the serving and group policies select, and no default deny is
    left: the leaders stay covered, the workers do not."""
    ms.remove(pick(ms, "NetworkPolicy", "default-deny-all"))
    for key in ("app.kubernetes.io/component", "llm-platform/role"):
        _lws_template("worker")(ms)["metadata"]["labels"].pop(key)


CASES += [
    ("leaderworkerset-groups", "service-selects-workers",
     lambda ms: pick(ms, "Service")["spec"]["selector"].pop("llm-platform/role"), leaderworkerset_manifests),
    ("leaderworkerset-groups", "pdb-selects-leaders-only",
     lambda ms: pick(ms, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(
         {"llm-platform/role": "leader"}), leaderworkerset_manifests),
    ("leaderworkerset-groups", "pdb-counts-half-a-group",
     lambda ms: pick(ms, "PodDisruptionBudget")["spec"].update(maxUnavailable=1), leaderworkerset_manifests),
    ("leaderworkerset-groups", "no-group-restart",
     lambda ms: _lws(ms)["spec"]["leaderWorkerTemplate"].update(restartPolicy="None"), leaderworkerset_manifests),
    ("leaderworkerset-groups", "leader-without-probes",
     lambda ms: _lws_template("leader")(ms)["spec"]["containers"][0].pop("livenessProbe"), leaderworkerset_manifests),
    ("leaderworkerset-groups", "leader-ready-startup",
     lambda ms: _lws(ms)["spec"].update(startupPolicy="LeaderReady"), leaderworkerset_manifests),
    ("hpa-target", "lws-wrong-api-version",
     lambda ms: pick(ms, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].update(apiVersion="apps/v1"),
     leaderworkerset_manifests),
    ("hpa-target", "lws-missing",
     lambda ms: pick(ms, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].update(name="llama-405b"),
     leaderworkerset_manifests),
    ("service-selects-pods", "lws-leader-label-typo",
     lambda ms: pick(ms, "Service")["spec"]["selector"].update({"llm-platform/role": "head"}),
     leaderworkerset_manifests),
    ("pdb-selector", "lws-selector-typo",
     lambda ms: pick(ms, "PodDisruptionBudget")["spec"].update(selector={"matchLabels": {"app": "llama"}}),
     leaderworkerset_manifests),
    ("networkpolicy-covers-pods", "lws-worker-uncovered", _uncover_lws_workers, leaderworkerset_manifests),
    ("pod-references", "lws-worker-volume-mount",
     lambda ms: _lws_template("worker")(ms)["spec"]["containers"][0]["volumeMounts"][0].update(name="weights"),
     leaderworkerset_manifests),
    ("image-pinned", "lws-worker-latest",
     lambda ms: _lws_template("worker")(ms)["spec"]["containers"][0].update(image="vllm/vllm-openai:latest"),
     leaderworkerset_manifests),
]


def test_leaderworkerset_stack_pdb_counts_whole_groups():
    ms = leaderworkerset_manifests()
    pdb, lws = pick(ms, "PodDisruptionBudget"), pick(ms, "LeaderWorkerSet")
    assert pdb["spec"]["maxUnavailable"] == lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    # 2 groups at the HPA minimum = 4 pods; whole groups of 2 may go, so drains proceed group by group.
    assert CHECKS["pdb-allows-disruption"](ms) == []
    pick(ms, "PodDisruptionBudget")["spec"].update(maxUnavailable=None, minAvailable=4)
    del pick(ms, "PodDisruptionBudget")["spec"]["maxUnavailable"]
    assert CHECKS["pdb-allows-disruption"](ms)


def test_every_check_has_a_breaking_case():
    assert {check for check, *_ in CASES} == set(CHECKS)


@pytest.mark.parametrize("check, breaker, factory", [(c, b, f) for c, _, b, f in CASES],
                         ids=[f"{c}:{name}" for c, name, *_ in CASES])
def test_broken_manifest_fails(check, breaker, factory):
    manifests = factory()
    breaker(manifests)
    findings = CHECKS[check](manifests)
    assert findings, f"{check} passed a broken manifest"
    assert all(f.check == check and f.layer == "crossref" for f in findings)
    assert findings[0] in check_crossref(manifests)


@pytest.mark.parametrize("name, secret", [
    ("HF_TOKEN", True), ("API_KEY", True), ("DB_PASSWORD", True), ("AWS_SECRET_ACCESS_KEY", True),
    ("OPENAI_APIKEY", True), ("MAX_TOKENS", False), ("MODEL_NAME", False), ("KEYCLOAK_URL", False),
])
def test_secret_looking_names(name, secret):
    assert _looks_secret(name) is secret


@pytest.mark.parametrize("image, pinned", [
    ("registry.example.com/llm-serving:1.0.0", True), ("registry.example.com:5000/llm-serving:1.0.0", True),
    ("registry.example.com/llm-serving@sha256:" + "a" * 64, True), ("registry.example.com/llm-serving:latest", False),
    ("registry.example.com:5000/llm-serving", False), ("llm-serving", False), ("llm-serving@sha256:abc", False),
])
def test_image_reference_pinning(image, pinned):
    assert (image_reference_problem(image) is None) is pinned
