"""The RequestRunner when a reply waits for room (the caller reads slowly or not at all):
cancels, deadlines and the handler's own timeouts must still reach the handler and end the
stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from troupe import RequestContext
from troupe.messages import Chunk, End, Error, Reply, Request
from troupe.transports import RequestRunner

from ._runner_helpers import (
    HeldSend,
    Sink,
    wait_idle,
)


async def test_cancel_while_the_first_chunk_waits_for_room_reaches_the_handler() -> None:
    room, stopped, waiting = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen: list[str] = []

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"first"
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            stopped.set()
        yield b"never"

    async def slow_send(frame: Reply) -> bool:
        waiting.set()
        await room.wait()  # back-pressure: the caller does not read
        return True

    runner = RequestRunner("t")
    runner.add_endpoint("ep", handler)
    runner.dispatch("k", Request(1, "ep", b""), slow_send)
    await asyncio.wait_for(waiting.wait(), 5)  # the first chunk waits for room
    assert runner.cancel("k")
    await asyncio.wait_for(stopped.wait(), 5)
    assert seen == ["cancelled"]
    await wait_idle(runner)


async def test_a_handler_timeout_firing_while_its_first_chunk_waits_for_room_ends_the_stream() -> (
    None
):
    # The handler's own timeout cancels the task while the runner waits in send: the handler
    # must see it (as TimeoutError) and carry on, and the stream must still end.
    seen: list[str] = []

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"a"
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(30)
        except TimeoutError:
            seen.append("timeout")
            yield b"fallback"

    runner = RequestRunner("t")
    runner.add_endpoint("ep", handler)
    sink = HeldSend(b"a")
    runner.dispatch("k", Request(1, "ep", b""), sink)
    await asyncio.wait_for(sink.done.wait(), 5)
    assert sink.frames == [Chunk(1, b"a"), Chunk(1, b"fallback"), End(1)]
    assert seen == ["timeout"]
    await wait_idle(runner)


async def test_a_deadline_while_the_first_chunk_waits_for_room_reaches_the_handler() -> None:
    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"a"
        await asyncio.sleep(30)
        yield b"never"

    runner = RequestRunner("t")
    runner.add_endpoint("ep", handler)
    sink = HeldSend(b"a")
    runner.dispatch("k", Request(1, "ep", b"", deadline=time.time() + 0.05), sink)
    await asyncio.wait_for(sink.done.wait(), 5)
    assert len(sink.frames) == 2
    last = sink.frames[1]
    assert isinstance(last, Error)
    assert last.kind == "DeadlineExceeded"
    await wait_idle(runner)


def _awaits_inner_work(
    started: list[asyncio.Task[None]],
) -> Callable[[bytes, RequestContext], AsyncIterator[bytes]]:
    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"a"
        inner = asyncio.create_task(asyncio.sleep(3600), name="inner-work")
        started.append(inner)
        await inner
        yield b"never"

    return handler


async def _assert_cancelled(tasks: list[asyncio.Task[None]]) -> None:
    assert len(tasks) == 1
    try:
        await asyncio.wait(tasks, timeout=5)
        assert tasks[0].cancelled()
    finally:
        tasks[0].cancel()


async def test_work_the_handler_awaits_is_cancelled_when_the_caller_is_gone() -> None:
    started: list[asyncio.Task[None]] = []
    runner = RequestRunner("t")
    runner.add_endpoint("ep", _awaits_inner_work(started))
    sink = Sink(accept=False)
    runner.dispatch("k", Request(1, "ep", b""), sink)
    await wait_idle(runner)
    await _assert_cancelled(started)
    assert sink.frames == [Chunk(1, b"a")]


async def test_work_the_handler_awaits_is_cancelled_when_cancelled_during_a_send() -> None:
    started: list[asyncio.Task[None]] = []
    runner = RequestRunner("t")
    runner.add_endpoint("ep", _awaits_inner_work(started))
    sink = HeldSend(b"a")
    runner.dispatch("k", Request(1, "ep", b""), sink)
    await asyncio.wait_for(sink.waiting.wait(), 5)
    assert runner.cancel("k")
    await wait_idle(runner)
    await _assert_cancelled(started)
    assert sink.frames == [Chunk(1, b"a")]


@pytest.mark.parametrize("before", [1, 3], ids=["second-chunk", "fourth-chunk"])
@pytest.mark.parametrize("fallback", [True, False], ids=["fallback", "no-fallback"])
async def test_a_handler_timeout_firing_while_a_later_chunk_waits_for_room_ends_the_stream(
    before: int, fallback: bool
) -> None:
    # The handler's timeout spans a later yield and fires while the runner waits in that
    # chunk's send: the handler must see it (as TimeoutError) and carry on to End.
    seen: list[str] = []

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        for i in range(before):
            yield b"%d" % i
        try:
            async with asyncio.timeout(0.01):
                yield b"held"
                await asyncio.sleep(30)
        except TimeoutError:
            seen.append("timeout")
            if fallback:
                yield b"fallback"

    runner = RequestRunner("t")
    runner.add_endpoint("ep", handler)
    sink = HeldSend(b"held")
    runner.dispatch("k", Request(1, "ep", b""), sink)
    await asyncio.wait_for(sink.done.wait(), 5)
    expected: list[Reply] = [Chunk(1, b"%d" % i) for i in range(before)]
    expected.append(Chunk(1, b"held"))
    if fallback:
        expected.append(Chunk(1, b"fallback"))
    assert sink.frames == [*expected, End(1)]
    assert seen == ["timeout"]
    await wait_idle(runner)


async def test_a_handler_timeout_outlives_a_yield_that_needs_no_wait() -> None:
    # The timeout fires during the send of "held"; the handler yields "more" before it waits
    # again, and must still see its timeout there.
    seen: list[str] = []

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"a"
        await asyncio.sleep(0)
        try:
            async with asyncio.timeout(0.01):
                yield b"held"
                yield b"more"
                await asyncio.sleep(30)
        except TimeoutError:
            seen.append("timeout")
            yield b"fallback"

    runner = RequestRunner("t")
    runner.add_endpoint("ep", handler)
    sink = HeldSend(b"held")
    runner.dispatch("k", Request(1, "ep", b""), sink)
    await asyncio.wait_for(sink.done.wait(), 5)
    assert sink.frames == [
        Chunk(1, b"a"),
        Chunk(1, b"held"),
        Chunk(1, b"more"),
        Chunk(1, b"fallback"),
        End(1),
    ]
    assert seen == ["timeout"]
    await wait_idle(runner)


async def test_a_cancel_during_a_later_send_closes_the_handler_at_its_yield() -> None:
    closed: list[str] = []

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        try:
            yield b"a"
            yield b"b"
            closed.append("went on")
        except GeneratorExit:
            closed.append(ctx.stop_reason or "")
            raise

    runner = RequestRunner("t")
    runner.add_endpoint("ep", handler)
    sink = HeldSend(b"b")
    runner.dispatch("k", Request(1, "ep", b""), sink)
    await asyncio.wait_for(sink.waiting.wait(), 5)
    assert runner.cancel("k")
    await wait_idle(runner)
    assert closed == ["cancelled"]
    assert sink.frames == [Chunk(1, b"a"), Chunk(1, b"b")]


async def test_a_deadline_while_a_later_chunk_waits_for_room_ends_with_deadline_exceeded() -> None:
    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"
        await asyncio.sleep(30)
        yield b"never"

    runner = RequestRunner("t")
    runner.add_endpoint("ep", handler)
    sink = HeldSend(b"b")
    runner.dispatch("k", Request(1, "ep", b"", deadline=time.time() + 0.05), sink)
    await asyncio.wait_for(sink.done.wait(), 5)
    assert sink.frames[:2] == [Chunk(1, b"a"), Chunk(1, b"b")]
    assert len(sink.frames) == 3
    last = sink.frames[2]
    assert isinstance(last, Error)
    assert last.kind == "DeadlineExceeded"
    await wait_idle(runner)
