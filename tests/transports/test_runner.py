"""The server-side semantics shared by every transport, driven without any transport: dispatch,
errors, cancellation, the request context. Back-pressure, admission and handler failures have
modules of their own (``test_runner_*.py``)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import pytest

from troupe import RequestContext
from troupe.errors import ConfigError, InvalidName, Overloaded
from troupe.messages import Chunk, End, Error, Request
from troupe.testing import eventually_async
from troupe.transports import RequestRunner, remote_error
from troupe.transports._dispatch import error_frame

from ._runner_helpers import Sink, wait_idle


async def test_expired_request_gets_deadline_error_and_never_starts() -> None:
    called = False

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        nonlocal called
        called = True
        yield b""

    runner = RequestRunner("t")
    runner.add_endpoint("ep", handler)
    sink = Sink()
    runner.dispatch("k", Request(1, "ep", b"", deadline=time.time() - 0.01), sink)
    await asyncio.wait_for(sink.done.wait(), 5)
    assert [type(f) for f in sink.frames] == [Error]
    assert isinstance(sink.frames[0], Error)
    assert sink.frames[0].kind == "DeadlineExceeded"
    assert not called


async def test_unknown_endpoint_duplicate_key_and_closed_runner() -> None:
    release = asyncio.Event()

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        await release.wait()
        yield b"x"

    runner = RequestRunner("t")
    runner.add_endpoint("ep", handler)
    unknown = Sink()
    runner.dispatch("a", Request(1, "missing", b""), unknown)
    await asyncio.wait_for(unknown.done.wait(), 5)
    assert unknown.frames == [Error(1, "UnknownEndpoint", "unknown endpoint 'missing'")]

    first, duplicate = Sink(), Sink()
    runner.dispatch("b", Request(2, "ep", b""), first)
    runner.dispatch("b", Request(2, "ep", b""), duplicate)
    await asyncio.wait_for(duplicate.done.wait(), 5)
    assert isinstance(duplicate.frames[0], Error)
    assert duplicate.frames[0].kind == "ProtocolError"
    release.set()
    await asyncio.wait_for(first.done.wait(), 5)
    # a one-chunk reply travels as one frame
    assert first.frames == [Chunk(2, b"x", end=True)]

    await runner.close()
    late = Sink()
    runner.dispatch("c", Request(3, "ep", b""), late)
    await asyncio.wait_for(late.done.wait(), 5)
    assert isinstance(late.frames[0], Error)
    assert late.frames[0].kind == "Overloaded"


async def test_handler_must_yield_bytes_but_bytes_like_is_accepted() -> None:
    async def wrong(payload: bytes, ctx: RequestContext) -> AsyncIterator[object]:
        yield bytearray(b"ok")
        yield memoryview(b"mv")
        yield {"not": "bytes"}

    runner = RequestRunner("t")
    runner.add_endpoint("ep", wrong)  # type: ignore[arg-type]
    sink = Sink()
    runner.dispatch("k", Request(1, "ep", b""), sink)
    await asyncio.wait_for(sink.done.wait(), 5)
    assert sink.frames[:2] == [Chunk(1, b"ok"), Chunk(1, b"mv")]
    last = sink.frames[2]
    assert isinstance(last, Error)
    assert last.kind == "TypeError"
    assert "must yield bytes" in last.message


async def test_a_vanished_caller_stops_the_handler_and_closes_its_generator() -> None:
    closed = asyncio.Event()
    seen: list[RequestContext] = []

    async def endless(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        seen.append(ctx)
        try:
            while True:
                yield b"tick"
        finally:
            closed.set()

    runner = RequestRunner("t")
    runner.add_endpoint("ep", endless)
    sink = Sink(accept=False)
    runner.dispatch("k", Request(1, "ep", b""), sink)
    await asyncio.wait_for(closed.wait(), 5)
    assert seen[0].stop_reason == "disconnected"
    assert sink.frames == [Chunk(1, b"tick")]  # no End after the caller is gone
    await wait_idle(runner)


async def test_cancel_where_stops_one_peers_requests() -> None:
    async def block(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"go"
        await asyncio.Event().wait()

    runner = RequestRunner("t")
    runner.add_endpoint("ep", block)
    sinks = {key: Sink() for key in [("peer-a", 1), ("peer-a", 2), ("peer-b", 1)]}
    for key, sink in sinks.items():
        runner.dispatch(key, Request(key[1], "ep", b""), sink)
    await eventually_async(
        lambda: all(sink.frames for sink in sinks.values()), what="every request answered once"
    )
    assert runner.inflight == 3
    stopped = runner.cancel_where(lambda key: key[0] == "peer-a", "disconnected")  # type: ignore[index]
    assert stopped == 2
    await eventually_async(lambda: runner.inflight == 1, what="peer-a's requests stopped")
    assert not runner.cancel("nobody")
    await runner.close()
    assert runner.inflight == 0


async def test_endpoint_names_are_validated() -> None:
    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield payload

    runner = RequestRunner("t")
    with pytest.raises(InvalidName):
        runner.add_endpoint("", handler)
    runner.add_endpoint("ep", handler)
    with pytest.raises(ConfigError, match="already served"):
        runner.add_endpoint("ep", handler)
    with pytest.raises(ConfigError):
        runner.add_endpoint("other", "not callable")  # type: ignore[arg-type]
    assert runner.endpoints == ("ep",)
    runner.remove_endpoint("ep")
    runner.remove_endpoint("ep")  # unknown names are ignored
    assert runner.endpoints == ()


async def test_context_can_be_stopped_from_another_thread() -> None:
    ctx = RequestContext(1, "ep", headers={"a": "b"})
    assert not ctx.is_stopped()
    assert ctx.time_remaining() is None
    waiter = asyncio.create_task(ctx.wait_stopped(), name="wait-stopped")
    await asyncio.sleep(0)  # one loop turn: the waiter waits before the other thread stops it
    thread = threading.Thread(target=ctx.stop_generating, name="stopper")
    thread.start()
    thread.join()
    await asyncio.wait_for(waiter, 5)
    assert ctx.stop_reason == "handler"
    ctx.stop("cancelled")  # the first reason wins
    assert ctx.stop_reason == "handler"
    with pytest.raises(TypeError):
        ctx.headers["a"] = "c"  # type: ignore[index]
    assert "stopped=handler" in repr(ctx)


def test_error_frames_carry_the_class_name_and_a_bounded_message() -> None:
    frame = error_frame(7, ValueError("x" * 100_000))
    assert frame.kind == "ValueError"
    assert len(frame.message) < 17_000
    assert frame.message.endswith("(truncated)")


def test_remote_error_mapping() -> None:
    overloaded = remote_error("Overloaded", "worker at capacity", address="a", endpoint="ep")
    assert isinstance(overloaded, Overloaded)
    assert str(overloaded) == "worker at capacity"
    assert overloaded.endpoint == "ep"
    too_large = remote_error(
        "MessageTooLarge",
        "message of 300 bytes exceeds the limit of 200 bytes",
        address="a",
        endpoint="ep",
    )
    assert (too_large.size, too_large.limit) == (300, 200)  # type: ignore[attr-defined]
    other = remote_error("KeyError", "'k'", address="tcp://h:1", endpoint="ep")
    assert other.kind == "KeyError"  # type: ignore[attr-defined]
    assert other.address == "tcp://h:1"  # type: ignore[attr-defined]


async def test_one_chunk_reply_is_one_frame_and_a_waiting_handler_is_not_delayed() -> None:
    gate = asyncio.Event()

    async def unary(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"only"

    async def waits(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"first"
        await gate.wait()
        yield b"second"

    async def coroutine(payload: bytes, ctx: RequestContext) -> bytes:
        return b"value"

    runner = RequestRunner("t")
    runner.add_endpoint("unary", unary)
    runner.add_endpoint("waits", waits)
    runner.add_endpoint("coro", coroutine)
    one, two, three = Sink(), Sink(), Sink()
    runner.dispatch("a", Request(1, "unary", b""), one)
    runner.dispatch("c", Request(3, "coro", b""), three)
    runner.dispatch("b", Request(2, "waits", b""), two)
    await asyncio.wait_for(one.done.wait(), 5)
    await asyncio.wait_for(three.done.wait(), 5)
    assert one.frames == [Chunk(1, b"only", end=True)]
    assert three.frames == [Chunk(3, b"value", end=True)]
    # the first chunk leaves while the handler waits for its second
    await eventually_async(lambda: two.frames, what="the first chunk sent")
    assert two.frames == [Chunk(2, b"first")]
    gate.set()
    await asyncio.wait_for(two.done.wait(), 5)
    # only a reply whose first item is its last is merged with the End
    assert two.frames == [Chunk(2, b"first"), Chunk(2, b"second"), End(2)]
    await wait_idle(runner)


async def test_handler_failing_after_its_first_item_sends_it_then_the_error() -> None:
    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"partial"
        raise ValueError("boom")

    runner = RequestRunner("t")
    runner.add_endpoint("ep", handler)
    sink = Sink()
    runner.dispatch("k", Request(1, "ep", b""), sink)
    await asyncio.wait_for(sink.done.wait(), 5)
    assert sink.frames == [Chunk(1, b"partial"), Error(1, "ValueError", "boom")]


async def test_a_first_item_that_is_not_bytes_fails_before_the_handler_goes_on() -> None:
    went_on: list[bool] = []

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[object]:
        yield 42
        went_on.append(True)
        await asyncio.sleep(0)
        yield b"never"

    runner = RequestRunner("t")
    runner.add_endpoint("ep", handler)  # type: ignore[arg-type]
    sink = Sink()
    runner.dispatch("k", Request(1, "ep", b""), sink)
    await asyncio.wait_for(sink.done.wait(), 5)
    assert len(sink.frames) == 1
    error = sink.frames[0]
    assert isinstance(error, Error)
    assert error.kind == "TypeError"
    assert went_on == []
    await wait_idle(runner)
