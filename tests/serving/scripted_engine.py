"""An engine for `EngineClient` tests, built in the engine process by `build` (importable there, no torch): each
request streams `max_tokens` tokens (its prompt's first token, counting up), one per 2 ms step, and a request whose
prompt starts with token 999 kills the engine loop, as a CUDA error on the loop thread would; `fail_start` makes the
warm-up fail."""
from __future__ import annotations

import threading
import time

from serving.engine.interface import EngineDeadError, EngineStats, ModelInfo, QueueFullError, TokenOutput, check_request

KILL_TOKEN = 999


class ScriptedEngine:
    def __init__(self, max_running: int, max_waiting: int, fail_start: bool = False) -> None:
        self._fail_start = fail_start
        self.model_info = ModelInfo(max_model_len=4096, vocab_size=1000)
        self.tokenizer = None
        self._max_running = max_running
        self._max_waiting = max_waiting
        self._lock = threading.Lock()
        self._live: dict[str, list] = {}  # request id -> [request, sink, handle, emitted]
        self._dead = False
        self._generated = 0

    async def start(self) -> None:
        if self._fail_start:
            raise RuntimeError("CUDA out of memory during warm-up")
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, request, sink, handle) -> None:
        check_request(request, self.model_info)
        with self._lock:
            if self._dead:
                raise EngineDeadError("the engine loop has died")
            if len(self._live) >= self._max_running + self._max_waiting:
                raise QueueFullError("full")
            self._live[request.request_id] = [request, sink, handle, 0]

    def abort(self, request_id: str) -> None:
        with self._lock:
            entry = self._live.pop(request_id, None)
        if entry is not None:
            entry[1].deliver([(entry[2], TokenOutput((), "abort"))])

    def stats(self) -> EngineStats:
        with self._lock:
            running = min(len(self._live), self._max_running)
            return EngineStats(waiting=len(self._live) - running, running=running, max_running=self._max_running,
                               kv_cache_usage=0.0, kv_cache_capacity_tokens=4096, prompt_tokens_total=0,
                               generation_tokens_total=self._generated, loop_alive=not self._dead, device="cpu")

    async def shutdown(self) -> None:
        with self._lock:
            live, self._live = list(self._live.values()), {}
        for _request, sink, handle, _ in live:
            sink.deliver([(handle, TokenOutput((), "abort"))])

    def _run(self) -> None:
        while True:
            time.sleep(0.002)
            with self._lock:
                step = list(self._live.values())[: self._max_running]
                if any(entry[0].prompt_token_ids[0] == KILL_TOKEN for entry in step):
                    self._dead = True
                    live, self._live = list(self._live.values()), {}
                    break
            for entry in step:
                request, sink, handle, emitted = entry
                entry[3] = emitted + 1
                done = entry[3] >= request.sampling.max_tokens
                token = (request.prompt_token_ids[0] + emitted) % 1000
                if done:
                    with self._lock:
                        self._live.pop(request.request_id, None)
                with self._lock:
                    self._generated += 1
                sink.deliver([(handle, TokenOutput((token,), "length" if done else None))])
        for _request, sink, handle, _ in live:
            sink.deliver([(handle, EngineDeadError("the engine loop died: CUDA error"))])


def build(max_running: int = 2, max_waiting: int = 2, fail_start: bool = False) -> ScriptedEngine:
    return ScriptedEngine(max_running, max_waiting, fail_start)
