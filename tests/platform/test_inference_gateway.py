"""InferenceGateway: the stack's one endpoint (prod turns it on), its routes, its policies, and the rules around it."""
from __future__ import annotations

import json

import pytest

from llm_platform.config import ConfigError
from llm_platform.stack import parse_stack_config
from tests.conftest import render_values, stack_values


def prod_with_gateway(**gateway):
    values = stack_values("prod")
    values["gateway"] = {**values.get("gateway", {}), **gateway}
    return values


def scale_to_zero(values):
    values["models"][0].update(replicas=1, autoscaling={"mode": "keda", "minReplicas": 0, "maxReplicas": 10})
    return values


def config_error(values, stack="prod") -> str:
    with pytest.raises(ConfigError) as err:
        parse_stack_config(stack, values)
    return str(err.value)


def test_prod_runs_the_gateway_in_front_of_the_model(rendered):
    prod = rendered("prod")
    d = prod.one("Deployment", "llm-gateway")
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "registry.example.com/llm-serving:1.0.0@sha256:076327a98784eff460e9a7a39cbc131d25a4e3ff9550357cdfcf65112ca56ed9"    # the serving image, from the model
    assert c["command"] == ["python", "-m", "serving.gateway"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["ROUTES_FILE"] == "/etc/llm-gateway/routes.json"
    assert env["API_KEYS_FILE"] == "/var/run/secrets/llm-platform/api-keys"
    assert env["PORT"] == "8000" and env["DRAIN_SECONDS"] == "30"
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and "nodeSelector" not in pod
    assert (c["livenessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["path"]) == \
        ("/health/live", "/health/ready")
    assert c["securityContext"]["readOnlyRootFilesystem"] and pod["automountServiceAccountToken"] is False
    assert pod["priorityClassName"] == "llm-inference"
    assert {v["name"] for v in pod["volumes"]} == {"routes", "api-keys", "tmp"}
    # The routes file: the model's headless Service (ready pods only), and the plan's numbers.
    routes = json.loads(prod.one("ConfigMap", "llm-gateway-routes")["data"]["routes.json"])
    assert routes == {"models": [{"model": "llama-3.1-8b", "service": "llm-service-endpoints.ai-production.svc",
                                  "port": 8000, "coldStartTimeoutSeconds": 365, "maxQueue": 256,
                                  "maxInflightPerPod": 64}]}
    endpoints = prod.one("Service", "llm-service-endpoints")["spec"]
    assert endpoints["clusterIP"] == "None" and endpoints["publishNotReadyAddresses"] is False
    assert endpoints["selector"] == {"app": "llm-service"}
    svc = prod.one("Service", "llm-gateway")["spec"]
    assert svc["type"] == "ClusterIP" and svc["ports"][0]["port"] == 80
    hpa = prod.one("HorizontalPodAutoscaler", "llm-gateway-hpa")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-gateway"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert prod.one("PodDisruptionBudget", "llm-gateway-pdb")["spec"]["maxUnavailable"] == 1
    assert prod.outputs["endpoints"] == {"llm-service": "https://llm-api.example.com/v1"}


def test_a_new_routes_file_rolls_the_gateway():
    before = render_values("prod", stack_values("prod")).one("Deployment", "llm-gateway")
    after = render_values("prod", prod_with_gateway(maxQueuePerModel=32)).one("Deployment", "llm-gateway")
    key = "llm-platform/routes-sha256"
    assert before["spec"]["template"]["metadata"]["annotations"][key] != \
        after["spec"]["template"]["metadata"]["annotations"][key]


def test_the_ingress_holds_streams_through_a_cold_start(rendered):
    annotations = rendered("prod").one("Ingress", "llm-gateway")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    # ingress-nginx's 60 s default would cut a request the gateway holds for the 300 s cold start.
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 300
    values = stack_values("prod")
    values["ingress"]["annotations"] = {"nginx.ingress.kubernetes.io/proxy-read-timeout": "7200"}
    ing = render_values("prod", values).one("Ingress", "llm-gateway")
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "7200"


def test_gateway_policies_admit_the_ingress_controller_and_reach_only_model_pods(rendered):
    prod = rendered("prod")
    spec = prod.one("NetworkPolicy", "llm-gateway-ingress")["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/component": "llm-gateway",
                                                   "app.kubernetes.io/part-of": "llm-platform"}}
    namespaces = {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                  for p in spec["ingress"][0]["from"] if "namespaceSelector" in p}
    assert namespaces == {"api-gateway", "ingress-nginx", "monitoring"}
    (egress,) = prod.one("NetworkPolicy", "llm-gateway-egress")["spec"]["egress"]
    assert egress == {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "llm-serving",
                                                              "app.kubernetes.io/part-of": "llm-platform"}}}],
                      "ports": [{"protocol": "TCP", "port": 8000}]}


def test_the_gateway_is_scraped_and_alerted_on(rendered):
    prod = rendered("prod")
    monitor = prod.one("ServiceMonitor", "llm-gateway")["spec"]
    assert monitor["selector"] == {"matchLabels": {"app": "llm-gateway"}}
    groups = {g["name"]: g for g in prod.one("PrometheusRule")["spec"]["groups"]}
    alerts = {r["alert"]: r["expr"] for r in groups["llm-gateway"]["rules"]}
    assert alerts["LLMGatewayRequestsHeld"] == \
        '(sum(llm_gateway_pending_requests{model="llama-3.1-8b",namespace="ai-production"})) > 0'
    assert 'llm_gateway_requests_total{code=~"5.."}' in alerts["LLMGatewayServerErrors"]
    panels = json.loads(prod.one("ConfigMap", "llm-service-dashboard")["data"]["llm-service.json"])["panels"]
    assert "Requests held in the gateway" in {p["title"] for p in panels}


def test_keda_scale_to_zero_wakes_on_what_the_gateway_holds():
    result = render_values("prod", scale_to_zero(stack_values("prod")))
    query = result.one("ScaledObject", "llm-service")["spec"]["triggers"][0]["metadata"]["query"]
    assert '(sum(llm_gateway_pending_requests{model="llama-3.1-8b",namespace="ai-production"}) or vector(0))' \
        in query


def test_scale_to_zero_without_the_gateway_is_refused():
    values = scale_to_zero(stack_values("prod"))
    values["gateway"] = {"enabled": False}
    assert config_error(values) == (
        "stack 'prod': llm-platform:models[0].autoscaling.minReplicas: 0 needs gateway.enabled: true; at zero "
        "replicas no pod exports the load KEDA reads, so nothing would ever wake the model, and requests would fail "
        "at once instead of being held; turn the gateway on (it holds the first request and its pending count wakes "
        "the model) or use minReplicas 1")


def test_a_cold_start_timeout_shorter_than_the_load_is_refused_for_scale_to_zero():
    values = scale_to_zero(prod_with_gateway(coldStartTimeoutSeconds=30))
    assert config_error(values).startswith(
        "stack 'prod': llm-platform:gateway.coldStartTimeoutSeconds: 30 is shorter than the estimated 124 s models[0] "
        "(llm-service) needs to load its weights and warm up, so every request that wakes it from zero would get 503")
    # A model that never scales to zero is never woken: the same timeout only bounds restarts.
    parse_stack_config("prod", prod_with_gateway(coldStartTimeoutSeconds=30))


def test_explicit_gateway_limits_reach_the_routes_file():
    result = render_values("prod", prod_with_gateway(coldStartTimeoutSeconds=600, maxInflightPerPod=40,
                                                     maxQueuePerModel=10))
    (route,) = json.loads(result.one("ConfigMap", "llm-gateway-routes")["data"]["routes.json"])["models"]
    assert (route["coldStartTimeoutSeconds"], route["maxInflightPerPod"], route["maxQueue"]) == (600, 40, 10)
    plan = result.outputs["capacityPlan"]["llm-service"]["summary"]
    assert ("  gateway: at most 40 request(s) in flight per pod, the rest queued; with no ready pod a request is "
            "held up to 600 s, then 503 with Retry-After") in plan


def test_several_models_share_the_one_endpoint():
    values = stack_values("prod")
    first = values["models"][0]
    values["models"].append({**first, "name": "llm-small", "servedModelName": "llama-3.2-1b",
                             "storage": {**first["storage"], "claimName": "small-pvc"},
                             "autoscaling": {**first["autoscaling"], "maxReplicas": 4}})
    values["models"][0] = {**first, "autoscaling": {**first["autoscaling"], "maxReplicas": 6}}
    result = render_values("prod", values)
    assert [i["metadata"]["name"] for i in result.of_kind("Ingress")] == ["llm-gateway"]
    routes = json.loads(result.one("ConfigMap", "llm-gateway-routes")["data"]["routes.json"])["models"]
    assert [(r["model"], r["service"]) for r in routes] == [
        ("llama-3.1-8b", "llm-service-endpoints.ai-production.svc"),
        ("llama-3.2-1b", "llm-small-endpoints.ai-production.svc")]
    assert result.outputs["endpoints"] == {"llm-service": "https://llm-api.example.com/v1",
                                           "llm-small": "https://llm-api.example.com/v1"}


@pytest.mark.parametrize("change, message", [
    (lambda v: v["models"][0].update(host="other.example.com"),
     "models[0].host: 'other.example.com': with gateway.enabled every model is served at the gateway's one host"),
    (lambda v: v["models"].append({**v["models"][0], "name": "llm-copy"}),
     "models[1].servedModelName: 'llama-3.1-8b' is already served by models[0]; the gateway routes by this name"),
    (lambda v: v["gateway"].update(image="registry.example.com/llm-serving:main"),
     "gateway.image: 'registry.example.com/llm-serving:main' is not pinned"),
    (lambda v: v["gateway"].update(image="registry.example.com/llm-serving"),
     "gateway.image: 'registry.example.com/llm-serving' is not pinned"),
    (lambda v: v["models"][0].update(runtime="vllm", image=None, source=None, fill=None),
     "gateway.image: is required when no model names the llm-platform serving image"),
    (lambda v: v["gateway"].update(autoscaling={"minReplicas": 3, "maxReplicas": 2}),
     "gateway.autoscaling.maxReplicas: 2 is below minReplicas 3"),
    (lambda v: v["gateway"].update(replicas=9),
     "gateway.replicas: 9 is outside gateway.autoscaling minReplicas..maxReplicas (2..6)"),
    (lambda v: v["gateway"].update(drainSeconds=45),
     "gateway.drainSeconds: 45 does not fit terminationGracePeriodSeconds 60"),
    (lambda v: v["gateway"].update(resources={"requests": {"cpu": "4", "memory": "1Gi"},
                                              "limits": {"cpu": "2", "memory": "1Gi"}}),
     "gateway.resources.requests.cpu: 4 is above the limit 2"),
    (lambda v: v["guardrails"]["limitRange"].update(maxCpu="1"),
     "gateway.resources.limits.cpu: 2 is above guardrails.limitRange.maxCpu 1"),
    (lambda v: v["guardrails"]["resourceQuota"].update(requestsCpu="44"),
     "guardrails.resourceQuota.requestsCpu: 44 is below what the models need at maxReplicas and the gateway at "
     "its maxReplicas (plus one surge pod) (requests.cpu 47)"),
    (lambda v: v["gateway"].update(coldStartTimeoutSeconds=0),
     "gateway.coldStartTimeoutSeconds: 0"),
    (lambda v: v["gateway"].update(holdSeconds=10), "gateway.holdSeconds"),
])
def test_bad_gateway_config_is_one_clear_error(change, message):
    values = stack_values("prod")
    change(values)
    for key in ("image", "source", "fill"):  # None stands for "not set"
        if key in values["models"][0] and values["models"][0][key] is None:
            del values["models"][0][key]
    assert config_error(values).startswith(f"stack 'prod': llm-platform:{message}")
