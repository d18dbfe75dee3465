"""Each component built alone under the recording mocks, asserting the captured resource inputs."""
from __future__ import annotations

import dataclasses

from components import (
    GpuPool,
    GpuPoolArgs,
    Guardrails,
    GuardrailsArgs,
    LLMServing,
    LLMServingArgs,
    Observability,
    ObservabilityArgs,
)
from llm_platform.config import (
    GpuPoolConfig,
    GuardrailsConfig,
    IngressConfig,
    ModelConfig,
    ObservabilityConfig,
    PriorityClassConfig,
    ProbesConfig,
    RolloutConfig,
    StartupProbeConfig,
)
from render import to_manifest
from tests.platform.planned import planned

MODEL_CONFIG = ModelConfig(name="chat", served_model_name="chat-8b", model_path="/models/chat-8b",
                           image="registry.example.com/llm-serving:2.1.0", rollout=RolloutConfig(1, 0),
                           probes=ProbesConfig(startup=StartupProbeConfig(failure_threshold=30)))
MODEL = planned(MODEL_CONFIG)


def captured(result, type_suffix):
    return [r for r in result.resources if r.type.endswith(type_suffix)]


def test_gpu_pool_creates_priority_class_and_scheduling(in_mocks):
    pools = []
    result = in_mocks(lambda: pools.append(GpuPool("pool", GpuPoolArgs(pool=GpuPoolConfig(
        node_selector={"gpu": "h100"}, runtime_class_name="nvidia",
        priority_class=PriorityClassConfig(name="llm-critical", value=5000))))))
    (component,) = captured(result, ":GpuPool")
    assert component.type == "llm-platform:index:GpuPool"
    (pc,) = captured(result, "PriorityClass")
    assert pc.inputs["value"] == 5000 and pc.inputs["metadata"]["name"] == "llm-critical"
    assert pc.parent.endswith("llm-platform:index:GpuPool::pool")
    assert pools[0].scheduling == {
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "runtimeClassName": "nvidia", "priorityClassName": "llm-critical"}


def test_gpu_pool_without_priority_class_creates_nothing(in_mocks):
    result = in_mocks(lambda: GpuPool("pool", GpuPoolArgs(pool=GpuPoolConfig())))
    assert [r.type for r in result.resources] == ["llm-platform:index:GpuPool"]


def test_guardrails_resources(in_mocks):
    result = in_mocks(lambda: Guardrails("g", GuardrailsArgs(
        namespace="llm-x", guardrails=GuardrailsConfig(), model_names=["a", "b"],
        ingress_controller_namespace="ingress-nginx")))
    kinds = sorted(to_manifest(r.inputs)["kind"] for r in result.resources if r.is_kubernetes)
    assert kinds == sorted(["Namespace", "ResourceQuota", "LimitRange", "PodDisruptionBudget", "PodDisruptionBudget",
                            "ServiceAccount", "Secret", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy",
                            "NetworkPolicy"])
    pdbs = {m["metadata"]["name"]: m["spec"] for m in result.of_kind("PodDisruptionBudget")}
    assert pdbs["a-pdb"] == {"selector": {"matchLabels": {"app": "a"}}, "maxUnavailable": 1,
                             "unhealthyPodEvictionPolicy": "AlwaysAllow"}
    (password,) = captured(result, "RandomPassword")
    assert password.inputs["length"] == 48 and password.inputs["special"] is False
    ns = {m["metadata"]["namespace"] for m in result.manifests() if m["kind"] != "Namespace"}
    assert ns == {"llm-x"}


def test_guardrails_optional_pieces_switch_off(in_mocks):
    cfg = GuardrailsConfig(network_policies=False,
                           resource_quota=dataclasses.replace(GuardrailsConfig().resource_quota, enabled=False),
                           limit_range=dataclasses.replace(GuardrailsConfig().limit_range, enabled=False))
    result = in_mocks(lambda: Guardrails("g", GuardrailsArgs(namespace="n", guardrails=cfg, model_names=["a"])))
    assert not result.of_kind("NetworkPolicy") and not result.of_kind("ResourceQuota")
    assert not result.of_kind("LimitRange")


def serving_args(model=MODEL, ingress=IngressConfig(), host="chat.example.com"):
    return LLMServingArgs(namespace="llm-x", model=model, ingress=ingress, host=host, tls_secret_name="chat-tls",
                          service_account="sa", api_key_secret="keys", scheduling={"nodeSelector": {"gpu": "yes"}})


def test_llm_serving_deployment(in_mocks):
    servings = []
    result = in_mocks(lambda: servings.append(LLMServing("chat", serving_args())))
    kinds = sorted(m["kind"] for m in result.manifests())
    # The model claim belongs to ModelStorage (tests/platform/test_model_storage.py).
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "Ingress", "Service"]
    d = result.one("Deployment", "chat")
    assert d["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "yes"}
    assert d["spec"]["template"]["spec"]["serviceAccountName"] == "sa"
    assert result.one("Ingress")["spec"]["tls"] == [{"hosts": ["chat.example.com"], "secretName": "chat-tls"}]
    (component,) = captured(result, ":LLMServing")
    assert component.name == "chat"
    assert {r.name for r in result.resources if r.is_kubernetes} == {
        "chat-deployment", "chat-service", "chat-hpa", "chat-ingress"}


def test_llm_serving_statefulset_without_ingress_or_hpa(in_mocks):
    model = planned(dataclasses.replace(MODEL_CONFIG, workload="statefulset", replicas=3,
                                        storage=dataclasses.replace(MODEL_CONFIG.storage, access_mode="ReadWriteOnce"),
                                        autoscaling=dataclasses.replace(MODEL_CONFIG.autoscaling, enabled=False)))
    result = in_mocks(lambda: LLMServing("chat", serving_args(model, IngressConfig(enabled=False), None)))
    assert sorted(m["kind"] for m in result.manifests()) == ["Service", "Service", "StatefulSet"]
    sts = result.one("StatefulSet")
    assert sts["spec"]["serviceName"] == "chat-headless"
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_llm_serving_cpu_model_gets_no_gpu_scheduling(in_mocks):
    model = planned(dataclasses.replace(MODEL_CONFIG, gpus_per_replica=0))
    result = in_mocks(lambda: LLMServing("chat", serving_args(model)))
    pod = result.one("Deployment")["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]


def observed(name):
    from components.observability import ObservedModel
    from llm_platform.metric_contract import BUILTIN, model_queries
    q = model_queries(BUILTIN, namespace="n", workload=name, served_model_name=name, hpa_name=f"{name}-hpa",
                      min_replicas=2, certificate=None, dcgm=False)
    return ObservedModel(dataclasses.replace(MODEL_CONFIG, name=name), q)


def test_observability_with_and_without_operator(in_mocks):
    with_op = in_mocks(lambda: Observability("o", ObservabilityArgs(
        namespace="n", observability=ObservabilityConfig(prometheus_operator=True),
        models=[observed("a"), observed("b")])))
    assert sorted(m["kind"] for m in with_op.manifests()) == \
        ["ConfigMap", "ConfigMap", "ConfigMap", "PrometheusRule", "ServiceMonitor", "ServiceMonitor"]
    groups = with_op.one("PrometheusRule")["spec"]["groups"]
    assert [g["name"] for g in groups] == ["llm-serving-a", "llm-serving-b"]
    rules = with_op.one("ConfigMap", "llm-prometheus-adapter-rules")["data"]["config.yaml"]
    assert rules.count("seriesQuery") == 1      # the same rule serves both builtin models
    without = in_mocks(lambda: Observability("o", ObservabilityArgs(
        namespace="n", observability=ObservabilityConfig(prometheus_operator=False, grafana_dashboard=False),
        models=[observed("a")])))
    assert [m["kind"] for m in without.manifests()] == ["ConfigMap"]   # the adapter rules only


def test_whole_program_parents_every_resource_under_a_component(rendered):
    """Components parent every child; only the components themselves sit at the stack root."""
    result = rendered("prod")
    components = {"llm-platform:index:ClusterAddons", "llm-platform:index:GpuPool", "llm-platform:index:Guardrails", "llm-platform:index:LLMServing",
                  "llm-platform:index:ModelStorage", "llm-platform:index:Observability",
                  "llm-platform:index:InferenceGateway"}
    for r in result.resources:
        if r.type in components:
            assert r.parent.endswith("pulumi:pulumi:Stack::llm-platform-prod"), r.parent
        else:
            assert any(f"{c}::" in (r.parent or "") for c in components), (r.type, r.name, r.parent)


def test_llm_serving_refuses_an_unplanned_model(in_mocks):
    import pytest
    unplanned = dataclasses.replace(MODEL_CONFIG, rollout=None)
    with pytest.raises(TypeError, match="needs a planned model"):
        in_mocks(lambda: LLMServing("chat", serving_args(unplanned)))
