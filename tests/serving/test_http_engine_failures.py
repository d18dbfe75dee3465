"""Engine failures as HTTP answers: a bug is a logged 500 with the request id, a dead engine is 503 and fails liveness.

These states cannot be provoked from outside a healthy real engine, so an engine double stands in for it; the
app, uvicorn and HTTP are real (the server runs on a thread, since no signal handling is involved).
"""
from __future__ import annotations

import logging

import httpx
import pytest
import uvicorn

from serving.app import create_app
from serving.engine.interface import EngineDeadError, EngineStats, ModelInfo
from serving.settings import Settings
from tests.serving.server import MODEL_NAME, ThreadServers, free_port


class FailingEngine:
    """Implements the Engine protocol; `generate` fails the way `mode` says."""

    def __init__(self, tokenizer, mode: str) -> None:
        self.tokenizer = tokenizer
        self.model_info = ModelInfo(max_model_len=256, vocab_size=len(tokenizer))
        self.mode = mode
        self.loop_alive = True

    async def start(self) -> None:
        pass

    def generate(self, request):
        if self.mode == "bug":
            raise RuntimeError("engine bug: index out of range")
        self.loop_alive = False
        raise EngineDeadError("the engine loop has died; the server must be restarted")

    def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(waiting=0, running=0, max_running=1, kv_cache_usage=0.0, kv_cache_capacity_tokens=256,
                           prompt_tokens_total=0, generation_tokens_total=0, loop_alive=self.loop_alive, device="cpu")

    async def shutdown(self) -> None:
        pass


@pytest.fixture
def serve(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    servers = ThreadServers()

    def start(mode: str) -> str:
        settings = Settings(model_path=tiny_model_dir, model_name=MODEL_NAME, port=free_port())
        return servers.start(uvicorn.Config(create_app(settings, FailingEngine(tokenizer, mode)), host="127.0.0.1",
                                            port=settings.port, log_config=None))

    yield start
    servers.stop()


def test_unexpected_engine_error_is_a_logged_500_with_the_request_id(serve, caplog):
    url = serve("bug")
    with caplog.at_level(logging.ERROR, logger="serving"):
        response = httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2},
                              headers={"X-Request-ID": "req-500-check"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "req-500-check" in error["message"] and "index out of range" not in error["message"]
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert logged and logged[0].exc_info[0] is RuntimeError
    assert httpx.get(f"{url}/health/live").status_code == 200  # a failed request is not a dead process


def test_dead_engine_is_503_and_fails_liveness(serve):
    url = serve("dead")
    assert httpx.get(f"{url}/health/live").status_code == 200
    response = httpx.post(f"{url}/v1/chat/completions",
                          json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_dead"
    live = httpx.get(f"{url}/health/live")
    assert (live.status_code, live.json()) == (503, {"status": "engine loop dead"})
