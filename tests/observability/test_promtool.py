"""The rendered alert rules and every PromQL query of the metric contract, checked by Prometheus's own promtool.

`promtool check rules` parses the PrometheusRule; every query (alerts, dashboard, KEDA trigger, prometheus-adapter
rule) is also parsed as a recording rule for both runtimes; `promtool test rules` unit tests feed each alert
series that must make it fire, and series that must not.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

import pytest
import yaml

from llm_platform.metric_contract import RUNTIMES, model_queries
from tests.conftest import render_values, stack_values


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: .ci/run installs Debian's `prometheus` package")
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return path


@pytest.fixture(scope="module")
def prod_rules(tmp_path_factory):
    values = stack_values("prod")
    result = render_values("prod", values)
    rule = result.one("PrometheusRule")
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path, {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


def run(promtool, *args, cwd=None):
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_rendered_rules_pass_promtool_check(promtool, prod_rules):
    path, rules = prod_rules
    proc = run(promtool, "check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def test_promtool_check_catches_a_broken_expression(promtool, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"alert": "Broken", "expr": "sum(rate(llm_requests_total[5m]) /", "for": "1m"}]}]}))
    assert run(promtool, "check", "rules", str(bad)).returncode != 0


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_every_contract_query_parses(promtool, tmp_path, runtime):
    q = model_queries(RUNTIMES[runtime], namespace="ns", workload="m", served_model_name="m", hpa_name="m-hpa",
                      min_replicas=1, certificate="m-tls", dcgm=True, gateway=True)
    exprs = {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if isinstance(getattr(q, f.name), str)}
    # prometheus-adapter fills its template before querying; any concrete matcher and grouping will do here.
    exprs["adapter_rule"] = q.adapter_rule["metricsQuery"].replace("<<.LabelMatchers>>", 'namespace="ns"') \
        .replace("<<.GroupBy>>", "pod")
    rules = [{"record": f"check:{name}", "expr": expr} for name, expr in exprs.items()]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "contract", "rules": rules}]}))
    proc = run(promtool, "check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(rules) >= 15 and "gateway_pending" in exprs


# ------------------------------------------------------------------------------------ promtool test rules

NS, POD, MODEL = "ai-production", "llm-service-7d9f-abcde", "llama-3.1-8b"
POD_LABELS = f'namespace="{NS}",pod="{POD}"'
OWN = f'namespace="{NS}",model="{MODEL}",pod="{POD}"'
HPA = f'namespace="{NS}",horizontalpodautoscaler="llm-service-hpa"'


def expected(rule, **extra_labels):
    return [{"exp_labels": {**rule["labels"], **extra_labels}, "exp_annotations": dict(rule["annotations"])}]


GATEWAY = f'namespace="{NS}",model="{MODEL}",pod="llm-gateway-5c7b-xyz12"'

# Alerts whose expression keeps a label of the series (the quantile and the gateway's ratio are per model).
EXTRA_LABELS = {"LLMTimeToFirstTokenSlow": {"model": MODEL}, "LLMGatewayServerErrors": {"model": MODEL}}


CASES = {
    # alert: (series that make it fire, series that must not, eval time)
    "LLMHighErrorRatio": (
        [(f'llm_requests_total{{{OWN},status="error",code="500"}}', "0+30x30"),
         (f'llm_requests_total{{{OWN},status="success",code="200"}}', "0+30x30")],
        [(f'llm_requests_total{{{OWN},status="error",code="500"}}', "0+1x30"),
         (f'llm_requests_total{{{OWN},status="error",code="400"}}', "0+50x30"),
         (f'llm_requests_total{{{OWN},status="success",code="200"}}', "0+99x30")],
        "20m"),
    "LLMTimeToFirstTokenSlow": (
        [(f'llm_time_to_first_token_seconds_bucket{{{OWN},le="1"}}', "0x40"),
         (f'llm_time_to_first_token_seconds_bucket{{{OWN},le="5"}}', "0+10x40"),
         (f'llm_time_to_first_token_seconds_bucket{{{OWN},le="+Inf"}}', "0+10x40")],
        [(f'llm_time_to_first_token_seconds_bucket{{{OWN},le="1"}}', "0+10x40"),
         (f'llm_time_to_first_token_seconds_bucket{{{OWN},le="5"}}', "0+10x40"),
         (f'llm_time_to_first_token_seconds_bucket{{{OWN},le="+Inf"}}', "0+10x40")],
        "30m"),
    "LLMQueueBacklog": ([(f"llm_requests_waiting{{{OWN}}}", "25x30")], [(f"llm_requests_waiting{{{OWN}}}", "3x30")], "20m"),
    "LLMKVCacheNearlyFull": ([(f"llm_kv_cache_usage_ratio{{{OWN}}}", "0.95x30")],
                             [(f"llm_kv_cache_usage_ratio{{{OWN}}}", "0.6x30")], "20m"),
    "LLMPodRestarting": ([(f'kube_pod_container_status_restarts_total{{{POD_LABELS},container="llm-api"}}', "0+1x30")],
                         [(f'kube_pod_container_status_restarts_total{{{POD_LABELS},container="llm-api"}}', "0x30")],
                         "20m"),
    "LLMPodCrashLooping": (
        [(f'kube_pod_container_status_waiting_reason{{{POD_LABELS},container="llm-api",reason="CrashLoopBackOff"}}',
          "1x30")],
        [(f'kube_pod_container_status_waiting_reason{{{POD_LABELS},container="llm-api",reason="CrashLoopBackOff"}}',
          "0x30")],
        "20m"),
    "LLMReplicasAtMaximum": (
        [(f"kube_horizontalpodautoscaler_status_current_replicas{{{HPA}}}", "10x30"),
         (f"kube_horizontalpodautoscaler_spec_max_replicas{{{HPA}}}", "10x30")],
        [(f"kube_horizontalpodautoscaler_status_current_replicas{{{HPA}}}", "6x30"),
         (f"kube_horizontalpodautoscaler_spec_max_replicas{{{HPA}}}", "10x30")],
        "20m"),
    "LLMGpuIdleAboveMinimum": (
        [(f'llm_gpu_utilization{{{POD_LABELS},gpu_id="0"}}', "2x60"),
         (f"kube_horizontalpodautoscaler_status_current_replicas{{{HPA}}}", "5x60")],
        [(f'llm_gpu_utilization{{{POD_LABELS},gpu_id="0"}}', "2x60"),
         (f"kube_horizontalpodautoscaler_status_current_replicas{{{HPA}}}", "2x60")],
        "50m"),
    "LLMGatewayRequestsHeld": (
        # Held for a cold start that never completes (or every pod saturated), against a brief hold.
        [(f"llm_gateway_pending_requests{{{GATEWAY}}}", "3x30")],
        [(f"llm_gateway_pending_requests{{{GATEWAY}}}", "3x5 0x25")],
        "25m"),
    "LLMGatewayServerErrors": (
        [(f'llm_gateway_requests_total{{{GATEWAY},code="503"}}', "0+30x30"),
         (f'llm_gateway_requests_total{{{GATEWAY},code="200"}}', "0+30x30")],
        [(f'llm_gateway_requests_total{{{GATEWAY},code="503"}}', "0+1x30"),
         (f'llm_gateway_requests_total{{{GATEWAY},code="429"}}', "0+50x30"),
         (f'llm_gateway_requests_total{{{GATEWAY},code="200"}}', "0+99x30")],
        "20m"),
    "LLMAttentionFallback": (
        # A GPU pod on SDPA, against one on the Triton kernel and a CPU pod on SDPA (CPU has nothing faster).
        [(f'llm_engine_info{{{OWN},device="cuda:0",attention="sdpa",block_size="16"}}', "1x30")],
        [(f'llm_engine_info{{{OWN},device="cuda:0",attention="triton",block_size="16"}}', "1x30"),
         (f'llm_engine_info{{namespace="{NS}",model="{MODEL}",pod="cpu-pod",device="cpu",attention="sdpa",'
          f'block_size="16"}}', "1x30")],
        "20m"),
    "LLMCertificateExpiringSoon": (
        # Expiry 5 days after the start of the test clock (t=0), evaluated 2 hours in.
        [(f'certmanager_certificate_expiration_timestamp_seconds{{namespace="{NS}",name="llm-tls"}}', "432000x180")],
        [(f'certmanager_certificate_expiration_timestamp_seconds{{namespace="{NS}",name="llm-tls"}}', "8640000x180")],
        "2h"),
}


@pytest.mark.parametrize("alert", sorted(CASES))
def test_alert_fires_on_bad_series_and_not_on_good(promtool, prod_rules, tmp_path, alert):
    path, rules = prod_rules
    assert alert in rules, f"{alert} is not rendered"
    firing, quiet, at = CASES[alert]

    def case(series, exp):
        return {"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
                "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": exp}]}

    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(path)], "evaluation_interval": "1m",
                                     "tests": [case(firing, expected(rules[alert], **EXTRA_LABELS.get(alert, {}))),
                                               case(quiet, [])]},
                                    sort_keys=False))
    proc = run(promtool, "test", "rules", str(tests))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_test_catches_an_alert_that_does_not_fire(promtool, prod_rules, tmp_path):
    """The unit-test harness itself can fail: a queue of 3 must not satisfy an expectation that it fires."""
    path, rules = prod_rules
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(path)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [{"series": f"llm_requests_waiting{{{OWN}}}", "values": "3x30"}],
        "alert_rule_test": [{"eval_time": "20m", "alertname": "LLMQueueBacklog",
                             "exp_alerts": expected(rules["LLMQueueBacklog"])}]}]}))
    assert run(promtool, "test", "rules", str(tests)).returncode != 0
