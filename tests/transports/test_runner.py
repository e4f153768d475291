"""The server-side semantics shared by every transport, driven without any transport."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from troupe._support._logging import configure_logging
from troupe.config import LogConfig
from troupe.errors import ConfigError, InvalidName, Overloaded, RemoteError
from troupe.messages import Chunk, End, Error, Reply, Request
from troupe.testing import eventually_async
from troupe.transports import RequestContext, RequestRunner, remote_error
from troupe.transports._dispatch import error_frame
from troupe.transports._failures import TracebackBudget


class Sink:
    """Collects reply frames; ``accept=False`` plays a caller that went away."""

    def __init__(self, accept: bool = True) -> None:
        self.frames: list[Reply] = []
        self.accept = accept
        self.done = asyncio.Event()

    async def __call__(self, frame: Reply) -> bool:
        self.frames.append(frame)
        if not isinstance(frame, Chunk) or frame.end:
            self.done.set()
        return self.accept


async def wait_idle(runner: RequestRunner) -> None:
    for _ in range(1000):
        if runner.inflight == 0:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("runner never became idle")


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
    for _ in range(100):
        if all(sink.frames for sink in sinks.values()):
            break
        await asyncio.sleep(0.001)
    assert runner.inflight == 3
    stopped = runner.cancel_where(lambda key: key[0] == "peer-a", "disconnected")  # type: ignore[index]
    assert stopped == 2
    for _ in range(100):
        if runner.inflight == 1:
            break
        await asyncio.sleep(0.001)
    assert runner.inflight == 1
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
    await asyncio.sleep(0)
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
    for _ in range(1000):
        if two.frames:
            break
        await asyncio.sleep(0.001)
    assert two.frames == [Chunk(2, b"first")]
    gate.set()
    await asyncio.wait_for(two.done.wait(), 5)
    # only a reply whose first item is its last is merged with the End
    assert two.frames == [Chunk(2, b"first"), Chunk(2, b"second"), End(2)]
    await wait_idle(runner)


async def test_cancel_while_the_first_chunk_waits_for_room_reaches_the_handler() -> None:
    room, stopped = asyncio.Event(), asyncio.Event()
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
        await room.wait()  # back-pressure: the caller does not read
        return True

    runner = RequestRunner("t")
    runner.add_endpoint("ep", handler)
    runner.dispatch("k", Request(1, "ep", b""), slow_send)
    await asyncio.sleep(0.01)
    assert runner.cancel("k")
    await asyncio.wait_for(stopped.wait(), 5)
    assert seen == ["cancelled"]
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


class HeldSend(Sink):
    """A sink whose send of the chunk ``held`` waits for room that never comes (back-pressure)."""

    def __init__(self, held: bytes) -> None:
        super().__init__()
        self.held = held
        self.waiting = asyncio.Event()

    async def __call__(self, frame: Reply) -> bool:
        await super().__call__(frame)
        if isinstance(frame, Chunk) and frame.data == self.held:
            self.waiting.set()
            await asyncio.Event().wait()
        return self.accept


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


# --- admission -----------------------------------------------------------------------------------


class Held:
    """A handler that waits for :attr:`release` before its one chunk."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        await self.release.wait()
        yield payload


async def test_requests_beyond_the_limits_are_refused_before_any_task() -> None:
    held = Held()
    runner = RequestRunner("t", max_inflight=3, max_inflight_per_caller=2)
    runner.add_endpoint("hold", held)
    sink = Sink()
    tasks = len(asyncio.all_tasks())
    assert runner.start("a1", Request(1, "hold", b""), sink, "a") is None
    assert runner.start("a2", Request(2, "hold", b""), sink, "a") is None
    # Caller a is at its own limit; caller b is not.
    assert runner.start("a3", Request(3, "hold", b""), sink, "a") == Error(
        3, "Overloaded", "worker at capacity for this caller (max in-flight 2 per caller)"
    )
    assert runner.start("b1", Request(4, "hold", b""), sink, "b") is None
    # The worker is at its limit: nobody gets in, whatever the caller.
    assert runner.start("c1", Request(5, "hold", b""), sink, "c") == Error(
        5, "Overloaded", "worker at capacity for endpoint hold (max in-flight 3)"
    )
    assert runner.start("n1", Request(6, "hold", b""), sink) is not None
    assert (runner.inflight, runner.held_by("a"), runner.held_by("b"), runner.callers) == (
        3,
        2,
        1,
        2,
    )
    assert len(asyncio.all_tasks()) == tasks + 3  # a refusal costs no task
    assert runner.metrics.refused() == {"max_inflight_per_caller": 1, "max_inflight": 2}
    held.release.set()
    await wait_idle(runner)
    assert (runner.callers, runner.held_by("a")) == (0, 0)
    assert runner.start("a4", Request(7, "hold", b""), sink, "a") is None  # room again
    await wait_idle(runner)


async def test_zero_limits_admit_everything() -> None:
    held = Held()
    runner = RequestRunner("t", max_inflight=0, max_inflight_per_caller=0)
    runner.add_endpoint("hold", held)
    sink = Sink()
    for i in range(3000):
        assert runner.start(i, Request(i, "hold", b""), sink, "one caller") is None
    assert runner.inflight == runner.held_by("one caller") == 3000
    held.release.set()
    await wait_idle(runner)
    assert runner.callers == 0


async def test_limits_can_be_changed_and_are_validated() -> None:
    runner = RequestRunner("t")
    assert (runner.max_inflight, runner.max_inflight_per_caller) == (1024, 512)
    runner.limit(10, 0)
    assert (runner.max_inflight, runner.max_inflight_per_caller) == (10, 0)
    with pytest.raises(ConfigError, match="DYN_WORKER_MAX_INFLIGHT"):
        RequestRunner("t", max_inflight=-1)
    with pytest.raises(ConfigError, match="DYN_WORKER_MAX_INFLIGHT_PER_CALLER"):
        runner.limit(1, True)  # a bool is no count


async def test_refusals_that_need_no_handler_cost_no_task_and_stay_small() -> None:
    runner = RequestRunner("t")
    runner.add_endpoint("ep", Held())
    sink = Sink()
    huge = "e" * 100_000
    unknown = runner.start("k1", Request(1, huge, b""), sink, "a")
    assert unknown is not None
    assert unknown.kind == "UnknownEndpoint"
    assert len(unknown.message) < 300  # not as large as what the caller sent
    expired = runner.start("k2", Request("r" * 100_000, "ep", b"", deadline=time.time() - 1), sink)
    assert expired is not None
    assert expired.kind == "DeadlineExceeded"
    assert len(expired.message) < 300
    assert runner.inflight == 0
    assert runner.callers == 0
    assert runner.metrics.refused() == {"unknown_endpoint": 1, "deadline": 1}
    assert sink.frames == []  # the transport sends refusals itself


async def test_dispatch_keeps_a_bounded_number_of_refusals_waiting() -> None:
    gone = asyncio.Event()
    sent: list[Reply] = []

    async def stuck(frame: Reply) -> bool:  # a caller that reads nothing
        sent.append(frame)
        await gone.wait()
        return False

    runner = RequestRunner("t", max_inflight=2)
    for i in range(10):
        runner.dispatch(i, Request(i, "missing", b""), stuck, "a")
    await eventually_async(lambda: len(sent) == 2)  # the refusal tasks started, and park
    assert runner.metrics.dropped() == {"backlog": 8}
    assert runner.metrics.refused() == {"unknown_endpoint": 10}
    gone.set()
    await runner.close()


# --- handler failures: the caller's error, the worker's log --------------------------------------


def log_to(level: str) -> io.StringIO:
    """Troupe's log, as JSON lines, at ``level`` (conftest's autouse fixture undoes it)."""
    stream = io.StringIO()
    configure_logging(LogConfig(level=level, json=True), stream=stream)
    return stream


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def failures_logged(stream: io.StringIO) -> list[dict[str, Any]]:
    return [line for line in log_lines(stream) if line["logger"] == "troupe.transports.failures"]


async def _boom(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    raise ValueError("boom")
    yield b""


async def _fail(runner: RequestRunner, key: object, rid: int, endpoint: str = "ep") -> Error:
    sink = Sink()
    runner.dispatch(key, Request(rid, endpoint, b""), sink)
    await asyncio.wait_for(sink.done.wait(), 5)
    [frame] = sink.frames
    assert isinstance(frame, Error)
    return frame


@pytest.mark.parametrize("level", ["info", "error"])
async def test_a_handler_failure_is_logged_with_its_traceback_and_named_to_its_caller(
    level: str,
) -> None:
    log = log_to(level)
    runner = RequestRunner("t")
    runner.add_endpoint("ep", _boom)
    frame = await _fail(runner, "k", 1)
    assert (frame.kind, frame.message) == ("ValueError", "boom")
    assert frame.traceback == ""  # not logging at debug level: the caller gets no traceback
    [line] = failures_logged(log)
    assert line["level"] == "error"
    assert line["endpoint"] == "ep"
    assert line["error"] == "ValueError: boom"
    assert "Traceback (most recent call last)" in line["exception"]
    assert 'raise ValueError("boom")' in line["exception"]  # the handler's own frame
    await runner.close()


async def test_a_worker_logging_at_debug_level_sends_the_traceback_to_its_caller() -> None:
    log_to("debug")
    runner = RequestRunner("t")
    runner.add_endpoint("ep", _boom)
    frame = await _fail(runner, "k", 1)
    assert frame.traceback.startswith("Traceback (most recent call last)")
    assert "in _boom" in frame.traceback
    assert frame.traceback.rstrip().endswith("ValueError: boom")
    caller = remote_error(
        frame.kind, frame.message, address="tcp://w:1", endpoint="ep", traceback=frame.traceback
    )
    assert isinstance(caller, RemoteError)
    assert caller.remote_traceback == frame.traceback
    assert str(caller) == "handler raised ValueError: boom (ep at tcp://w:1)"
    await runner.close()


async def test_troupe_errors_raised_on_purpose_and_cancellations_are_not_logged() -> None:
    log = log_to("debug")
    release = asyncio.Event()

    async def busy(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        raise Overloaded("ep", 3)
        yield b""

    async def waits(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        await release.wait()
        yield b""

    runner = RequestRunner("t")
    runner.add_endpoint("busy", busy)
    runner.add_endpoint("waits", waits)
    frame = await _fail(runner, "k1", 1, "busy")
    assert frame.kind == "Overloaded"
    assert frame.traceback == ""
    sink = Sink()
    runner.dispatch("k2", Request(2, "waits", b""), sink)
    await eventually_async(lambda: runner.inflight == 1)
    assert runner.cancel("k2")
    await wait_idle(runner)
    await runner.close()
    assert failures_logged(log) == []


async def test_tracebacks_are_rate_limited_per_endpoint_then_counted_in_one_line() -> None:
    log = log_to("info")

    async def other(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        raise KeyError("k")
        yield b""

    runner = RequestRunner("t", tracebacks=TracebackBudget(burst=2, window=3600))
    runner.add_endpoint("ep", _boom)
    runner.add_endpoint("other", other)
    for n in range(5):
        frame = await _fail(runner, ("ep", n), n)
        assert frame.kind == "ValueError"  # every caller is told, logged or not
    await _fail(runner, "other", 9, "other")  # another endpoint has a budget of its own
    logged = failures_logged(log)
    assert [line["endpoint"] for line in logged] == ["ep", "ep", "other"]
    assert all("exception" in line for line in logged)
    await runner.close()  # the window has not ended: what was left out is said at shutdown
    [summary] = failures_logged(log)[3:]
    assert summary["event"] == "suppressed 3 more handler failure tracebacks"
    assert summary["endpoint"] == "ep"
    assert "exception" not in summary


async def test_suppressed_failures_are_counted_when_their_window_ends() -> None:
    log = log_to("info")
    runner = RequestRunner("t", tracebacks=TracebackBudget(burst=1, window=0.2))
    runner.add_endpoint("ep", _boom)
    for n in range(3):
        await _fail(runner, n, n)

    def summaries() -> list[dict[str, Any]]:
        return [line for line in failures_logged(log) if "exception" not in line]

    await eventually_async(lambda: len(summaries()) == 1, timeout=5)
    assert summaries()[0]["event"] == "suppressed 2 more handler failure tracebacks"
    await _fail(runner, 3, 3)  # a new window: logged with its traceback again
    assert len(failures_logged(log)) == 3
    await runner.close()
    assert len(failures_logged(log)) == 3  # nothing was left to count


def test_the_traceback_budget_counts_per_endpoint_and_window() -> None:
    budget = TracebackBudget(burst=2, window=10)
    assert [budget.admit("a", t) for t in (0, 1, 2, 3)] == [True, True, False, False]
    assert budget.admit("b", 4)
    assert budget.next_due() == 10
    assert budget.due(9.9) == []
    assert budget.due(10) == [("a", 2)]
    assert budget.due(10) == []  # handed back once
    assert budget.next_due() is None  # b suppressed nothing
    assert budget.admit("a", 11)  # a new window
    # A window that ended before due() ran is not lost.
    assert [budget.admit("c", t) for t in (0, 0, 0)] == [True, True, False]
    assert budget.admit("c", 30)
    assert budget.next_due() == 0.0
    assert budget.due(30) == [("c", 1)]
    assert budget.admit("c", 30.5)
    assert not budget.admit("c", 31)
    assert budget.flush() == [("c", 1)]
    assert budget.flush() == []
    for bad in ({"burst": 0}, {"window": 0}, {"burst": 1.5}):
        with pytest.raises(ValueError, match=r"burst|window"):
            TracebackBudget(**bad)  # type: ignore[arg-type]


def test_a_long_traceback_keeps_its_end() -> None:
    try:
        raise ValueError("x" * 20_000 + " at the bottom")
    except ValueError as exc:
        frame = error_frame(1, exc, with_traceback=True)
    assert len(frame.traceback) < 17_000
    assert frame.traceback.startswith("... (")
    assert frame.traceback.rstrip().endswith("x at the bottom")
    assert error_frame(1, ValueError("x")).traceback == ""


async def test_an_exception_that_cannot_be_shown_still_answers_its_caller() -> None:
    log = log_to("debug")

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        raise Unprintable
        yield b""

    runner = RequestRunner("t")
    runner.add_endpoint("ep", handler)
    frame = await _fail(runner, "k", 1)
    assert (frame.kind, frame.message) == ("Unprintable", "<Unprintable: str() failed>")
    assert "Unprintable" in frame.traceback
    [line] = failures_logged(log)
    assert line["error"] == "Unprintable: <Unprintable: str() failed>"
    await runner.close()
