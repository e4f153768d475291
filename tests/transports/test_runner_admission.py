"""The RequestRunner's admission: in-flight limits per worker and per caller, refused before
any task is made, and a bounded backlog of refusals."""

from __future__ import annotations

import asyncio
import time

import pytest

from troupe.errors import ConfigError
from troupe.messages import Error, Reply, Request
from troupe.testing import eventually_async
from troupe.transports import RequestRunner

from ._runner_helpers import (
    Held,
    Sink,
    wait_idle,
)


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
