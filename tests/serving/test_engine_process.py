"""The engine in its own process (the server's default): what happens when that process dies, is signalled, or is
not used. The happy paths (completions, streaming, aborts, drain) run through it in every other HTTP test."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.serving.server import MODEL_NAME, ServerProcess, alive, children, command_line, sse_events
from tests.serving.tiny_model import build_tiny_model

WINDOW = 2048


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-2k"), max_position_embeddings=WINDOW)


def engine_pid(server: ServerProcess) -> int:
    """The engine process (multiprocessing's resource tracker is a child of the server too), as the log names it."""
    pids = [pid for pid in children(server.process.pid) if "spawn_main" in command_line(pid)]
    logged = [line["pid"] for line in server.log_lines() if line.get("event") == "engine_process_started"]
    assert len(pids) == 1 and logged == pids, f"engine processes under the server: {pids}, logged: {logged}"
    return pids[0]


def completion(server: ServerProcess, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "model": MODEL_NAME, "prompt": "Hello world", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})


@pytest.fixture
def server(model_dir, tmp_path):
    server = ServerProcess(model_dir, tmp_path / "server.log")
    server.wait_started()
    yield server
    server.terminate()


def test_engine_process_killed_mid_stream_fails_the_stream_then_the_server_exits_nonzero_by_itself(server):
    pid = engine_pid(server)
    body = {"model": MODEL_NAME, "prompt": "Hello world", "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    events: list = []
    first_chunk = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    payload = line[len("data: "):]
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
                    first_chunk.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert first_chunk.wait(30)
    os.kill(pid, signal.SIGKILL)
    reader.join(30)
    assert not reader.is_alive()
    error = events[-2]["error"]
    assert events[-1] == "[DONE]" and error["code"] == "engine_dead"
    assert "engine process exited (code -9)" in error["message"]
    # It used to keep running (ready, taking traffic it could only refuse) until someone stopped it: now it exits by
    # itself, non-zero, so the kubelet restarts it. (Readiness with a dead engine: test_http_hardening.)
    assert server.process.wait(30) == 3, server.log_text()
    lines = server.log_lines()
    logged = [line for line in lines if "engine process exited" in line.get("message", "")]
    assert logged and logged[0]["level"] == "error"
    assert [line["level"] for line in lines if line.get("event") == "engine_dead"] == ["error"]


def test_engine_process_ignores_group_signals_the_server_owns_shutdown(server):
    pid = engine_pid(server)
    os.kill(pid, signal.SIGINT)  # what Ctrl-C in a terminal sends the whole process group
    os.kill(pid, signal.SIGTERM)  # what `timeout` or a supervisor may send the whole group
    time.sleep(0.5)
    response = completion(server)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
    assert engine_pid(server) == pid
    assert server.terminate() == 0
    assert not alive(pid)


def test_engine_on_a_thread_when_engine_process_is_off(model_dir, tmp_path):
    server = ServerProcess(model_dir, tmp_path / "server.log", env={"ENGINE_PROCESS": "off"})
    try:
        server.wait_started()
        assert children(server.process.pid) == []
        streamed = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": MODEL_NAME, "prompt": "Hello world", "max_tokens": 5, "temperature": 0, "stream": True})
        events = sse_events(streamed)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    finally:
        assert server.terminate() == 0


def test_a_model_that_fails_to_load_in_the_engine_process_exits_1_with_the_engines_message(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    server = ServerProcess(broken, tmp_path / "server.log")
    assert server.process.wait(120) == 1
    failures = [line for line in server.log_lines() if line.get("event") == "model_load_failed"]
    assert len(failures) == 1 and "model_type 'gpt2' is not supported" in failures[0]["message"]


def test_a_second_signal_exits_at_once_mid_generation_and_takes_the_engine_process_with_it(server):
    pid = engine_pid(server)
    body = {"model": MODEL_NAME, "prompt": "Hello world", "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        next(response.iter_lines())
        # The second signal exits at once, in the middle of a generation, without waiting for the drain.
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) is not None
    deadline = time.monotonic() + 15
    while alive(pid):
        assert time.monotonic() < deadline, "the engine process outlived the server"
        time.sleep(0.1)
