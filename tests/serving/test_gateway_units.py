"""The gateway's pure parts without HTTP: config and routes file, the CHWBL balancer, per-key limits, the model pool's
slots and queue, the prompt's leading block, and the usage events of a stream."""
from __future__ import annotations

import asyncio
import json
import random
import socket
from collections import Counter

import pytest

from serving.api_keys import ApiKey
from serving.gateway import __main__ as gateway_main
from serving.gateway.app import prefix_of
from serving.gateway.balancer import HashRing, choose, key_hash, load_bound
from serving.gateway.config import ConfigError, Route, load_config
from serving.gateway.discovery import resolve
from serving.gateway.limits import KeyLimiter, retry_after
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.pool import ModelPool, NoPodReady, QueueFull, QueueTimeout, ShuttingDown
from serving.gateway.proxy import Outcome, _UsageEvents

# ---- config ---------------------------------------------------------------------------------------------------


def test_routes_from_flags_env_and_file(tmp_path):
    routes_file = tmp_path / "routes.json"
    routes_file.write_text(json.dumps({"models": [
        {"model": "llama-3.1-8b", "service": "llm-service-endpoints.ai-production.svc.cluster.local", "port": 8000,
         "coldStartTimeoutSeconds": 900, "maxQueue": 256, "maxInflightPerPod": 320}]}))
    config = load_config(["--route", "a=http://127.0.0.1:8001,http://127.0.0.1:8002/", "--max-queue", "7",
                          "--routes-file", str(routes_file)], {"ROUTES": "ignored=http://127.0.0.1:9"})
    assert [route.model for route in config.routes] == ["a", "llama-3.1-8b"]
    assert config.routes[0] == Route(model="a", urls=("http://127.0.0.1:8001", "http://127.0.0.1:8002"),
                                     max_queue=7)
    assert config.routes[1] == Route(model="llama-3.1-8b",
                                     service="llm-service-endpoints.ai-production.svc.cluster.local", port=8000,
                                     cold_start_timeout_seconds=900.0, max_queue=256, max_inflight_per_pod=320)
    from_env = load_config([], {"ROUTES": "a=http://127.0.0.1:1; b=http://127.0.0.1:2", "PORT": "9000",
                                "API_KEY": "sk-env", "ROUTES_FILE": str(routes_file)})
    assert [route.model for route in from_env.routes] == ["a", "b", "llama-3.1-8b"]
    assert from_env.port == 9000 and from_env.api_key == "sk-env"
    assert "sk-env" not in repr(from_env)


@pytest.mark.parametrize("argv, environ, message", [
    ([], {}, "no models to route"),
    (["--route", "a"], {}, "write MODEL=URL"),
    (["--route", "a=ftp://x:1"], {}, "'ftp://x:1' is not an upstream URL"),
    (["--route", "a=http://x"], {}, "is not an upstream URL"),
    (["--route", "a=http://x:1/v1"], {}, "(no path)"),
    (["--route", "a=http://x:1", "--route", "a=http://y:1"], {}, "'a' is routed twice"),
    (["--route", "a=http://x:1", "--port", "0"], {}, "--port='0': must be between 1 and 65535"),
    (["--route", "a=http://x:1"], {"LOAD_FACTOR": "0.5"}, "LOAD_FACTOR='0.5': must be at least 1"),
    (["--route", "a=http://x:1"], {"MAX_QUEUE": "-1"}, "MAX_QUEUE='-1': must be a positive integer"),
    (["--route", "a=http://x:1"], {"DRAIN_SECONDS": "nan"}, "must be a finite number"),
    (["--bogus"], {}, "unrecognized arguments: --bogus"),
])
def test_bad_settings_are_one_line(argv, environ, message):
    with pytest.raises(ConfigError) as err:
        load_config(argv, environ)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content, message", [
    ("{", "is not valid JSON"),
    ('{"routes": []}', 'expected {"models": [...]}'),
    ('{"models": [{"model": "m", "service": "s", "replicas": 2}]}', "models[0]: unknown key 'replicas'"),
    ('{"models": [{"model": "m"}]}', "models[0]: 'service' is required"),
    ('{"models": [{"model": "m", "service": "s", "port": 0}]}', "models[0].port: 0 is not allowed"),
    ('{"models": [{"model": "m", "service": "s", "maxQueue": 1.5}]}', "models[0].maxQueue: 1.5 is not allowed"),
    ('{"models": [{"model": "m", "service": "http://s"}]}', "models[0].service: 'http://s' is not allowed"),
    ('{"models": [{"model": "m", "service": "s", "coldStartTimeoutSeconds": true}]}',
     "models[0].coldStartTimeoutSeconds: True is not allowed"),
])
def test_a_bad_routes_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "routes.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_config(["--routes-file", str(path)], {})
    assert message in str(err.value) and str(path) in str(err.value)


def test_main_exits_2_with_one_line(tmp_path, capsys):
    assert gateway_main.main(["--route", "a=http://x:1", "--max-inflight-per-pod", "none"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --max-inflight-per-pod='none': is not a whole number"]
    keys = tmp_path / "keys"
    keys.write_text("team:sk-1 rpm=fast\n")
    assert gateway_main.main(["--route", "a=http://x:1", "--api-keys-file", str(keys)]) == 2
    err = capsys.readouterr().err
    assert "'rpm=fast' is not a limit" in err and "sk-1" not in err


# ---- balancer -------------------------------------------------------------------------------------------------

PODS = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]


def test_the_ring_walks_every_member_once_and_the_same_key_lands_on_the_same_pod():
    ring = HashRing(PODS)
    assert sorted(ring.walk(12345)) == sorted(PODS)
    rng = random.Random(0)
    idle = {pod: 0 for pod in PODS}
    picks = {choose(ring, idle, PODS, b"You are a helpful assistant.", 1.25, rng) for _ in range(20)}
    assert len(picks) == 1
    # Different prefixes spread over every pod, none with much more than its share.
    spread = Counter(choose(ring, idle, PODS, f"prompt {i}".encode(), 1.25, rng) for i in range(600))
    assert set(spread) == set(PODS) and max(spread.values()) < 300


def test_a_hashed_pod_over_the_bound_passes_the_request_on():
    ring = HashRing(PODS)
    rng = random.Random(0)
    prefix = b"shared system prompt"
    home = choose(ring, {pod: 0 for pod in PODS}, PODS, prefix, 1.25, rng)
    assert load_bound(total_load=6, members=3, load_factor=1.25) == 3  # ceil(1.25 * 7 / 3)
    loads = {pod: 0 for pod in PODS} | {home: 3}
    elsewhere = choose(ring, loads, PODS, prefix, 1.25, rng)
    # The next pod on the ring from the prefix's point, not merely any other.
    assert elsewhere == next(pod for pod in ring.walk(key_hash(prefix)) if pod != home)
    # Within the bound the home pod keeps it.
    assert choose(ring, {pod: 1 for pod in PODS} | {home: 2}, PODS, prefix, 1.25, rng) == home


def test_without_a_prefix_or_an_eligible_hashed_pod_the_least_loaded_takes_it():
    ring = HashRing(PODS)
    rng = random.Random(0)
    loads = {PODS[0]: 4, PODS[1]: 1, PODS[2]: 2}
    assert choose(ring, loads, PODS, None, 1.25, rng) == PODS[1]
    assert choose(ring, loads, [PODS[0], PODS[2]], None, 1.25, rng) == PODS[2]
    assert choose(ring, loads, [], b"x", 1.25, rng) is None
    # A slow pod whose requests pile up gets none of the next ones, whatever they hash to.
    slow = {PODS[0]: 5, PODS[1]: 0, PODS[2]: 0}
    assert PODS[0] not in {choose(ring, slow, PODS, f"p{i}".encode(), 1.25, rng) for i in range(100)}


# ---- per-key limits -------------------------------------------------------------------------------------------


def test_requests_per_minute_bucket():
    key = ApiKey(name="team", secret=b"s", requests_per_minute=2)
    limiter = KeyLimiter()
    assert limiter.admit(key, 0.0) is None and limiter.admit(key, 0.0) is None
    wait = limiter.admit(key, 0.0)
    assert wait == pytest.approx(30.0) and retry_after(wait) == "30"
    assert "2 requests per minute" in limiter.which_limit(key, 0.0)
    assert limiter.admit(key, 30.0) is None  # refilled one request
    assert limiter.admit(ApiKey(name="open", secret=b"o"), 0.0) is None  # no limits, never refused


def test_tokens_per_minute_bucket_runs_into_debt_and_refills():
    key = ApiKey(name="team", secret=b"s", tokens_per_minute=60)
    limiter = KeyLimiter()
    assert limiter.admit(key, 0.0) is None
    limiter.spend_tokens(key, 90, 0.0)  # one large request: 30 tokens in debt
    wait = limiter.admit(key, 0.0)
    assert wait == pytest.approx(31.0)  # back above one token at 1 token a second
    assert "60 tokens per minute" in limiter.which_limit(key, 0.0)
    assert limiter.admit(key, 31.5) is None
    # A reloaded keys file with new limits starts a fresh bucket.
    assert limiter.admit(ApiKey(name="team", secret=b"s", tokens_per_minute=600), 31.5) is None


# ---- the pool -------------------------------------------------------------------------------------------------


def _pool(**route) -> tuple[ModelPool, GatewayMetrics]:
    metrics = GatewayMetrics(["m"])
    return ModelPool(Route(model="m", urls=("http://a:1",), **route), metrics, 1.25, random.Random(0)), metrics


def _pending(metrics: GatewayMetrics) -> float:
    return metrics.registry.get_sample_value("llm_gateway_pending_requests", {"model": "m"})


def test_a_request_is_held_until_a_pod_is_ready():
    async def scenario():
        pool, metrics = _pool()
        held = asyncio.ensure_future(pool.acquire(b"p"))
        await asyncio.sleep(0)
        assert not held.done() and _pending(metrics) == 1
        pool.set_ready(["http://a:1"])
        pod = await held
        assert pod.address == "a:1" and pod.inflight == 1 and _pending(metrics) == 0
        assert metrics.registry.get_sample_value("llm_gateway_inflight_requests", {"model": "m", "pod": "a:1"}) == 1
        pool.release(pod)
        assert pod.inflight == 0

    asyncio.run(scenario())


def test_no_pod_within_the_timeout_is_no_pod_ready():
    async def scenario():
        pool, metrics = _pool(cold_start_timeout_seconds=0.01)
        with pytest.raises(NoPodReady):
            await pool.acquire(None)
        assert _pending(metrics) == 0

    asyncio.run(scenario())


def test_full_pods_queue_requests_in_order_up_to_max_queue():
    async def scenario():
        pool, metrics = _pool(max_inflight_per_pod=1, max_queue=2, cold_start_timeout_seconds=60)
        pool.set_ready(["http://a:1"])
        first = await pool.acquire(None)
        second = asyncio.ensure_future(pool.acquire(None))
        third = asyncio.ensure_future(pool.acquire(None))
        await asyncio.sleep(0)
        assert _pending(metrics) == 2
        with pytest.raises(QueueFull):
            await pool.acquire(None)
        pool.release(first)
        await asyncio.sleep(0)
        assert second.done() and not third.done()  # in arrival order
        pool.release(second.result())
        pool.release((await third))
        assert _pending(metrics) == 0 and pool.waiting == 0

    asyncio.run(scenario())


def test_queued_past_the_timeout_with_pods_ready_is_a_queue_timeout():
    async def scenario():
        pool, _ = _pool(max_inflight_per_pod=1, cold_start_timeout_seconds=0.01)
        pool.set_ready(["http://a:1"])
        await pool.acquire(None)
        with pytest.raises(QueueTimeout):
            await pool.acquire(None)

    asyncio.run(scenario())


def test_a_cancelled_waiter_passes_its_wake_up_on():
    async def scenario():
        pool, metrics = _pool(max_inflight_per_pod=1, cold_start_timeout_seconds=60)
        pool.set_ready(["http://a:1"])
        first = await pool.acquire(None)
        leaving = asyncio.ensure_future(pool.acquire(None))
        staying = asyncio.ensure_future(pool.acquire(None))
        await asyncio.sleep(0)
        pool.release(first)  # wakes `leaving`, which is cancelled before it runs
        leaving.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert (await staying).inflight == 1 and _pending(metrics) == 0

    asyncio.run(scenario())


def test_closing_sends_waiting_requests_away_and_lets_a_free_slot_be_taken():
    async def scenario():
        pool, metrics = _pool(max_inflight_per_pod=1, cold_start_timeout_seconds=60)
        held = asyncio.ensure_future(pool.acquire(None))  # no pod yet: held
        await asyncio.sleep(0)
        pool.close()
        with pytest.raises(ShuttingDown):
            await held
        assert _pending(metrics) == 0
        pool.set_ready(["http://a:1"])
        pod = await pool.acquire(None)  # a free slot needs no waiting: still served while draining
        with pytest.raises(ShuttingDown):
            await pool.acquire(None)
        pool.release(pod)

    asyncio.run(scenario())


def test_a_retry_avoids_the_pod_that_failed_when_there_is_another():
    async def scenario():
        metrics = GatewayMetrics(["m"])
        pool = ModelPool(Route(model="m", urls=("http://a:1", "http://b:1")), metrics, 1.25, random.Random(0))
        pool.set_ready(["http://a:1", "http://b:1"])
        for _ in range(10):
            pod = await pool.acquire(b"same prefix", avoid="http://a:1")
            assert pod.address == "b:1"
            pool.release(pod)
        pool.drop("http://b:1")
        pod = await pool.acquire(b"same prefix", avoid="http://a:1")  # the only pod left, avoided or not
        assert pod.address == "a:1"

    asyncio.run(scenario())


# ---- discovery ------------------------------------------------------------------------------------------------


def test_a_service_name_resolves_to_its_pod_urls_and_no_record_to_none():
    async def scenario(answer):
        loop = asyncio.get_running_loop()

        async def getaddrinfo(host, port, **kwargs):
            if isinstance(answer, Exception):
                raise answer
            return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                    for ip in answer]

        loop.getaddrinfo = getaddrinfo
        return await resolve("llm.ai-production.svc.cluster.local", 8000)

    assert asyncio.run(scenario(["10.0.0.2", "10.0.0.1", "10.0.0.2", "fd00::7"])) == [
        "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://[fd00::7]:8000"]
    assert asyncio.run(scenario(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))) == []
    with pytest.raises(socket.gaierror):  # the resolver failing is not "no pods": the caller keeps what it knows
        asyncio.run(scenario(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")))


def test_a_literal_address_resolves_without_a_resolver():
    assert asyncio.run(resolve("127.0.0.1", 8001)) == ["http://127.0.0.1:8001"]


# ---- request parsing and streamed usage -----------------------------------------------------------------------


def test_the_leading_block_of_each_kind_of_prompt():
    assert prefix_of({"prompt": "abcdef"}, 4) == b"abcd"
    assert prefix_of({"prompt": [5, 6, 7, 8, 9]}, 8) == b"5,6"
    assert prefix_of({"prompt": ["first", "second"]}, 3) == b"fir"
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert prefix_of(chat, 100) == b"system: Be brief.\nuser: Hi\n"
    assert prefix_of(chat, 6) == b"system"
    assert prefix_of({"messages": "not a list"}, 10) is None and prefix_of({}, 10) is None


def test_usage_events_are_read_and_left_out_when_the_gateway_asked_for_them():
    chunk = b'data: {"choices": [{"text": "hi"}], "usage": null}\n\n'
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}\n\n'
    done = b"data: [DONE]\n\n"
    outcome = Outcome()
    events = _UsageEvents(strip=True, outcome=outcome)
    assert events.feed(chunk) == chunk  # untouched: passed on as it came
    assert events.feed(usage[:30]) == b""  # half an event waits for its rest
    assert events.feed(usage[30:] + done) == done
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (4, 2)
    kept = Outcome()
    assert _UsageEvents(strip=False, outcome=kept).feed(usage + done) == usage + done
    assert kept.completion_tokens == 2
