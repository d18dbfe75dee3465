"""Whole-program tests per stack, and the corrections to the reference article on every stack."""
from __future__ import annotations

import pytest

from tests.conftest import render_values, stack_values

STACKS = ["dev", "staging", "prod", "examples/Pulumi.prod-statefulset.yaml"]


def workloads(result):
    return result.of_kind("Deployment") + result.of_kind("StatefulSet")


def containers(result):
    return [c for w in workloads(result) for c in w["spec"]["template"]["spec"]["containers"]]


# ------------------------------------------------------------------ corrections to the article, every stack


@pytest.mark.parametrize("stack", STACKS)
def test_never_sets_nvidia_visible_devices(rendered, stack):
    for c in containers(rendered(stack)):
        assert "NVIDIA_VISIBLE_DEVICES" not in {e["name"] for e in c["env"]}


@pytest.mark.parametrize("stack", STACKS)
def test_pdb_allows_a_disruption_at_the_minimum(rendered, stack):
    result = rendered(stack)
    for pdb in result.of_kind("PodDisruptionBudget"):
        spec = pdb["spec"]
        if "maxUnavailable" in spec:
            assert spec["maxUnavailable"] >= 1
        else:
            hpa = result.of_kind("HorizontalPodAutoscaler")
            minimum = hpa[0]["spec"]["minReplicas"] if hpa else workloads(result)[0]["spec"]["replicas"]
            assert spec["minAvailable"] < minimum


@pytest.mark.parametrize("stack", STACKS)
def test_network_policies_default_deny_and_allow_dns(rendered, stack):
    result = rendered(stack)
    deny = result.one("NetworkPolicy", "default-deny-all")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    dns = result.one("NetworkPolicy", "allow-dns-egress")["spec"]
    (rule,) = dns["egress"]
    assert {"protocol": "UDP", "port": 53} in rule["ports"] and {"protocol": "TCP", "port": 53} in rule["ports"]
    assert rule["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}


@pytest.mark.parametrize("stack", STACKS)
def test_restricted_security_context_and_own_service_account(rendered, stack):
    result = rendered(stack)
    for w in workloads(result):
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        sa = result.one("ServiceAccount", pod["serviceAccountName"])
        assert sa["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["readOnlyRootFilesystem"] is True
            writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
            assert writable == {"/tmp"}
            tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
            assert "emptyDir" in tmp
    labels = result.one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("stack", STACKS)
def test_ingress_controller_can_reach_pods_when_there_is_an_ingress(rendered, stack):
    """The article's policy admitted only api-gateway, so its own Ingress could never reach the pods."""
    result = rendered(stack)
    gateway = bool(result.of_kind("Ingress", )) and result.of_kind("Ingress")[0]["metadata"]["name"] == "llm-gateway"
    # Behind the gateway, the Ingress leads to the gateway's pods, and they to the model pods.
    callers = result.one("NetworkPolicy", "llm-gateway-ingress" if gateway else "llm-serving-ingress")["spec"]
    names = {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in callers["ingress"][0]["from"]
             if "namespaceSelector" in p}
    assert ("ingress-nginx" in names) == bool(result.of_kind("Ingress"))


@pytest.mark.parametrize("stack", STACKS)
def test_no_unpinned_image(rendered, stack):
    for c in containers(rendered(stack)):
        name, _, tag = c["image"].rpartition(":")
        assert name and tag and tag != "latest"


@pytest.mark.parametrize("stack", STACKS)
def test_hpa_owns_replicas_so_pulumi_up_does_not_reset_them(rendered, stack):
    result = rendered(stack)
    has_hpa = bool(result.of_kind("HorizontalPodAutoscaler"))
    for r in result.resources:
        if r.type in ("kubernetes:apps/v1:Deployment", "kubernetes:apps/v1:StatefulSet"):
            assert ("spec.replicas" in r.ignore_changes) == has_hpa, (stack, r.ignore_changes)


# ------------------------------------------------------------------------------------------ per stack


def test_dev_is_a_laptop_cluster(rendered):
    dev = rendered("dev")
    d = dev.one("Deployment", "llm-service")
    assert d["spec"]["replicas"] == 1
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["requests"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert not dev.of_kind("HorizontalPodAutoscaler")
    assert not dev.of_kind("Ingress")
    assert not dev.of_kind("ServiceMonitor") and not dev.of_kind("PrometheusRule")
    assert d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert dev.outputs["endpoints"] == {"llm-service": "http://llm-service.llm-dev.svc.cluster.local:80/v1"}


def test_staging_overrides_only_what_differs(rendered):
    staging = rendered("staging")
    assert staging.one("Namespace")["metadata"]["name"] == "ai-staging"
    hpa = staging.one("HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 3)
    ing = staging.one("Ingress")
    assert ing["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt-staging"
    # Not in the staging file, so the defaults (the article's values) apply:
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    probe = staging.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert probe["failureThreshold"] == 30


def test_prod_observability_with_operator(rendered):
    prod = rendered("prod")
    sm = prod.one("ServiceMonitor", "llm-service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["endpoints"][0]["port"] == "http"
    rule = prod.one("PrometheusRule")
    alerts = {r["alert"] for r in rule["spec"]["groups"][0]["rules"]}
    assert alerts == {"LLMHighErrorRatio", "LLMTimeToFirstTokenSlow", "LLMQueueBacklog", "LLMKVCacheNearlyFull",
                      "LLMPodRestarting", "LLMPodCrashLooping", "LLMReplicasAtMaximum", "LLMGpuIdleAboveMinimum",
                      "LLMCertificateExpiringSoon", "LLMAttentionFallback"}
    for r in rule["spec"]["groups"][0]["rules"]:
        assert r["labels"]["severity"] in ("info", "warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["runbook"]
    dashboard = prod.one("ConfigMap", "llm-service-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_several_models_share_one_pool_and_guardrails():
    """Without the gateway, each model gets its own Ingress host (the API paths are the same for every model)."""
    values = stack_values("prod")
    values["gateway"] = {"enabled": False}
    first = values["models"][0]
    second = {**first, "name": "llm-small", "servedModelName": "llama-3.2-1b", "modelPath": "/models/llama-3.2-1b",
              "host": "llm-small.example.com", "storage": {**first["storage"], "claimName": "small-pvc"},
              "autoscaling": {**first["autoscaling"], "maxReplicas": 4}}
    values["models"][0] = {**first, "autoscaling": {**first["autoscaling"], "maxReplicas": 6}}
    values["models"].append(second)
    result = render_values("prod", values)
    assert {d["metadata"]["name"] for d in result.of_kind("Deployment")} == {"llm-service", "llm-small"}
    assert len(result.of_kind("Namespace")) == 1 and len(result.of_kind("ResourceQuota")) == 1
    assert len(result.of_kind("PodDisruptionBudget")) == 2 and len(result.of_kind("HorizontalPodAutoscaler")) == 2
    assert len(result.of_kind("ServiceMonitor")) == 2
    tls = {i["metadata"]["name"]: i["spec"]["tls"][0]["secretName"] for i in result.of_kind("Ingress")}
    assert tls == {"llm-service": "llm-service-tls", "llm-small": "llm-small-tls"}
    assert result.outputs["endpoints"] == {"llm-service": "https://llm-api.example.com/v1",
                                           "llm-small": "https://llm-small.example.com/v1"}
    assert result.outputs["gpusAtMaxReplicas"] == 10
