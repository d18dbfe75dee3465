"""`TokenStream` over a `Mailbox`: what a reader gets from the outputs an engine delivers, merged as they queue up."""
from __future__ import annotations

import asyncio

import pytest

from serving.engine.interface import EngineDeadError, TokenOutput
from serving.engine.stream import Mailbox, TokenStream


def _stream() -> tuple[Mailbox, TokenStream, list[str]]:
    mailbox, abandoned = Mailbox(), []
    return mailbox, TokenStream(mailbox, lambda: abandoned.append("abort")), abandoned


def test_outputs_that_queued_up_are_read_as_one_and_the_final_one_ends_the_stream():
    async def run():
        mailbox, stream, abandoned = _stream()
        for token in (5, 6, 7):
            mailbox.put_nowait(TokenOutput((token,)))
        first = await stream.__anext__()
        mailbox.put_nowait(TokenOutput((8, 9)))
        mailbox.put_nowait(TokenOutput((10,), "length"))
        rest = [output async for output in stream]
        return first, rest, abandoned

    first, rest, abandoned = asyncio.run(run())
    assert first == TokenOutput((5, 6, 7))
    assert rest == [TokenOutput((8, 9, 10), "length")]
    assert abandoned == []  # it finished: nothing to abort


def test_tokens_that_came_before_an_error_are_read_before_it():
    async def run():
        mailbox, stream, _ = _stream()
        mailbox.put_nowait(TokenOutput((1,)))
        mailbox.put_nowait(TokenOutput((2,)))
        mailbox.put_nowait(EngineDeadError("the engine process exited"))
        first = await stream.__anext__()
        with pytest.raises(EngineDeadError, match="exited"):
            await stream.__anext__()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        return first

    assert asyncio.run(run()) == TokenOutput((1, 2))


def test_a_waiting_reader_wakes_for_the_next_output_and_a_cancelled_one_aborts_its_request():
    async def run():
        mailbox, stream, abandoned = _stream()
        reader = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        assert not reader.done()  # nothing delivered yet
        mailbox.put_nowait(TokenOutput((3,)))
        assert await asyncio.wait_for(reader, 1) == TokenOutput((3,))
        waiting = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        mailbox.put_nowait(TokenOutput((4,), "length"))  # too late: the reader is gone
        return abandoned

    assert asyncio.run(run()) == ["abort"]
