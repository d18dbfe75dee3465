"""The gateway end to end in front of two real model servers (the tiny model under two names), over real HTTP.

One gateway serves this module, with a keys file of named keys (two with limits) and routes to `tiny-a`, which runs
from the start, and `tiny-b`, whose server is started only once a request for it is waiting: the cold start from
zero. The model servers themselves are open (no keys), so what is checked here is the gateway's own key handling.
"""
from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.serving.gateway_process import GatewayProcess, wait_for
from tests.serving.server import ServerProcess, free_port, sample, scrape, sse_events

KEYS = {"alice": "sk-alice-0123456789", "limited": "sk-limited-0123456789", "tokens": "sk-tokens-0123456789"}
KEYS_FILE = (f"# gateway keys\nalice:{KEYS['alice']}\nlimited:{KEYS['limited']} rpm=2\n"
             f"tokens:{KEYS['tokens']} tpm=20\n")
ALICE = {"Authorization": f"Bearer {KEYS['alice']}"}


class LateServer:
    """The `tiny-b` server: its port is routed from the start; the process starts when the cold start says so."""

    def __init__(self, model_dir, log_path) -> None:
        self.model_dir = model_dir
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: ServerProcess | None = None

    def start(self) -> None:
        self.proc = ServerProcess(self.model_dir, self.log_path, port=self.port,
                                  args=("--model-name", "tiny-b", "--max-num-seqs", "4"))

    def stop(self) -> None:
        if self.proc is not None:
            assert self.proc.terminate() == 0, self.proc.log_text()
            self.proc = None


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    """`tiny-a` starting (not waited for: it loads while the gateway starts and the cold start runs), `tiny-b` down."""
    a = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("gw-a") / "server.log",
                      args=("--model-name", "tiny-a", "--max-num-seqs", "4"))
    b = LateServer(tiny_model_dir, tmp_path_factory.mktemp("gw-b") / "server.log")
    try:
        yield a, b
    finally:
        b.stop()
        assert a.terminate() == 0, a.log_text()


@pytest.fixture(scope="module")
def gateway(servers, tmp_path_factory):
    a, b = servers
    directory = tmp_path_factory.mktemp("gw")
    keys = directory / "keys.txt"
    keys.write_text(KEYS_FILE)
    proc = GatewayProcess(directory / "gateway.log",
                          ["--route", f"tiny-a={a.url}", "--route", f"tiny-b={b.url}",
                           "--api-keys-file", str(keys), "--cold-start-timeout-seconds", "180"])
    try:
        yield proc
    finally:
        assert proc.terminate() == 0, proc.log_text()
        lines = proc.log_lines()  # every line JSON, and no key in any of them
        assert lines and not any(secret in proc.log_text() for secret in KEYS.values())


@pytest.fixture(scope="module")
def cold_start(gateway, servers) -> dict:
    """A streaming request for `tiny-b` while its server is down; once the gateway holds it (pending above zero),
    the server is started. Returns what was seen; afterwards both servers serve."""
    a, b = servers
    seen: dict = {"ready_pods_before": sample(scrape(gateway.url), "llm_gateway_ready_pods", model="tiny-b")}

    def request() -> None:
        seen["response"] = post(gateway, {"model": "tiny-b", "prompt": "Hello", "max_tokens": 5, "stream": True},
                                timeout=300)

    waiting = threading.Thread(target=request)
    waiting.start()
    seen["pending_while_down"] = wait_for(
        lambda: sample(scrape(gateway.url), "llm_gateway_pending_requests", model="tiny-b"), what="the request held")
    seen["held_not_refused"] = waiting.is_alive()
    b.start()
    waiting.join(300)
    seen["pending_after"] = sample(scrape(gateway.url), "llm_gateway_pending_requests", model="tiny-b")
    a.wait_started()
    b.proc.wait_started()
    return seen


def post(gateway, body: dict, key: str = "alice", path: str = "/v1/completions", **kwargs) -> httpx.Response:
    return httpx.post(f"{gateway.url}{path}", json=body, headers={"Authorization": f"Bearer {KEYS[key]}"},
                      timeout=kwargs.pop("timeout", 120), **kwargs)


def test_a_request_waits_for_a_model_at_zero_and_goes_through_once_it_starts(cold_start):
    assert cold_start["ready_pods_before"] == 0
    assert cold_start["pending_while_down"] >= 1 and cold_start["held_not_refused"]
    response = cold_start["response"]
    assert response.status_code == 200, response.text
    events = sse_events(response)
    assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert cold_start["pending_after"] == 0


def test_the_openai_client_reaches_both_models_through_one_port(gateway, servers, cold_start):
    server_a, server_b = servers
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS["alice"], max_retries=0, timeout=120)
    assert sorted(model.id for model in client.models.list()) == ["tiny-a", "tiny-b"]
    for model, server in (("tiny-a", server_a), ("tiny-b", server_b.proc)):
        before = sample(scrape(server.url), "llm_requests_total", model=model, status="success", code="200")
        chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=6, stream=True,
                                                extra_body={"ignore_eos": True}))
        assert sum(len(chunk.choices[0].text) for chunk in chunks if chunk.choices) > 0
        assert all(chunk.model == model for chunk in chunks)
        chat = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=4, stream=True))
        assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason
        whole = client.completions.create(model=model, prompt="Hello", max_tokens=3,
                                          extra_body={"ignore_eos": True})
        assert whole.usage.completion_tokens == 3
        assert sample(scrape(server.url), "llm_requests_total", model=model, status="success", code="200") == before + 3


@pytest.mark.parametrize("case", ["unknown model", "no model", "bad json", "not an object", "too large",
                                  "deep nesting", "huge integer", "lone surrogate", "no key", "wrong key",
                                  "wrong method"])
def test_client_mistakes_are_openai_shaped_4xx(gateway, cold_start, case):
    url = f"{gateway.url}/v1/completions"
    if case == "unknown model":
        response = post(gateway, {"model": "gpt-9", "prompt": "x"})
        assert response.status_code == 404
        assert "'tiny-a', 'tiny-b'" in response.json()["error"]["message"]
    elif case == "no model":
        response = post(gateway, {"prompt": "x"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    elif case == "bad json":
        response = httpx.post(url, content=b'{"model": ', headers=ALICE)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    elif case == "not an object":
        response = httpx.post(url, content=b"[1, 2]", headers=ALICE)
        assert response.status_code == 400 and "JSON object" in response.json()["error"]["message"]
    elif case == "too large":
        response = post(gateway, {"model": "tiny-a", "prompt": "x" * (2 * 1024 * 1024)})
        assert response.status_code == 413
    elif case == "deep nesting":  # a RecursionError in json.loads
        response = httpx.post(url, content=b'{"model": "tiny-a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                              headers=ALICE)
        assert response.status_code == 400 and "too deeply" in response.json()["error"]["message"]
    elif case == "huge integer":  # a ValueError past Python's int conversion limit, in a field nobody reads
        response = httpx.post(url, content=b'{"model": "tiny-a", "prompt": "x", "n_": ' + b"7" * 5000 + b"}",
                              headers=ALICE)
        assert response.status_code == 400 and "integer literal longer than" in response.json()["error"]["message"]
    elif case == "lone surrogate":
        response = httpx.post(url, content=b'{"model": "tiny-a", "prompt": "hi \\ud800"}', headers=ALICE)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "prompt" and "surrogate" in error["message"]
    elif case == "no key":
        response = httpx.post(url, json={"model": "tiny-a", "prompt": "x"})
        assert response.status_code == 401 and "Missing API key" in response.json()["error"]["message"]
    elif case == "wrong key":
        response = httpx.post(url, json={"model": "tiny-a", "prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    else:
        response = httpx.get(url, headers=ALICE)
        assert response.status_code == 405
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"]


def test_a_client_that_disconnects_frees_the_slot_on_the_model_server(gateway, servers, cold_start):
    server_a = servers[0]
    before = sample(scrape(server_a.url), "llm_generation_tokens_total", model="tiny-a")
    body = {"model": "tiny-a", "prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, headers=ALICE, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
    wait_for(lambda: sample(scrape(server_a.url), "llm_requests_running", model="tiny-a") == 0,
             what="the model server's slot freed")
    gateway_side = scrape(gateway.url)
    assert sum(value for (name, labels), value in gateway_side.items()
               if name == "llm_gateway_inflight_requests" and ("model", "tiny-a") in labels) == 0
    generated = sample(scrape(server_a.url), "llm_generation_tokens_total", model="tiny-a") - before
    assert generated < 240  # the generation was aborted, not run to its end


def test_per_key_limits_give_429_with_retry_after(gateway, cold_start):
    small = {"model": "tiny-a", "prompt": "Hi", "max_tokens": 2}
    assert [post(gateway, small, key="limited").status_code for _ in range(2)] == [200, 200]
    refused = post(gateway, small, key="limited")
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "2 requests per minute" in refused.json()["error"]["message"]
    assert post(gateway, small, key="alice").status_code == 200  # other keys are not held back

    assert post(gateway, {**small, "max_tokens": 30, "ignore_eos": True}, key="tokens").status_code == 200
    over = post(gateway, small, key="tokens")
    assert over.status_code == 429 and "20 tokens per minute" in over.json()["error"]["message"]


def test_usage_is_counted_per_key_name_and_no_key_is_exposed(gateway, cold_start):
    response = post(gateway, {"model": "tiny-a", "prompt": "Hi", "max_tokens": 4, "ignore_eos": True,
                              "stream": True})
    assert response.status_code == 200
    assert all(event == "[DONE]" or event["choices"] for event in sse_events(response))  # usage not asked for
    samples = scrape(gateway.url)
    assert sample(samples, "llm_gateway_tokens_total", key="alice", model="tiny-a", kind="completion") >= 4
    assert sample(samples, "llm_gateway_tokens_total", key="alice", model="tiny-a", kind="prompt") >= 1
    assert sample(samples, "llm_gateway_requests_total", model="tiny-a", code="200") >= 1
    assert sample(samples, "llm_gateway_upstream_latency_seconds_count", model="tiny-a") >= 1
    metrics_text = httpx.get(f"{gateway.url}/metrics").text
    assert not any(secret in metrics_text for secret in KEYS.values())
    access = [line for line in gateway.log_lines() if line.get("logger") == "serving.gateway.access"]
    assert {"alice", "limited", "tokens"} <= {line["key"] for line in access}


def test_every_gateway_contract_metric_is_on_metrics(gateway, cold_start):
    """The platform's KEDA trigger, alerts and dashboards name these series (llm_platform/metric_contract.py)."""
    from prometheus_client.parser import text_string_to_metric_families

    from llm_platform.metric_contract import GATEWAY_METRICS

    names = set()
    for family in text_string_to_metric_families(httpx.get(f"{gateway.url}/metrics").text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    missing = [m for m in GATEWAY_METRICS if not {m, m.removesuffix("_total")} & names]
    assert not missing, f"contract names missing from the gateway's /metrics: {missing}"
