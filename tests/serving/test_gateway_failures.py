"""The gateway over real HTTP in front of fake pods (tests/serving/fake_upstream.py) that can be made slow, reset a
connection before the first byte, or die mid-stream: balancing, prefix affinity, retries, the error event,
overload and cold-start refusals, and the SIGTERM drain. Each guard is fed its bad case."""
from __future__ import annotations

import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serving.fake_upstream import Behaviour, FakeUpstream
from tests.serving.gateway_process import GatewayProcess, wait_for
from tests.serving.server import free_port, sample, scrape, sse_events


@pytest.fixture(scope="module")
def pods():
    started = {name: FakeUpstream(name).start() for name in ("p1", "p2", "solo")}
    yield started
    for pod in started.values():
        pod.stop()


@pytest.fixture(scope="module")
def gateway(pods, tmp_path_factory):
    proc = GatewayProcess(tmp_path_factory.mktemp("gw-fail") / "gateway.log",
                          ["--route", f"pair={pods['p1'].url},{pods['p2'].url}", "--route", f"solo={pods['solo'].url}"])
    try:
        yield proc
    finally:
        assert proc.terminate() == 0, proc.log_text()


@pytest.fixture(autouse=True)
def normal_pods(request):
    """Every test starts with well-behaved pods and empty request logs."""
    if "pods" in request.fixturenames:
        for pod in request.getfixturevalue("pods").values():
            pod.behaviour = Behaviour()
            pod.requests.clear()
    yield


def ready(gateway, model: str, count: int) -> None:
    wait_for(lambda: sample(scrape(gateway.url), "llm_gateway_ready_pods", model=model) == count,
             what=f"{count} ready pods of {model}")


def stream(gateway, model: str, prompt: str, path: str = "/v1/completions", **extra) -> httpx.Response:
    body = {"model": model, "stream": True, **({"prompt": prompt} if path == "/v1/completions" else
                                               {"messages": [{"role": "system", "content": prompt},
                                                             {"role": "user", "content": "hi"}]}), **extra}
    return httpx.post(f"{gateway.url}{path}", json=body, timeout=60)


def texts(response: httpx.Response) -> list[str]:
    return [choice["text"] for event in sse_events(response) if isinstance(event, dict)
            for choice in event.get("choices", [])]


# ---- balancing ------------------------------------------------------------------------------------------------


def test_a_slow_pod_gets_few_requests_the_fast_one_most(gateway, pods):
    ready(gateway, "pair", 2)
    pods["p1"].requests.clear()
    pods["p2"].requests.clear()
    pods["p1"].behaviour = Behaviour(tokens=5, token_delay=0.4)  # two seconds per request
    work = list(range(40))

    def worker(_: int) -> list[int]:  # 8 clients share 40 requests: whoever is free sends the next
        codes = []
        while True:
            try:
                n = work.pop()
            except IndexError:
                return codes
            codes.append(stream(gateway, "pair", f"request {n} " + "x" * 50).status_code)

    with ThreadPoolExecutor(8) as pool:
        codes = [code for codes in pool.map(worker, range(8)) for code in codes]
    assert codes == [200] * 40
    slow, fast = pods["p1"].served(), pods["p2"].served()
    assert slow + fast == 40 and slow * 3 < fast, (slow, fast)


def test_shared_prefix_requests_stick_to_one_pod_and_others_spread(gateway, pods):
    ready(gateway, "pair", 2)
    pods["p1"].requests.clear()
    pods["p2"].requests.clear()
    system = "You are the support assistant of an example company. Answer in one sentence. " * 5  # > 256 chars
    for n in range(12):
        assert stream(gateway, "pair", system, path="/v1/chat/completions",
                      messages=[{"role": "system", "content": system},
                                {"role": "user", "content": f"question {n}"}]).status_code == 200
    assert sorted([pods["p1"].served("/v1/chat/completions"), pods["p2"].served("/v1/chat/completions")]) == [0, 12]
    for n in range(24):  # different leading blocks land on both pods
        assert stream(gateway, "pair", f"{n} a different system prompt").status_code == 200
    assert pods["p1"].served() > 0 and pods["p2"].served() > 0


def test_each_event_reaches_the_client_before_the_pod_sends_the_next(gateway, pods):
    """Unbuffered: the client holds the first token while the pod has sent only that one (it waits 10 s to send
    the next), and every event in turn."""
    ready(gateway, "solo", 1)
    pod = pods["solo"]
    pod.behaviour = Behaviour(tokens=3, token_delay=10.0)
    body = {"model": "solo", "prompt": "one at a time", "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert "pod-solo" in first
        # The pod counts an event once its write returns, which may be just after the client read it; the next
        # event is 10 s away, so a count of one (never two) says the first was passed on alone.
        wait_for(lambda: pod.events_sent >= 1, what="the pod's first event counted")
        assert pod.events_sent == 1


# ---- failures -------------------------------------------------------------------------------------------------


def test_a_pod_that_resets_before_the_first_byte_is_retried_on_the_other(gateway, pods):
    ready(gateway, "pair", 2)
    before = sample(scrape(gateway.url), "llm_gateway_retries_total", model="pair")
    pods["p1"].behaviour = Behaviour(reset=True)
    pods["p1"].requests.clear()
    for n in range(16):
        response = stream(gateway, "pair", f"retry me {n}")
        assert response.status_code == 200
        assert texts(response) == ["pod-p2 "] * 5 and sse_events(response)[-1] == "[DONE]"
    assert pods["p1"].requests, "no request hashed to the resetting pod; the retry was not exercised"
    assert sample(scrape(gateway.url), "llm_gateway_retries_total", model="pair") > before
    retries = [line for line in gateway.log_lines() if line.get("event") == "retry"]
    assert retries and retries[-1]["pod"].endswith(str(pods["p1"].port))


def test_a_lone_pod_failing_twice_is_a_502_not_a_hang(gateway, pods):
    ready(gateway, "solo", 1)
    pods["solo"].behaviour = Behaviour(reset=True)
    response = stream(gateway, "solo", "anything")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "upstream_failed"
    assert "failed twice before answering" in error["message"]
    assert len(pods["solo"].requests) == 2  # sent once more, to the same pod after a fresh look, and no more


def test_a_pod_lost_mid_stream_ends_the_stream_with_an_error_event(gateway, pods):
    ready(gateway, "solo", 1)
    pods["solo"].behaviour = Behaviour(tokens=6, die_after_events=2)
    response = stream(gateway, "solo", "cut me off")
    assert response.status_code == 200  # the first byte was already sent
    events = sse_events(response)
    assert [e["choices"][0]["text"] for e in events[:2]] == ["pod-solo ", "pod-solo "]
    assert events[2]["error"]["code"] == "upstream_failed" and "mid-stream" in events[2]["error"]["message"]
    assert events[3:] == ["[DONE]"]
    assert len(pods["solo"].requests) == 1  # never retried after the first byte
    assert any(line.get("event") == "stream_cut" for line in gateway.log_lines())


def test_usage_the_gateway_asked_for_is_counted_and_left_out_of_the_stream(gateway, pods):
    ready(gateway, "solo", 1)
    before = sample(scrape(gateway.url), "llm_gateway_tokens_total", key="anonymous", model="solo",
                    kind="completion")
    response = stream(gateway, "solo", "count me")
    assert pods["solo"].requests[-1].body["stream_options"] == {"include_usage": True}
    assert all(event == "[DONE]" or event["choices"] for event in sse_events(response))  # no usage-only chunk
    with_usage = stream(gateway, "solo", "count me", stream_options={"include_usage": True})
    assert sse_events(with_usage)[-2]["usage"]["completion_tokens"] == 5  # asked for: passed through
    after = sample(scrape(gateway.url), "llm_gateway_tokens_total", key="anonymous", model="solo", kind="completion")
    assert after - before == 10


def test_the_clients_key_and_request_id_go_to_the_pod_and_nothing_else_of_its_headers(gateway, pods):
    ready(gateway, "solo", 1)
    response = httpx.post(f"{gateway.url}/v1/completions", json={"model": "solo", "prompt": "x"}, timeout=60,
                          headers={"Authorization": "Bearer sk-client", "X-Request-ID": "trace-42",
                                   "Cookie": "session=private"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42"
    seen = pods["solo"].requests[-1].headers
    assert seen["authorization"] == "Bearer sk-client" and seen["x-request-id"] == "trace-42"
    assert "cookie" not in seen


# ---- overload and cold start ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_gateway(pods, tmp_path_factory):
    """`busy` (one slot per pod, one waiting request) through the routes file's DNS path; `asleep` never ready."""
    directory = tmp_path_factory.mktemp("gw-limits")
    busy = FakeUpstream("busy").start()
    routes = directory / "routes.json"
    routes.write_text(json.dumps({"models": [{"model": "busy", "service": "127.0.0.1", "port": busy.port,
                                              "maxQueue": 1, "maxInflightPerPod": 1,
                                              "coldStartTimeoutSeconds": 60}]}))
    proc = GatewayProcess(directory / "gateway.log", ["--routes-file", str(routes), "--route",
                                                      f"asleep=http://127.0.0.1:{free_port()}",
                                                      "--cold-start-timeout-seconds", "0.5"])
    try:
        yield proc, busy
    finally:
        assert proc.terminate() == 0, proc.log_text()
        busy.stop()


def test_a_full_queue_is_429_with_retry_after(limited_gateway):
    gateway, busy = limited_gateway
    busy.behaviour = Behaviour(tokens=40, token_delay=0.05)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(stream, gateway, "busy", "first")
        wait_for(lambda: busy.active == 1, what="the first request reaching the pod")
        queued = pool.submit(stream, gateway, "busy", "second")
        wait_for(lambda: sample(scrape(gateway.url), "llm_gateway_pending_requests", model="busy") == 1,
                 what="the second request queued")
        refused = stream(gateway, "busy", "third")
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert running.result().status_code == 200 and queued.result().status_code == 200
    assert len(busy.requests) == 2


def test_a_model_that_never_starts_is_503_saying_so(limited_gateway):
    gateway, _ = limited_gateway
    response = stream(gateway, "asleep", "hello")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "30"
    error = response.json()["error"]
    assert error["code"] == "model_starting" and "'asleep' is starting" in error["message"]
    assert sample(scrape(gateway.url), "llm_gateway_requests_total", model="asleep", code="503") >= 1


# ---- SIGTERM --------------------------------------------------------------------------------------------------


def test_sigterm_fails_readiness_and_lets_a_stream_finish(tmp_path):
    pod = FakeUpstream("drain").start()
    pod.behaviour = Behaviour(tokens=30, token_delay=0.05)
    gateway = GatewayProcess(tmp_path / "gateway.log", ["--route", f"m={pod.url}", "--drain-seconds", "30"])
    try:
        assert stream(gateway, "m", "warm").status_code == 200
        result: dict = {}

        def long_stream() -> None:
            result["response"] = stream(gateway, "m", "long")

        reader = threading.Thread(target=long_stream)
        reader.start()
        wait_for(lambda: pod.active == 1, what="the stream reaching the pod")
        gateway.process.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{gateway.url}/health/ready", timeout=5).status_code == 503,
                 what="readiness failing")
        assert httpx.get(f"{gateway.url}/health/live", timeout=5).status_code == 200
        reader.join(60)
        assert texts(result["response"]) == ["pod-drain "] * 30
        assert gateway.process.wait(60) == 0
        events = [line.get("event") for line in gateway.log_lines()]
        assert "drain_started" in events and "drained" in events
    finally:
        gateway.terminate()
        pod.stop()


def test_a_request_still_waiting_at_the_end_of_the_drain_gets_a_503(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    gateway = GatewayProcess(tmp_path / "gateway.log", ["--route", f"m={down}", "--drain-seconds", "0.5",
                                                        "--cold-start-timeout-seconds", "120"])
    try:
        result: dict = {}
        held = threading.Thread(target=lambda: result.update(response=stream(gateway, "m", "held")))
        held.start()
        wait_for(lambda: sample(scrape(gateway.url), "llm_gateway_pending_requests", model="m") == 1,
                 what="the request held")
        gateway.process.send_signal(signal.SIGTERM)
        held.join(60)
        response = result["response"]
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "shutting_down"
        assert gateway.process.wait(60) == 0
    finally:
        gateway.terminate()


def test_the_public_endpoint_cuts_slow_headers_and_caps_connections(pods, tmp_path):
    """The gateway is what the Ingress exposes: half-open connections and headers that trickle in must not pile up
    (the model server's guard, `serving.connections`, in front of the gateway too)."""
    import socket

    from tests.serving.test_http_hardening import exchange

    proc = GatewayProcess(tmp_path / "gateway.log", ["--route", f"solo={pods['solo'].url}",
                                                     "--header-timeout-seconds", "0.5", "--max-connections", "2",
                                                     "--body-timeout-seconds", "1"])
    try:
        answer = exchange(proc.port, b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer
        # Headers in time, then a body a byte every 0.3 s: cut at the body deadline, the connection closed.
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 40\r\n\r\n")
        answer = exchange(proc.port, head, [b" "] * 20, every=0.3)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1 seconds" in answer
        held = [socket.create_connection(("127.0.0.1", proc.port)) for _ in range(2)]
        try:
            assert exchange(proc.port, b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n") == b""  # closed at once
        finally:
            for sock in held:
                sock.close()
        assert httpx.get(f"{proc.url}/health/live", timeout=10).status_code == 200  # room again
    finally:
        assert proc.terminate() == 0, proc.log_text()
