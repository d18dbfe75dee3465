"""Pure builders and quantity arithmetic, tested on plain data without mocks."""
from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest

from components.guardrails import network_policy_specs, pdb_spec, resource_quota_hard
from components.observability import ObservedModel, alert_group, dashboard, scrape_annotations
from llm_platform.builders import (
    container_resources,
    container_security_context,
    gpu_scheduling,
    hpa_spec,
    pod_spec,
    probes,
    serving_env,
)
from llm_platform.config import (
    AllowFromConfig,
    GpuPoolConfig,
    GuardrailsConfig,
    ModelConfig,
    ObservabilityConfig,
    PdbConfig,
    ProbesConfig,
    RolloutConfig,
    StartupProbeConfig,
    Toleration,
)
from llm_platform.metric_contract import BUILTIN, PLATFORM_METRICS, VLLM, ContractError, model_queries
from llm_platform.quantities import QuantityError, parse_quantity
from llm_platform.stack import parse_stack_config
from tests.conftest import stack_values
from tests.platform.planned import planned

MODEL_CONFIG = ModelConfig(name="m", served_model_name="m-1b", model_path="/models/m", image="r.example.com/s:1.2.3",
                           rollout=RolloutConfig(1, 0),
                           probes=ProbesConfig(startup=StartupProbeConfig(failure_threshold=30)))
MODEL = planned(MODEL_CONFIG)


@pytest.mark.parametrize("text, value", [
    ("500m", Decimal("0.5")), ("4", Decimal(4)), ("8Gi", Decimal(8 * 2**30)), ("5Ti", Decimal(5 * 2**40)),
    ("1e3", Decimal(1000)), ("1.5G", Decimal(1_500_000_000)), (2, Decimal(2)), ("128974848", Decimal(128974848)),
])
def test_parse_quantity(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize("bad", ["16 GB", "Gi", "1.2.3", "", "8gi", True])
def test_parse_quantity_rejects(bad):
    with pytest.raises(QuantityError):
        parse_quantity(bad)


def test_gpu_resources_requests_equal_limits():
    r = container_resources(planned(dataclasses.replace(MODEL_CONFIG, gpus_per_replica=2)))
    assert r["requests"]["nvidia.com/gpu"] == r["limits"]["nvidia.com/gpu"] == "2"
    cpu_only = planned(dataclasses.replace(MODEL_CONFIG, gpus_per_replica=0))
    assert "nvidia.com/gpu" not in container_resources(cpu_only)["limits"]


def test_env_never_exposes_all_gpus_and_passes_engine_settings():
    model = planned(dataclasses.replace(MODEL_CONFIG, max_num_seqs=32, max_model_len=4096, env={"LOG_LEVEL": "debug"}))
    env = {e["name"]: e["value"] for e in serving_env(model)}
    assert "NVIDIA_VISIBLE_DEVICES" not in env
    assert env["MAX_NUM_SEQS"] == "32" and env["MAX_MODEL_LEN"] == "4096" and env["LOG_LEVEL"] == "debug"
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"].startswith("/tmp/")


def test_security_context_is_restricted():
    sc = container_security_context()
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_probes_use_the_image_health_contract():
    p = probes(MODEL)
    assert [p[k]["httpGet"]["path"] for k in ("startupProbe", "livenessProbe", "readinessProbe")] == \
        ["/health/startup", "/health/live", "/health/ready"]
    # The startup budget covers a slow model load: 30 x 10 s.
    assert p["startupProbe"]["failureThreshold"] * p["startupProbe"]["periodSeconds"] == 300


def test_gpu_scheduling_fragment():
    pool = GpuPoolConfig(node_selector={"a": "b"}, tolerations=[Toleration(key="gpu", operator="Equal",
                                                                           value="h100", effect="NoExecute")])
    assert gpu_scheduling(pool, None) == {"nodeSelector": {"a": "b"}, "tolerations": [
        {"key": "gpu", "operator": "Equal", "value": "h100", "effect": "NoExecute"}]}


def test_pod_spec_deployment_mounts_shared_claim_read_only():
    spec = pod_spec(MODEL, service_account="sa", api_key_secret="keys", scheduling={"nodeSelector": {"x": "y"}})
    claim = next(v for v in spec["volumes"] if v["name"] == "model-storage")
    assert claim["persistentVolumeClaim"] == {"claimName": "model-pvc", "readOnly": True}
    assert spec["nodeSelector"] == {"x": "y"}
    assert spec["terminationGracePeriodSeconds"] == 60


def test_hpa_spec_targets_the_workload_kind():
    spec = hpa_spec(MODEL, "StatefulSet", 16)
    assert spec["scaleTargetRef"]["kind"] == "StatefulSet"
    assert spec["behavior"]["scaleUp"]["selectPolicy"] == "Max"


def test_quota_pdb_and_network_policies():
    g = GuardrailsConfig()
    assert resource_quota_hard(g)["fast-ssd.storageclass.storage.k8s.io/requests.storage"] == "5Ti"
    assert pdb_spec(dataclasses.replace(g, pdb=PdbConfig(max_unavailable=None, min_available=1)), "m")["minAvailable"] == 1
    specs = network_policy_specs(g, ingress_controller_namespace="ingress-nginx", prometheus_namespace="monitoring")
    assert set(specs) == {"default-deny-all", "allow-dns-egress", "llm-serving-ingress", "llm-serving-egress"}
    (rule,) = specs["llm-serving-ingress"]["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "api-gateway"}},
         "podSelector": {"matchLabels": {"app": "api-gateway"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
    ]
    no_egress = network_policy_specs(dataclasses.replace(g, egress_to=dataclasses.replace(g.egress_to, namespaces=[])))
    assert "llm-serving-egress" not in no_egress


def test_behind_the_gateway_model_pods_accept_only_the_gateway_and_prometheus():
    g = GuardrailsConfig(allow_from=AllowFromConfig(ip_blocks=["203.0.113.0/24"]))
    specs = network_policy_specs(g, prometheus_namespace="monitoring", gateway_pods={"app.kubernetes.io/component": "llm-gateway"})
    (rule,) = specs["llm-serving-ingress"]["ingress"]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "llm-gateway"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
    ]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]


def queries_for(rt, **changes):
    args = dict(namespace="ns", workload="m", served_model_name="m-1b", hpa_name="m-hpa", min_replicas=2,
                certificate="llm-tls", dcgm=False) | changes
    return model_queries(rt, **args)


@pytest.mark.parametrize("rt", [BUILTIN, VLLM], ids=["builtin", "vllm"])
def test_alerts_and_dashboard_only_use_the_runtime_contract(rt):
    import re
    q = queries_for(rt)
    exprs = [r["expr"] for r in alert_group(ObservedModel(MODEL_CONFIG, q), ObservabilityConfig())["rules"]]
    exprs += [t["expr"] for p in dashboard(ObservedModel(MODEL_CONFIG, q))["panels"] for t in p["targets"]]
    known = set(rt.metrics) | set(PLATFORM_METRICS)
    for expr in exprs:
        # Metric names: identifiers followed by a selector or a range, minus histogram suffixes.
        for used in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?=\{|\[)", expr):
            base = re.sub(r"_bucket$", "", used)
            assert base in known, (base, expr)
    other = {"vllm": "llm_requests_waiting", "builtin": "vllm:e2e_request_latency_seconds"}[rt.name]
    assert all(other not in e for e in exprs)


def test_a_runtime_without_a_signal_refuses_the_query():
    import dataclasses as dc
    broken = dc.replace(BUILTIN, name="broken", signals={k: v for k, v in BUILTIN.signals.items() if k != "kv_cache"})
    with pytest.raises(ContractError, match="the broken runtime exports no kv cache metric"):
        queries_for(broken)
    with pytest.raises(ContractError, match="'llm_queue_depth' is not exported by the builtin runtime"):
        BUILTIN.metric("llm_queue_depth")


def test_vllm_has_no_gpu_metric_unless_dcgm_runs():
    assert queries_for(VLLM).gpu_utilization is None
    assert "DCGM_FI_DEV_GPU_UTIL" in queries_for(VLLM, dcgm=True).gpu_utilization
    assert "llm_gpu_utilization" in queries_for(BUILTIN).gpu_utilization


def test_scrape_annotations_only_without_operator():
    assert scrape_annotations(ObservabilityConfig(prometheus_operator=True)) == {}
    assert scrape_annotations(ObservabilityConfig())["prometheus.io/port"] == "8000"


def test_partial_override_keeps_the_other_defaults():
    values = stack_values("prod")
    values["models"][0]["probes"] = {"startup": {"failureThreshold": 60}}
    values["models"][0]["resources"] = {"requests": {"cpu": "6"}}
    m = parse_stack_config("prod", values).models[0]
    assert (m.probes.startup.failure_threshold, m.probes.startup.period_seconds) == (60, 10)
    assert m.probes.liveness.initial_delay_seconds == 30
    resources = m.config.resources
    assert (resources.requests.cpu, resources.requests.memory, resources.limits.cpu) == ("6", "8Gi", "8")
