"""The prod stack reproduces every value of the reference deployment, checked on the captured manifests."""
from __future__ import annotations

import pytest

STACK = "prod"


@pytest.fixture
def prod(rendered):
    return rendered(STACK)


def container(deployment):
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def test_namespace_is_ai_production_with_pod_security_labels(prod):
    ns = prod.one("Namespace")
    assert ns["metadata"]["name"] == "ai-production"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(m["metadata"].get("namespace") == "ai-production"
               for m in prod.manifests() if m["kind"] not in ("Namespace", "PriorityClass"))


def test_deployment_replicas_container_port_and_env(prod):
    d = prod.one("Deployment", "llm-service")
    assert d["spec"]["replicas"] == 2
    c = container(d)
    assert c["name"] == "llm-api"
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["MODEL_NAME"] == "llama-3.1-8b"
    # The article's /models/llama-3.1-8b, with the pinned revision's own directory inside it.
    assert env["MODEL_PATH"] == "/models/llama-3.1-8b/0e9e39f249a1"
    assert env["PORT"] == "8000"


def test_deployment_requests_and_limits(prod):
    resources = container(prod.one("Deployment", "llm-service"))["resources"]
    assert {k: resources["requests"][k] for k in ("cpu", "memory", "nvidia.com/gpu")} == \
        {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}
    assert {k: resources["limits"][k] for k in ("cpu", "memory", "nvidia.com/gpu")} == \
        {"cpu": "8", "memory": "16Gi", "nvidia.com/gpu": "1"}


def test_model_storage_volume_from_model_pvc(prod):
    d = prod.one("Deployment", "llm-service")
    mount = next(m for m in container(d)["volumeMounts"] if m["name"] == "model-storage")
    assert mount["mountPath"] == "/models" and mount["readOnly"] is True
    volume = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "model-storage")
    assert volume["persistentVolumeClaim"]["claimName"] == "model-pvc"
    pvc = prod.one("PersistentVolumeClaim", "model-pvc")
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "500Gi"


def test_service_80_to_8000_cluster_ip_behind_the_ingress(prod):
    """The article's LoadBalancer was a plain-HTTP public path beside the TLS Ingress (README corrections)."""
    svc = prod.one("Service", "llm-service")
    assert svc["spec"]["type"] == "ClusterIP"
    (port,) = svc["spec"]["ports"]
    assert (port["port"], port["targetPort"], port["protocol"]) == (80, "http", "TCP")
    assert svc["spec"]["selector"] == {"app": "llm-service"}


def test_ingress_class_host_tls_and_cert_manager(prod):
    """The article's host, class, issuer and TLS secret, on the stack's one Ingress: the gateway's. Only the
    OpenAI API is routed (the article's `/` also published /metrics and /health)."""
    ing = prod.one("Ingress", "llm-gateway")
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert "kubernetes.io/ingress.class" not in ing["metadata"].get("annotations", {})
    assert ing["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt-prod"
    assert ing["spec"]["tls"] == [{"hosts": ["llm-api.example.com"], "secretName": "llm-tls"}]
    (rule,) = ing["spec"]["rules"]
    assert rule["host"] == "llm-api.example.com"
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/v1", "Prefix")
    assert path["backend"]["service"] == {"name": "llm-gateway", "port": {"number": 80}}
    assert not prod.of_kind("Ingress")[1:], "one Ingress for the stack"


def test_hpa_v2_targets_and_behavior(prod):
    hpa = prod.one("HorizontalPodAutoscaler", "llm-service-hpa")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-service"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10)
    targets = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in spec["metrics"]
               if m["type"] == "Resource"}
    assert targets == {"cpu": 70, "memory": 80}      # the article's targets, kept as secondary metrics
    down, up = spec["behavior"]["scaleDown"], spec["behavior"]["scaleUp"]
    assert down["stabilizationWindowSeconds"] == 300
    assert down["policies"] == [{"type": "Percent", "value": 50, "periodSeconds": 60}]
    assert up["stabilizationWindowSeconds"] == 0
    assert up["policies"] == [{"type": "Percent", "value": 100, "periodSeconds": 30},
                              {"type": "Pods", "value": 2, "periodSeconds": 30}]
    assert up["selectPolicy"] == "Max"


def test_resource_quota_llm_quota(prod):
    quota = prod.one("ResourceQuota", "llm-quota")
    assert quota["spec"]["hard"] == {
        "requests.cpu": "100", "requests.memory": "200Gi", "requests.nvidia.com/gpu": "10",
        "limits.cpu": "200", "limits.memory": "400Gi", "limits.nvidia.com/gpu": "10",
        "persistentvolumeclaims": "10",
        "fast-ssd.storageclass.storage.k8s.io/requests.storage": "5Ti",
    }


def test_limit_range_llm_limits(prod):
    (item,) = prod.one("LimitRange", "llm-limits")["spec"]["limits"]
    assert item["type"] == "Container"
    assert (item["default"]["cpu"], item["default"]["memory"]) == ("4", "8Gi")
    assert (item["defaultRequest"]["cpu"], item["defaultRequest"]["memory"]) == ("2", "4Gi")


def test_pdb_selects_serving_pods(prod):
    pdb = prod.one("PodDisruptionBudget", "llm-service-pdb")
    assert pdb["spec"]["selector"] == {"matchLabels": {"app": "llm-service"}}


def test_network_policy_ingress_from_api_gateway_on_8000(prod):
    """The article's caller (api-gateway pods) now reaches the stack's gateway; the model pods accept only the
    gateway's pods and Prometheus."""
    api_gateway = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "api-gateway"}},
                   "podSelector": {"matchLabels": {"app": "api-gateway"}}}
    (rule,) = prod.one("NetworkPolicy", "llm-gateway-ingress")["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert api_gateway in rule["from"]
    (rule,) = prod.one("NetworkPolicy", "llm-serving-ingress")["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "llm-gateway",
                                         "app.kubernetes.io/part-of": "llm-platform"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_network_policy_egress_to_model_storage_on_443(prod):
    policy = prod.one("NetworkPolicy", "llm-serving-egress")
    (rule,) = policy["spec"]["egress"]
    assert rule["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "model-storage"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 443}]


@pytest.mark.parametrize("probe, path, values", [
    ("livenessProbe", "/health/live", (30, 10, 5, 3)),
    ("readinessProbe", "/health/ready", (10, 5, 3, 3)),
    ("startupProbe", "/health/startup", (0, 10, 5, 30)),
])
def test_probes(prod, probe, path, values):
    p = container(prod.one("Deployment", "llm-service"))[probe]
    assert p["httpGet"]["path"] == path
    assert p["httpGet"]["port"] == "http"  # the container port named http is 8000
    assert (p["initialDelaySeconds"], p["periodSeconds"], p["timeoutSeconds"], p["failureThreshold"]) == values


def test_rolling_update_that_can_progress_and_pinned_image(prod):
    """The quota (10 GPUs) is exactly the HPA maximum (10 x 1), so a surge pod could never start at max:
    the planned strategy takes one replica down at a time instead, and the plan says so."""
    d = prod.one("Deployment", "llm-service")
    assert d["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert "no room for an extra replica" in prod.outputs["capacityPlan"]["llm-service"]["rollout"]
    image = container(d)["image"]
    assert image == "registry.example.com/llm-serving:1.0.0@sha256:076327a98784eff460e9a7a39cbc131d25a4e3ff9550357cdfcf65112ca56ed9"


def test_api_key_from_pulumi_random_into_a_secret_the_container_reads(prod):
    assert any(r.type == "random:index/randomPassword:RandomPassword" for r in prod.resources)
    secret = prod.one("Secret", "llm-api-keys")
    assert list(secret["stringData"]) == ["api-keys"]
    assert "mock-" not in str(secret)  # the value never appears in the rendered manifest
    d = prod.one("Deployment", "llm-service")
    volume = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "llm-api-keys"
    env = {e["name"]: e["value"] for e in container(d)["env"]}
    mount = next(m for m in container(d)["volumeMounts"] if m["name"] == "api-keys")
    assert env["API_KEYS_FILE"] == f"{mount['mountPath']}/api-keys"
    assert "apiKey" in prod.secret_outputs and prod.outputs["apiKey"].startswith("mock-")


def test_gpu_scheduling_from_gpu_pool(prod):
    spec = prod.one("Deployment", "llm-service")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["priorityClassName"] == "llm-inference"
    assert prod.one("PriorityClass", "llm-inference")["value"] == 100000


def test_statefulset_alternative(rendered):
    sts_stack = rendered("examples/Pulumi.prod-statefulset.yaml")
    sts = sts_stack.one("StatefulSet", "llm-service")
    assert sts["spec"]["replicas"] == 3
    (template,) = sts["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "model-data"
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert template["spec"]["storageClassName"] == "fast-ssd"
    assert template["spec"]["resources"]["requests"]["storage"] == "500Gi"
    mount = next(m for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                 if m["name"] == "model-data")
    assert mount["mountPath"] == "/models"
    headless = sts_stack.one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert sts_stack.one("HorizontalPodAutoscaler", "llm-service-hpa")["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    # The article's per-replica volumes, created ahead of the pods under the template's names so that each is filled
    # by a Job of its own (tests/platform/test_model_storage.py), with the template's spec.
    claims = sts_stack.of_kind("PersistentVolumeClaim")
    assert {c["metadata"]["name"] for c in claims} == {f"model-data-llm-service-{i}" for i in range(10)}
    assert all(c["spec"] == template["spec"] for c in claims)
