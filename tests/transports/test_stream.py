"""ResponseStream's waiting limits under a TimeoutSweep: on time, and forgotten when answered."""

from __future__ import annotations

import asyncio

import pytest

from troupe.errors import RequestTimeout
from troupe.messages import Chunk
from troupe.testing import eventually_async
from troupe.transports import ResponseStream
from troupe.transports._base import TimeoutSweep


def _stream(sweep: TimeoutSweep, cancels: list[int], timeout: float) -> ResponseStream:
    return ResponseStream(
        1,
        address="test://worker",
        endpoint="ep",
        cancel=lambda: cancels.append(1),
        request_timeout=timeout,
        sweep=sweep,
    )


async def test_a_far_limit_fires_on_time_through_the_sweep() -> None:
    loop = asyncio.get_running_loop()
    sweep = TimeoutSweep(loop, tick=0.05)
    cancels: list[int] = []
    stream = _stream(sweep, cancels, 0.3)  # six ticks away: waits in the sweep first
    started = loop.time()
    with pytest.raises(RequestTimeout):
        await anext(stream)
    waited = loop.time() - started
    assert 0.29 <= waited < 2.0
    assert cancels == [1]
    assert sweep._waiting == {}
    sweep.close()


async def test_an_answered_wait_leaves_the_sweep_and_the_sweep_stops() -> None:
    loop = asyncio.get_running_loop()
    sweep = TimeoutSweep(loop, tick=0.05)
    cancels: list[int] = []
    stream = _stream(sweep, cancels, 10.0)
    loop.call_later(0.02, stream.deliver, Chunk(1, b"x", end=True))
    assert await anext(stream) == b"x"
    assert sweep._waiting == {}
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    # The sweep armed for the wait runs once, finds nothing waiting and does not re-arm.
    await eventually_async(lambda: sweep._timer is None, timeout=2.0, what="the sweep stopped")
    assert cancels == []
    sweep.close()


async def test_a_closed_sweep_hands_waiting_streams_their_own_timers() -> None:
    loop = asyncio.get_running_loop()
    sweep = TimeoutSweep(loop, tick=0.5)
    cancels: list[int] = []
    stream = _stream(sweep, cancels, 0.8)
    waiting = asyncio.ensure_future(anext(stream))
    await eventually_async(lambda: stream in sweep._waiting, what="the stream waits in the sweep")
    sweep.close()
    assert sweep._waiting == {}
    assert stream._timer is not None
    with pytest.raises(RequestTimeout):
        await asyncio.wait_for(waiting, 5)
    assert cancels == [1]


async def test_close_is_the_synchronous_aclose() -> None:
    cancels: list[int] = []
    stream = _stream(TimeoutSweep(asyncio.get_running_loop()), cancels, 10.0)
    stream.close()
    stream.close()
    assert stream.finished
    assert cancels == [1]
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
