"""The metric contract against the real server, and the platform's queries in a real Prometheus.

1. Every name the contract lists for the builtin runtime appears on the real server's /metrics.
2. A real Prometheus (Debian's `prometheus`) on loopback scrapes the real server while it serves streams; the
   autoscaling queries (KEDA's total load, prometheus-adapter's per-pod rule as the adapter fills it) and an alert
   expression are evaluated against that live data through Prometheus's HTTP API.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from components.observability import ObservedModel, alert_group
from llm_platform.config import ModelConfig, ObservabilityConfig
from llm_platform.metric_contract import BUILTIN, model_queries
from tests.serving.server import MODEL_NAME, ServerProcess, free_port

NAMESPACE, POD, WORKLOAD = "ai-production", "llm-service-0", "llm-service"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # Two slots and a deep queue: concurrent streams keep requests both running and waiting.
    proc = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("live") / "server.log",
                         env={"MAX_NUM_SEQS": "2", "MAX_QUEUE": "64"})
    try:
        proc.wait_started()
        yield proc
    finally:
        proc.terminate()


def exposed_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_every_builtin_contract_metric_is_on_metrics(server):
    names = exposed_names(httpx.get(f"{server.url}/metrics", timeout=10).text)
    missing = []
    for metric in BUILTIN.metrics:
        # Counters are listed with _total; the parser names their family without it.
        candidates = {metric, metric.removesuffix("_total")}
        if not candidates & names:
            missing.append(metric)
    assert not missing, f"contract names missing from /metrics: {missing}"


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing in CI: .ci/run installs Debian's `prometheus` package")
        pytest.skip("prometheus not installed (Debian: apt-get install prometheus)")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "llm-serving",
            "static_configs": [{"targets": [server.url.removeprefix("http://")],
                                # What the ServiceMonitor's Kubernetes discovery attaches to every series.
                                "labels": {"namespace": NAMESPACE, "pod": POD}}],
        }],
    }))
    port = free_port()
    process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("prometheus did not become ready:\n" + (workdir / "prometheus.log").read_text())
        yield url
    finally:
        process.terminate()
        process.wait(30)


def query(prometheus_url: str, expr: str) -> list[dict]:
    response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def wait_for(prometheus_url: str, expr: str, accept, timeout: float = 45) -> list[dict]:
    deadline = time.monotonic() + timeout
    result: list[dict] = []
    while time.monotonic() < deadline:
        result = query(prometheus_url, expr)
        if accept(result):
            return result
        time.sleep(0.5)
    pytest.fail(f"{expr!r} never satisfied the check; last result {result}")


class Load:
    """Keeps `concurrency` streaming completions going until stopped."""

    def __init__(self, url: str, concurrency: int = 6):
        self.url, self.stop = url, threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(concurrency)]
        self.errors: list[str] = []

    def run(self):
        body = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 200, "ignore_eos": True,
                "stream": True}
        while not self.stop.is_set():
            try:
                with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as response:
                    if response.status_code != 200:
                        self.errors.append(str(response.status_code))
                    for _ in response.iter_lines():
                        pass
            except httpx.HTTPError as exc:
                self.errors.append(repr(exc))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_autoscaling_queries_and_an_alert_on_live_data(server, prometheus):
    queries = model_queries(BUILTIN, namespace=NAMESPACE, workload=WORKLOAD, served_model_name=MODEL_NAME,
                            hpa_name=f"{WORKLOAD}-hpa", min_replicas=1, certificate=None, dcgm=False)
    # prometheus-adapter fills its template with the HPA's pods and groups by pod.
    adapter = queries.adapter_rule["metricsQuery"].replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod="{POD}"') \
        .replace("<<.GroupBy>>", "pod")
    model = ModelConfig(name=WORKLOAD, served_model_name=MODEL_NAME, model_path="/models/tiny", image="x:1")
    # An objective no real request can meet, so the alert expression must select the live series.
    rules = alert_group(ObservedModel(model, queries), ObservabilityConfig(ttft_slo_seconds=1e-6))["rules"]
    ttft_alert = next(r["expr"] for r in rules if r["alert"] == "LLMTimeToFirstTokenSlow")
    backlog_alert = next(r["expr"] for r in rules if r["alert"] == "LLMQueueBacklog")

    with Load(server.url) as load:
        total = wait_for(prometheus, queries.load_total, lambda r: r and float(r[0]["value"][1]) >= 3)
        per_pod = wait_for(prometheus, adapter, lambda r: r and float(r[0]["value"][1]) >= 3)
        waiting = wait_for(prometheus, queries.waiting, lambda r: r and float(r[0]["value"][1]) >= 1)
        firing = wait_for(prometheus, ttft_alert, lambda r: len(r) == 1)
    assert not load.errors, load.errors[:5]
    # Six streams against two slots: two run, the rest wait; both halves of the signal are live.
    assert float(total[0]["value"][1]) <= 6
    assert per_pod[0]["metric"] == {"pod": POD}
    assert float(waiting[0]["value"][1]) <= 4
    assert firing[0]["metric"]["model"] == MODEL_NAME and float(firing[0]["value"][1]) > 1e-6
    # A healthy queue (at most 4 waiting) stays under the backlog threshold of 10: that alert selects nothing.
    assert query(prometheus, backlog_alert) == []


def test_the_keda_trigger_reads_zero_not_nothing_for_a_model_without_pods(server, prometheus):
    """At zero replicas no series exist; a sum over none is no value, and KEDA must read 0 plus the gateway's held
    requests, not nothing. A real Prometheus evaluates the rendered trigger for a model that has no pods."""
    queries = model_queries(BUILTIN, namespace=NAMESPACE, workload="asleep", served_model_name="asleep-model",
                            hpa_name=None, min_replicas=0, certificate=None, dcgm=False, gateway=True)
    wait_for(prometheus, queries.waiting.replace("asleep-model", MODEL_NAME), lambda r: bool(r))  # scraped
    (sample,) = query(prometheus, queries.load_total)
    assert sample["metric"] == {} and float(sample["value"][1]) == 0
    # The bare sums, as the trigger was written before, give nothing at all.
    assert query(prometheus, queries.load_total.replace(" or vector(0)", "")) == []
