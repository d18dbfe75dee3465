"""`EngineClient` against a scripted engine in a real engine process: the `Engine` contract across the pipe (streams,
refusals at submit, abort, shutdown) and its failure modes (the engine loop dies; the process dies)."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from functools import partial

import pytest
import uvloop

from serving.engine.interface import EngineDeadError, GenerationRequest, QueueFullError, SamplingParams
from serving.engine.process import EngineClient
from tests.serving import scripted_engine
from tests.serving.server import REPO_ROOT, alive
from tests.serving.test_engine import collect


def request(request_id: str, first_token: int, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(request_id, (first_token, 1, 2), SamplingParams(max_tokens=max_tokens))


@pytest.fixture
def client():
    client = EngineClient.spawn_engine(partial(scripted_engine.build, max_running=2, max_waiting=2), max_waiting=2,
                                       log_level="warning")
    yield client
    if client._process.is_alive():
        client._process.kill()
        client._process.join(10)


def test_streams_cross_the_pipe_in_order_with_their_finish_reasons(client):
    async def main():
        await client.start()
        results = await asyncio.gather(*(collect(client.generate(request(f"r{i}", 10 * i, 5 + i))) for i in range(4)))
        stats = client.stats()
        await client.shutdown()
        return results, stats

    results, stats = asyncio.run(main())
    assert results == [(list(range(10 * i, 10 * i + 5 + i)), "length") for i in range(4)]
    assert stats.generation_tokens_total == sum(5 + i for i in range(4)) and stats.loop_alive
    assert client._process.exitcode == 0


def test_refusals_happen_at_submit_in_the_http_process(client):
    async def main():
        await client.start()
        with pytest.raises(ValueError, match="outside this model's vocabulary"):
            client.generate(request("bad", 5000, 3))
        streams = [client.generate(request(f"r{i}", i, 200)) for i in range(4)]  # 2 running + 2 waiting
        with pytest.raises(ValueError, match="already running"):
            client.generate(request("r0", 0, 3))
        with pytest.raises(QueueFullError, match="2 requests are already waiting"):
            client.generate(request("r5", 5, 3))
        client.abort("r0")
        tokens, reason = await collect(streams[0])
        assert reason == "abort" and len(tokens) < 200
        await client.shutdown()  # the rest end with abort
        return [await collect(stream) for stream in streams[1:]]

    assert [reason for _, reason in asyncio.run(main())] == ["abort"] * 3


def test_a_dead_engine_loop_fails_its_streams_liveness_and_new_requests(client):
    async def main():
        await client.start()
        healthy = client.generate(request("healthy", 1, 4000))
        await healthy.__anext__()
        poison = client.generate(request("poison", scripted_engine.KILL_TOKEN, 5))  # kept: a dropped stream aborts
        with pytest.raises(EngineDeadError, match="CUDA error"):
            await collect(healthy)
        with pytest.raises(EngineDeadError, match="CUDA error"):
            await collect(poison)
        assert not client.stats().loop_alive
        with pytest.raises(EngineDeadError, match="engine loop died"):
            client.generate(request("later", 1, 3))
        await client.shutdown()

    asyncio.run(main())


def test_a_killed_engine_process_fails_its_streams_and_shutdown_still_returns(client):
    async def main():
        await client.start()
        stream = client.generate(request("r", 1, 4000))
        await stream.__anext__()
        os.kill(client._process.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match=r"engine process exited \(code -9\)"):
            await collect(stream)
        assert not client.stats().loop_alive
        with pytest.raises(EngineDeadError):
            client.generate(request("later", 1, 3))
        await asyncio.wait_for(client.shutdown(), 30)

    asyncio.run(main())


def test_an_engine_that_fails_to_build_is_a_load_error_with_its_message():
    from serving.engine.config import EngineConfig
    from serving.engine.interface import ModelLoadError
    from serving.engine.process import load_engine

    with pytest.raises(ModelLoadError, match="does not exist"):
        EngineClient.spawn_engine(partial(load_engine, "/nonexistent/model", EngineConfig(device="cpu")),
                                  max_waiting=1, log_level="warning")


def test_a_failed_warm_up_fails_start_with_the_engines_reason_and_the_process_still_stops():
    client = EngineClient.spawn_engine(partial(scripted_engine.build, fail_start=True), max_waiting=2,
                                       log_level="warning")

    async def main():
        with pytest.raises(RuntimeError, match="warm-up failed: RuntimeError: CUDA out of memory during warm-up"):
            await client.start()
        await asyncio.wait_for(client.shutdown(), 30)

    asyncio.run(main())
    assert client._process.exitcode == 0


def test_a_process_that_exits_without_shutting_its_engine_down_reaps_the_engine_process(tmp_path):
    # The engine ignores SIGTERM (group signals must not stop it mid-drain), and multiprocessing joins its children
    # at exit after sending one: without the reaper this exit would hang for ever.
    script = tmp_path / "leave.py"
    script.write_text(
        "from functools import partial\n"
        "from serving.engine.process import EngineClient\n"
        "from tests.serving import scripted_engine\n"
        "if __name__ == '__main__':\n"
        "    client = EngineClient.spawn_engine(partial(scripted_engine.build), max_waiting=1, log_level='warning')\n"
        "    print(client._process.pid, flush=True)\n")
    result = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.split()[0])
    deadline = time.monotonic() + 15
    while alive(pid):
        assert time.monotonic() < deadline, "the engine process outlived its parent"
        time.sleep(0.1)


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_the_drain_deadline_aborting_a_thousand_requests_at_once_does_not_deadlock_the_pipe(tiny_model_dir,
                                                                                             event_loop):
    """What ServerState.drain does at its deadline: one abort per open request, in one synchronous loop. The engine
    answers each with a final output while the event loop is not reading; neither side may block the other, and no
    command may be lost when the pipe is full (under uvloop, the server's loop, as under asyncio's)."""
    from serving.engine.config import EngineConfig

    client = EngineClient.spawn(tiny_model_dir, EngineConfig(device="cpu", max_num_seqs=8, max_waiting=2000,
                                                             warmup_tokens=0), log_level="warning")
    count = 1200

    async def main():
        await client.start()
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        streams = [client.generate(GenerationRequest(f"r{i}", (5, 6, 7), params)) for i in range(count)]
        await asyncio.sleep(0.5)
        for i in range(count):
            client.abort(f"r{i}")
        results = await asyncio.wait_for(asyncio.gather(*(collect(stream) for stream in streams)), 60)
        await asyncio.wait_for(client.shutdown(), 60)
        return results

    results = uvloop.run(main()) if event_loop == "uvloop" else asyncio.run(main())
    assert len(results) == count and {reason for _, reason in results} <= {"abort", "length"}
    assert sum(reason == "abort" for _, reason in results) > count - 50


def test_a_burst_the_http_process_admits_is_never_refused_by_the_engine_process(tiny_model_dir):
    """8 slots and 8 waiting places: 16 requests submitted at once all run (the engine's loop admits into slots
    only between steps, so its own waiting count can run ahead of the HTTP process's)."""
    from serving.engine.config import EngineConfig

    client = EngineClient.spawn(tiny_model_dir, EngineConfig(device="cpu", max_num_seqs=8, max_waiting=8,
                                                             warmup_tokens=0), log_level="warning")

    async def main():
        await client.start()
        params = SamplingParams(max_tokens=20, ignore_eos=True)
        streams = [client.generate(GenerationRequest(f"r{i}", (5, 6, 7), params)) for i in range(16)]
        with pytest.raises(QueueFullError):
            client.generate(GenerationRequest("r16", (5, 6, 7), params))
        try:
            return await asyncio.wait_for(asyncio.gather(*(collect(stream) for stream in streams)), 60)
        finally:
            await client.shutdown()

    assert [(len(tokens), reason) for tokens, reason in asyncio.run(main())] == [(20, "length")] * 16
