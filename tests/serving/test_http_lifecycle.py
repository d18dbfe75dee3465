"""The server's life through real processes: settings errors, a bad model, startup probes, 429, SIGTERM drains."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serving.__main__ import engine_config
from serving.api_keys import KeyRing
from serving.engine.config import EngineConfig
from serving.settings import SettingsError, load_settings
from tests.serving.server import MODEL_NAME, REPO_ROOT, ServerProcess, sample, scrape
from tests.serving.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # An 8192-token window, so a long generation reliably outlasts a short drain period on CPU.
    return build_tiny_model(tmp_path_factory.mktemp("tiny-8k"), max_position_embeddings=8192)


# ---- settings and startup failures ---------------------------------------------------------------------------


def test_bad_setting_exits_2_with_one_line(tiny_model_dir):
    result = subprocess.run([sys.executable, "-m", "serving", "--model-path", str(tiny_model_dir), "--port", "abc"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --port='abc': is not a whole number"
    assert result.stdout == ""


@pytest.mark.parametrize("argv, env, message", [
    ([], {"MODEL_PATH": ""}, "no model: pass --model-path DIR or set MODEL_PATH"),
    (["--model-path", "/nonexistent/model"], {}, "'/nonexistent/model' is not a directory"),
    ([], {"MAX_NUM_SEQS": "0"}, "MAX_NUM_SEQS='0': must be a positive integer"),
    ([], {"DRAIN_SECONDS": "soon"}, "DRAIN_SECONDS='soon': is not a number"),
    ([], {"DEVICE": "tpu"}, "DEVICE='tpu': must be one of auto, cuda, cpu"),
    ([], {"CUDA_GRAPHS": "maybe"}, "CUDA_GRAPHS='maybe': must be on or off (true/false, 1/0)"),
    ([], {"ENGINE_PROCESS": "sometimes"}, "ENGINE_PROCESS='sometimes': must be on or off (true/false, 1/0)"),
    ([], {"MAX_PREFILL_TOKENS": "0"}, "MAX_PREFILL_TOKENS='0': must be a positive integer"),
    ([], {"ATTENTION_BACKEND": "xformers"}, "ATTENTION_BACKEND='xformers': must be one of auto, triton, flash, sdpa"),
    ([], {"OVERLAP": "sometimes"}, "OVERLAP='sometimes': must be auto, on or off"),
    ([], {"BLOCK_SIZE": "12"}, "BLOCK_SIZE='12': must be one of 1, 2, 4, 8, 16, 32, 64, 128, 256"),
    (["--block-size", "sixteen"], {}, "--block-size='sixteen': is not a whole number"),
    ([], {"ENABLE_PREFIX_CACHING": "maybe"}, "ENABLE_PREFIX_CACHING='maybe': must be on or off (true/false, 1/0)"),
    ([], {"HEADER_TIMEOUT_SECONDS": "0"}, "HEADER_TIMEOUT_SECONDS='0': must be a finite number > 0"),
    (["--max-connections", "0"], {}, "--max-connections='0': must be a positive integer"),
    (["--max-body-bytes", "-5"], {}, "--max-body-bytes='-5': must be a positive integer"),
    (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
])
def test_bad_settings_name_the_setting(tiny_model_dir, argv, env, message):
    with pytest.raises(SettingsError) as caught:
        load_settings(argv, {"MODEL_PATH": str(tiny_model_dir), **env})
    assert message in str(caught.value)


def test_settings_from_flags_env_and_key_sources(tiny_model_dir, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\n\nalpha\n beta \n")
    settings = load_settings(["--port", "9000", "--drain-seconds", "0"],
                             {"MODEL_PATH": str(tiny_model_dir), "PORT": "1234", "API_KEYS_FILE": str(keys),
                              "API_KEY": "gamma", "MAX_QUEUE": "3", "DTYPE": "BFloat16", "CUDA_GRAPHS": "Off"})
    assert settings.port == 9000  # the flag wins over PORT
    assert settings.model_name == tiny_model_dir.name
    assert (settings.api_keys_file, settings.api_key) == (keys, "gamma")
    ring = KeyRing(settings.api_keys_file, settings.api_key)
    assert {key.secret for key in ring.keys} == {b"alpha", b"beta", b"gamma"}
    assert (settings.max_queue, settings.dtype, settings.drain_seconds) == (3, "bfloat16", 0.0)
    assert settings.cuda_graphs is False
    assert settings.engine_process is True and settings.max_prefill_tokens is None
    tuned = load_settings(["--max-prefill-tokens", "8192"], {"MODEL_PATH": str(tiny_model_dir), "MAX_QUEUE": "3",
                                                             "ENGINE_PROCESS": "off", "CUDA_GRAPHS": "off",
                                                             "ATTENTION_BACKEND": "SDPA", "OVERLAP": "off"})
    config = engine_config(tuned)
    assert (config.max_prefill_tokens_per_step, config.max_waiting, config.cuda_graphs) == (8192, 3, False)
    assert tuned.engine_process is False and config.attention == "sdpa" and config.overlap is False
    assert engine_config(load_settings([], {"MODEL_PATH": str(tiny_model_dir), "OVERLAP": "Auto"})).overlap is None
    assert engine_config(load_settings(["--overlap", "on"], {"MODEL_PATH": str(tiny_model_dir)})).overlap is True
    assert engine_config(settings).max_prefill_tokens_per_step == EngineConfig().max_prefill_tokens_per_step
    assert engine_config(settings).attention == EngineConfig().attention == "auto"
    assert engine_config(settings).overlap is EngineConfig().overlap is None
    assert (engine_config(settings).block_size, engine_config(settings).enable_prefix_caching) == (16, True)
    paged = engine_config(load_settings(["--block-size", "32"], {"MODEL_PATH": str(tiny_model_dir),
                                                                 "ENABLE_PREFIX_CACHING": "off", "BLOCK_SIZE": "8"}))
    assert (paged.block_size, paged.enable_prefix_caching) == (32, False)  # the flag wins over BLOCK_SIZE
    assert (settings.host, settings.max_body_bytes, settings.max_num_seqs) == ("0.0.0.0", None, None)
    assert (settings.max_connections, settings.header_timeout_seconds, settings.body_timeout_seconds) == (1024, 10, 30)
    assert "gamma" not in repr(settings)
    limits = load_settings(["--max-connections", "8", "--body-timeout-seconds", "2.5"],
                           {"MODEL_PATH": str(tiny_model_dir), "HEADER_TIMEOUT_SECONDS": "1", "MAX_BODY_BYTES": "999"})
    assert (limits.max_connections, limits.header_timeout_seconds, limits.body_timeout_seconds) == (8, 1, 2.5)
    assert limits.max_body_bytes == 999 and not limits.auth_enabled
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(SettingsError, match="contains no keys"):
        load_settings([], {"MODEL_PATH": str(tiny_model_dir), "API_KEYS_FILE": str(empty)})


def test_unusable_model_dir_logs_one_json_line_and_exits_nonzero(tmp_path):
    empty_model = tmp_path / "not-a-model"
    empty_model.mkdir()
    proc = ServerProcess(empty_model, tmp_path / "server.log")
    assert proc.process.wait(90) == 1
    errors = [line for line in proc.log_lines() if line["level"] == "error"]
    assert len(errors) == 1, proc.log_text()
    assert "config.json" in errors[0]["message"] and errors[0]["event"] == "model_load_failed"


# ---- startup, backpressure -----------------------------------------------------------------------------------


def test_probes_through_startup_then_429_when_the_queue_is_full(model_dir, tmp_path):
    proc = ServerProcess(model_dir, tmp_path / "server.log", env={"MAX_NUM_SEQS": "1", "MAX_QUEUE": "1"})
    try:
        proc.wait_listening()
        # Listening at once, while the model loads in the background.
        startup = httpx.get(f"{proc.url}/health/startup")
        assert (startup.status_code, startup.json()) == (503, {"status": "loading"})
        assert httpx.get(f"{proc.url}/health/ready").status_code == 503
        assert httpx.get(f"{proc.url}/health/live").status_code == 200
        early = httpx.post(f"{proc.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "hi"})
        assert early.status_code == 503 and "still loading" in early.json()["error"]["message"]
        seen = proc.wait_started()
        assert seen[-1] == 200
        assert httpx.get(f"{proc.url}/health/ready").json() == {"status": "ready"}

        long = {"model": MODEL_NAME, "prompt": [7, 8, 9], "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{proc.url}/v1/completions", json=long, timeout=60) as running:
            lines = running.iter_lines()  # kept referenced: a collected iterator would close the connection
            next(line for line in lines if line.startswith("data: "))  # now it holds the only slot
            with httpx.stream("POST", f"{proc.url}/v1/completions", json=long, timeout=60) as waiting:
                assert waiting.status_code == 200
                deadline = time.monotonic() + 10
                while sample(scrape(proc.url), "llm_requests_waiting", model=MODEL_NAME) != 1:
                    assert time.monotonic() < deadline, "second request never queued"
                    time.sleep(0.05)
                refused = httpx.post(f"{proc.url}/v1/completions",
                                     json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
                assert refused.status_code == 429
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "queue_full"
                assert "retry after" in refused.json()["error"]["message"]
        deadline = time.monotonic() + 10
        while True:
            metrics = scrape(proc.url)
            if sample(metrics, "llm_requests_running", model=MODEL_NAME) == 0 and \
                    sample(metrics, "llm_requests_waiting", model=MODEL_NAME) == 0:
                break
            assert time.monotonic() < deadline, "slots not freed after the clients left"
            time.sleep(0.05)
        assert sample(metrics, "llm_requests_total", model=MODEL_NAME, status="error", code="429") == 1
        assert sample(metrics, "llm_requests_total", model=MODEL_NAME, status="error", code="503") == 1
        # The queued stream's client left before its first token: it was dropped from the queue, never run after
        # the other stream (which would have given it a first token).
        assert sample(metrics, "llm_time_to_first_token_seconds_count", model=MODEL_NAME) == 1
    finally:
        assert proc.terminate() == 0, proc.log_text()


# ---- SIGTERM ------------------------------------------------------------------------------------------------


class StreamInBackground:
    """A streaming completion read on a thread: its events, and when its first token came."""

    def __init__(self, url: str, max_tokens: int) -> None:
        self.events: list = []
        self.first_token = threading.Event()
        self.error: BaseException | None = None
        body = {"model": MODEL_NAME, "prompt": [21, 22, 23], "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        self._thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        payload = line[len("data: "):]
                        self.events.append(payload if payload == "[DONE]" else json.loads(payload))
                        self.first_token.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.first_token.set()

    def join(self, timeout: float) -> list:
        self._thread.join(timeout)
        assert not self._thread.is_alive() and self.error is None, self.error
        return self.events


def test_sigterm_drains_then_aborts_at_the_deadline_and_exits_0(model_dir, tmp_path):
    proc = ServerProcess(model_dir, tmp_path / "server.log", env={"DRAIN_SECONDS": "1"})
    proc.wait_started()
    # 8000 decode steps: 2000 took 1.5-3.5 s on the 2-vCPU development VM, so this outlasts the 1 s grace period
    # several times over even on a CPU several times as fast.
    long = StreamInBackground(proc.url, 8000)
    assert long.first_token.wait(30)

    proc.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    deadline = signalled + 5
    while (ready := httpx.get(f"{proc.url}/health/ready")).status_code != 503:
        assert time.monotonic() < deadline, "readiness never failed after SIGTERM"
        time.sleep(0.02)
    assert ready.json() == {"status": "draining"}
    assert httpx.get(f"{proc.url}/health/live").status_code == 200
    refused = httpx.post(f"{proc.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]

    # Too long for the grace period: cut at the deadline, told why, and the stream properly terminated.
    events = long.join(30)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "aborted" and "drain period" in error["message"]
    assert not any(e.get("usage") for e in events[:-1])  # it never finished

    assert proc.process.wait(30) == 0
    elapsed = time.monotonic() - signalled
    assert 1 <= elapsed < 1 + 10, elapsed
    logged = [line.get("event") for line in proc.log_lines()]
    assert {"drain_started", "drain_deadline", "stopped"} <= set(logged)


def test_sigterm_lets_in_flight_work_finish_and_exits_0_without_waiting_the_grace_period(model_dir, tmp_path):
    proc = ServerProcess(model_dir, tmp_path / "server.log", env={"DRAIN_SECONDS": "60"})
    proc.wait_started()
    stream = StreamInBackground(proc.url, 120)
    assert stream.first_token.wait(30)
    proc.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    events = stream.join(30)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 120
    assert [e["choices"][0]["finish_reason"] for e in events[:-2]][-1] == "length"
    assert proc.process.wait(30) == 0
    assert time.monotonic() - signalled < 15  # far inside DRAIN_SECONDS: nothing left to wait for
    assert "drained" in [line.get("event") for line in proc.log_lines()]
