"""A handler's failure: the error its caller gets, and the worker's log of it (tracebacks,
rate-limited per endpoint)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from troupe import RequestContext
from troupe.errors import Overloaded, RemoteError
from troupe.messages import Request
from troupe.testing import eventually_async
from troupe.transports import RequestRunner, remote_error
from troupe.transports._dispatch import error_frame
from troupe.transports._failures import TracebackBudget

from ._runner_helpers import (
    Sink,
    boom,
    fail,
    failures_logged,
    log_to,
    wait_idle,
)


@pytest.mark.parametrize("level", ["info", "error"])
async def test_a_handler_failure_is_logged_with_its_traceback_and_named_to_its_caller(
    level: str,
) -> None:
    log = log_to(level)
    runner = RequestRunner("t")
    runner.add_endpoint("ep", boom)
    frame = await fail(runner, "k", 1)
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
    runner.add_endpoint("ep", boom)
    frame = await fail(runner, "k", 1)
    assert frame.traceback.startswith("Traceback (most recent call last)")
    assert "in boom" in frame.traceback
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
    frame = await fail(runner, "k1", 1, "busy")
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
    runner.add_endpoint("ep", boom)
    runner.add_endpoint("other", other)
    for n in range(5):
        frame = await fail(runner, ("ep", n), n)
        assert frame.kind == "ValueError"  # every caller is told, logged or not
    await fail(runner, "other", 9, "other")  # another endpoint has a budget of its own
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
    runner.add_endpoint("ep", boom)
    for n in range(3):
        await fail(runner, n, n)

    def summaries() -> list[dict[str, Any]]:
        return [line for line in failures_logged(log) if "exception" not in line]

    await eventually_async(lambda: len(summaries()) == 1, timeout=5)
    assert summaries()[0]["event"] == "suppressed 2 more handler failure tracebacks"
    await fail(runner, 3, 3)  # a new window: logged with its traceback again
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
    frame = await fail(runner, "k", 1)
    assert (frame.kind, frame.message) == ("Unprintable", "<Unprintable: str() failed>")
    assert "Unprintable" in frame.traceback
    [line] = failures_logged(log)
    assert line["error"] == "Unprintable: <Unprintable: str() failed>"
    await runner.close()
