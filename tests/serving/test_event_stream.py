"""How the server notices a client leaving (one watcher task per request), for streaming responses (`_EventStream`)
and non-streaming ones (`_collect_unless_disconnected`), driven directly with a connection that behaves as uvicorn's
(ASGI spec 2.3): `receive()` waits until the client leaves or the response is complete, then says `http.disconnect`."""
from __future__ import annotations

import asyncio

import pytest

from serving.api.openai import _EventStream

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}


class Connection:
    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.changed = asyncio.Event()
        self.disconnected = False
        self.complete = False

    async def receive(self) -> dict:
        if not (self.disconnected or self.complete):
            await self.changed.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        if self.disconnected:
            return  # as uvicorn: writes to a closed connection are dropped
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
            self.changed.set()

    def leave(self) -> None:
        self.disconnected = True
        self.changed.set()

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body" and m["body"]]


class Generation:
    """A body: `count` events, then (if `count` is None) waits for ever, as a stream waits for its next token."""

    def __init__(self, count: int | None) -> None:
        self.count = count
        self.closed = False
        self.released = 0
        self.first_sent = asyncio.Event()

    async def events(self):
        try:
            index = 0
            while self.count is None or index < self.count:
                yield f"data: {index}\n\n"
                self.first_sent.set()
                index += 1
                await asyncio.sleep(0)
            if self.count is None:
                await asyncio.Future()
        finally:
            self.closed = True

    async def release(self) -> None:
        self.released += 1


def response(generation: Generation) -> _EventStream:
    from starlette.background import BackgroundTask

    return _EventStream(generation.events(), media_type="text/event-stream", background=BackgroundTask(
        generation.release))


def test_a_finished_stream_runs_its_background_once_and_is_not_cancelled_by_the_completion_notice():
    async def run():
        connection, generation = Connection(), Generation(count=3)
        task = asyncio.current_task()
        await response(generation)(SCOPE, connection.receive, connection.send)
        await asyncio.sleep(0.01)  # the watcher would have acted by now
        return connection, generation, task.cancelling()

    connection, generation, cancelling = asyncio.run(run())
    assert connection.bodies() == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert connection.complete and generation.released == 1 and cancelling == 0


def test_a_client_leaving_mid_stream_ends_it_and_still_runs_the_background():
    async def run():
        connection, generation = Connection(), Generation(count=None)
        task = asyncio.ensure_future(response(generation)(SCOPE, connection.receive, connection.send))
        await generation.first_sent.wait()
        connection.leave()
        await asyncio.wait_for(task, 5)  # returns normally: leaving is not an error of the server
        return connection, generation, task

    connection, generation, task = asyncio.run(run())
    assert generation.closed and generation.released == 1
    assert task.cancelling() == 0 and not connection.complete


def test_a_server_cancel_in_the_same_turn_as_the_client_leaving_is_not_swallowed():
    async def run():
        connection, generation = Connection(), Generation(count=None)
        task = asyncio.ensure_future(response(generation)(SCOPE, connection.receive, connection.send))
        await generation.first_sent.wait()
        await asyncio.sleep(0)  # the body now waits for its next token
        connection.leave()
        await asyncio.sleep(0)  # the watcher runs and cancels the task, which has not resumed yet
        task.cancel()  # the server's own cancel (shutdown), in the same turn
        with pytest.raises(asyncio.CancelledError):
            await task
        return generation

    generation = asyncio.run(run())
    assert generation.released == 0  # as Starlette: a cancelled response skips its background


def test_a_failing_receive_is_raised_not_lost():
    class Broken(Connection):
        async def receive(self) -> dict:
            raise RuntimeError("receive failed")

    async def run():
        connection, generation = Broken(), Generation(count=3)
        await response(generation)(SCOPE, connection.receive, connection.send)

    with pytest.raises(RuntimeError, match="receive failed"):
        asyncio.run(run())


def test_a_generation_cancelled_while_its_stream_closes_still_aborts_its_engine_request():
    from serving.api.openai import _Generation

    class SlowToClose:
        async def aclose(self) -> None:
            await asyncio.sleep(10)  # a stream whose close waits (none of ours does today)

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def abort(self, request_id: str) -> None:
            self.calls.append(f"abort {request_id}")

        def untrack(self, request_id: str) -> None:
            self.calls.append(f"untrack {request_id}")

    async def run(recorder: Recorder) -> None:
        generation = _Generation.__new__(_Generation)  # only what release() uses
        generation.state, generation.engine, generation.request_id = recorder, recorder, "req-1"
        generation._stream, generation._released = SlowToClose(), False
        task = asyncio.ensure_future(generation.release())
        await asyncio.sleep(0.01)
        task.cancel()  # the client left, or the server stops, while the stream closes
        with pytest.raises(asyncio.CancelledError):
            await task

    recorder = Recorder()
    asyncio.run(run(recorder))
    assert recorder.calls == ["untrack req-1", "abort req-1"]


class Collected:
    """What `_collect_unless_disconnected` uses of a generation: deltas that wait for ever after the first, and
    release()."""

    def __init__(self) -> None:
        self.first_sent = asyncio.Event()
        self.released = 0

    async def deltas(self):
        yield "hello"
        self.first_sent.set()
        await asyncio.Future()

    async def release(self) -> None:
        self.released += 1


@pytest.mark.parametrize("server_cancels_too", [False, True])
def test_a_non_streaming_request_whose_client_leaves_is_499_unless_the_server_cancelled_it_too(server_cancels_too):
    from types import SimpleNamespace

    from serving.api.openai import _collect_unless_disconnected
    from serving.errors import APIError

    async def run():
        connection, generation = Connection(), Collected()
        task = asyncio.ensure_future(_collect_unless_disconnected(SimpleNamespace(receive=connection.receive),
                                                                  generation))
        await generation.first_sent.wait()
        await asyncio.sleep(0)  # the generation now waits for its next token
        connection.leave()
        await asyncio.sleep(0)  # the watcher runs and cancels the task, which has not resumed yet
        if server_cancels_too:
            task.cancel()
        try:
            await task
        except BaseException as exc:  # noqa: BLE001 - the outcome is what is checked
            return exc, generation.released
        return None, generation.released

    outcome, released = asyncio.run(run())
    if server_cancels_too:
        assert isinstance(outcome, asyncio.CancelledError)
    else:
        assert isinstance(outcome, APIError) and outcome.status_code == 499
    assert released == 1
