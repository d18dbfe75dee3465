"""Runtimes (builtin, vLLM), LLM-aware autoscaling (HPA on load, KEDA with scale to zero) and Helm add-ons."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from llm_platform import metric_contract
from llm_platform.config import ConfigError
from llm_platform.stack import parse_stack_config
from tests.conftest import render_values, stack_values


def prod_with(**model_changes):
    values = stack_values("prod")
    values["models"][0].update(model_changes)
    return values


# vLLM's image has no serving.fetch: the fill and the pods' model check use the platform's serving image.
VLLM_FILL = {"secretName": "hf-token", "image": "registry.example.com/llm-serving:1.0.0@sha256:076327a98784eff460e9a7a39cbc131d25a4e3ff9550357cdfcf65112ca56ed9"}


def container(result):
    workload = next(w for w in result.of_kind("Deployment") + result.of_kind("StatefulSet")
                    if w["metadata"]["name"] == "llm-service")
    return workload["spec"]["template"]["spec"]["containers"][0]


def test_hpa_scales_on_load_per_replica_from_the_adapter(rendered):
    prod = rendered("prod")
    pods_metric = next(m for m in prod.one("HorizontalPodAutoscaler", "llm-service-hpa")["spec"]["metrics"] if m["type"] == "Pods")
    assert pods_metric["pods"]["metric"]["name"] == "llm_load_per_replica"
    # Unset target: the replica's slot count, maxConcurrentSequences 32 from the sizing block.
    assert pods_metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "32"}
    rules = yaml.safe_load(prod.one("ConfigMap", "llm-prometheus-adapter-rules")["data"]["config.yaml"])["rules"]
    (rule,) = rules
    assert rule["name"]["as"] == "llm_load_per_replica"
    assert "llm_requests_running{<<.LabelMatchers>>}" in rule["metricsQuery"]
    assert "llm_requests_waiting{<<.LabelMatchers>>}" in rule["metricsQuery"]


def test_explicit_load_target():
    values = prod_with(autoscaling={"targetLoadPerReplica": 12})
    result = render_values("prod", values)
    pods_metric = next(m for m in result.one("HorizontalPodAutoscaler", "llm-service-hpa")["spec"]["metrics"] if m["type"] == "Pods")
    assert pods_metric["pods"]["target"]["averageValue"] == "12"


def test_vllm_runtime_follows_its_contract():
    values = prod_with(runtime="vllm", fill=VLLM_FILL)
    values["requireDigests"] = False  # the default image is pinned by tag
    del values["models"][0]["image"]
    result = render_values("prod", values)
    c = container(result)
    assert c["image"] == "vllm/vllm-openai:v0.30.0"
    assert c["command"][:2] == ["/bin/sh", "-c"] and c["command"][3] == "vllm"
    assert 'VLLM_API_KEY="$(cat "$API_KEYS_FILE")"' in c["command"][2] and 'exec vllm serve "$@"' in c["command"][2]
    args = c["args"]
    assert args[0] == "/models/llama-3.1-8b/0e9e39f249a1"
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    assert pairs["--served-model-name"] == "llama-3.1-8b" and pairs["--dtype"] == "bfloat16"
    assert (pairs["--max-model-len"], pairs["--tensor-parallel-size"], pairs["--gpu-memory-utilization"]) == \
        ("8192", "1", "0.9")
    assert pairs["--max-num-seqs"] == "32" and pairs["--port"] == "8000"
    env = {e["name"]: e for e in c["env"]}
    # The key comes from the mounted Secret file at start: never an env literal or env reference in the manifest.
    assert "VLLM_API_KEY" not in env and env["API_KEYS_FILE"]["value"] == "/var/run/secrets/llm-platform/api-keys"
    assert {"name": "api-keys", "mountPath": "/var/run/secrets/llm-platform", "readOnly": True} in c["volumeMounts"]
    assert not any("--api-key" in a for a in args)
    assert "MODEL_NAME" not in env
    assert {c[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {"/health"}
    rule = yaml.safe_load(result.one("ConfigMap", "llm-prometheus-adapter-rules")["data"]["config.yaml"])["rules"][0]
    assert "vllm:num_requests_running" in rule["metricsQuery"] and "llm_requests" not in rule["metricsQuery"]
    exprs = [r["expr"] for r in result.one("PrometheusRule")["spec"]["groups"][0]["rules"]]
    assert any("vllm:kv_cache_usage_perc" in e for e in exprs)
    assert any('http_requests_total{namespace="ai-production",pod=~"llm-service-.*",status="5xx"}' in e for e in exprs)
    assert not any("llm_" in e.split("{")[0] for e in exprs if "kube_" not in e and "certmanager" not in e)
    alerts = {r["alert"] for r in result.one("PrometheusRule")["spec"]["groups"][0]["rules"]}
    assert "LLMGpuIdleAboveMinimum" not in alerts      # vLLM reports no GPU utilization without DCGM


def test_vllm_gpu_idle_alert_with_dcgm_exporter():
    values = prod_with(runtime="vllm", fill=VLLM_FILL)
    values["addons"] = {"dcgmExporter": {"enabled": True}}
    result = render_values("prod", values)
    rules = {r["alert"]: r["expr"] for r in result.one("PrometheusRule")["spec"]["groups"][0]["rules"]}
    assert "DCGM_FI_DEV_GPU_UTIL" in rules["LLMGpuIdleAboveMinimum"]


def test_keda_scale_to_zero():
    values = prod_with(replicas=1, autoscaling={"mode": "keda", "minReplicas": 0, "maxReplicas": 10,
                                                "activationLoad": 2, "cooldownSeconds": 600})
    result = render_values("prod", values)
    assert [h["metadata"]["name"] for h in result.of_kind("HorizontalPodAutoscaler")] == ["llm-gateway-hpa"]
    so = result.one("ScaledObject", "llm-service")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 10, 600)
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-service"}
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    # The gateway's held requests wake the model; each term reads 0 when it has no series (no pods yet).
    assert meta["query"] == (
        '(sum(llm_requests_running{model="llama-3.1-8b",namespace="ai-production"}) or vector(0)) + '
        '(sum(llm_requests_waiting{model="llama-3.1-8b",namespace="ai-production"}) or vector(0)) + '
        '(sum(llm_gateway_pending_requests{model="llama-3.1-8b",namespace="ai-production"}) or vector(0))')
    assert (meta["threshold"], meta["activationThreshold"]) == ("32", "2")
    assert meta["serverAddress"] == "http://prometheus-operated.monitoring.svc:9090"
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    plan = result.outputs["capacityPlan"]["llm-service"]["autoscaling"]
    assert "scales to zero after 600 s without load and wakes above 2" in plan
    assert ("the gateway holds the first request after that up to 365 s while a pod is scheduled, load 14.96 GiB "
            "of weights (about 124 s estimated) and warm up, then 503 with Retry-After") in plan
    at_max = next(r["expr"] for r in result.one("PrometheusRule")["spec"]["groups"][0]["rules"]
                  if r["alert"] == "LLMReplicasAtMaximum")
    assert 'horizontalpodautoscaler="keda-hpa-llm-service"' in at_max


def test_scale_to_zero_needs_keda():
    values = prod_with(replicas=1, autoscaling={"minReplicas": 0})
    with pytest.raises(ConfigError, match=r"models\[0\]\.autoscaling\.minReplicas: 0 needs mode: keda \(an HPA "
                                          r"cannot scale to zero\)"):
        parse_stack_config("prod", values)


def test_a_query_naming_a_metric_the_runtime_lacks_fails_render(monkeypatch):
    broken = dataclasses.replace(metric_contract.VLLM, signals={
        k: v for k, v in metric_contract.VLLM.signals.items() if k != "ttft"})
    monkeypatch.setitem(metric_contract.RUNTIMES, "vllm", broken)
    with pytest.raises(ConfigError) as err:
        parse_stack_config("prod", prod_with(runtime="vllm", fill=VLLM_FILL))
    assert str(err.value) == ("stack 'prod': llm-platform:models[0].runtime: 'vllm': the vllm runtime exports no "
                              "ttft metric; the alerts, dashboard and autoscaler need it")


def test_helm_addons_are_pinned_and_wired():
    values = stack_values("prod")
    values["addons"] = {"kubePrometheusStack": {"enabled": True}, "prometheusAdapter": {"enabled": True},
                        "keda": {"enabled": True, "version": "2.16.0"},
                        "nvidiaDevicePlugin": {"enabled": True, "values": {"devicePlugin.enabled": "true"}},
                        "dcgmExporter": {"enabled": True}}
    result = render_values("prod", values)
    releases = {r["name"]: r for r in result.helm_releases()}
    assert {k: r["version"] for k, r in releases.items()} == {
        "kube-prometheus-stack": "62.7.0", "prometheus-adapter": "4.11.0", "keda": "2.16.0",
        "nvidia-device-plugin": "0.16.2", "dcgm-exporter": "3.5.0"}
    adapter = releases["prometheus-adapter"]["values"]
    assert adapter["prometheus"] == {"url": "http://prometheus-operated.monitoring.svc", "port": 9090}
    assert adapter["rules"]["custom"][0]["name"]["as"] == "llm_load_per_replica"
    plugin = releases["nvidia-device-plugin"]["values"]
    assert plugin["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert plugin["devicePlugin"] == {"enabled": "true"}
    assert releases["kube-prometheus-stack"]["values"]["grafana"]["sidecar"]["dashboards"]["label"] == \
        "grafana_dashboard"
    # The workloads wait for the add-ons (CRDs, metrics APIs) through depends_on; every release is parented.
    assert all(r.parent.endswith("ClusterAddons::cluster-addons") for r in result.resources
               if r.type == "kubernetes:helm.sh/v3:Release")


def test_no_addons_by_default(rendered):
    assert rendered("prod").helm_releases() == []
