"""MemoryEventPlane across event loops: planes on one hub, each on its own I/O loop thread.

Several runtimes in one process each run an I/O loop; memory planes built on one hub must hand
every envelope to the subscriber's own loop (an asyncio queue is not thread-safe).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from troupe._support._ioloop import IOLoop
from troupe.events import (
    Envelope,
    EventScope,
    EventSubscription,
    MemoryEventPlane,
    decode_payload_as,
)

from ._helpers import Tick

SCOPE = EventScope("ns", "worker")


def _debug_loop(name: str) -> IOLoop:
    """An asyncio loop in debug mode: a call from another thread raises instead of going
    unnoticed until something else wakes the loop."""
    io = IOLoop(name, use_uvloop=False)
    io.start()
    io.loop.set_debug(True)
    return io


@pytest.fixture
def loops() -> Iterator[tuple[IOLoop, IOLoop]]:
    publisher, subscriber = _debug_loop("test-publisher"), _debug_loop("test-subscriber")
    try:
        yield publisher, subscriber
    finally:
        publisher.stop()
        subscriber.stop()


def decode_ticks(envelopes: list[Envelope]) -> list[int]:
    return [decode_payload_as(e.payload, Tick).n for e in envelopes]


async def _read(subscription: EventSubscription, count: int) -> list[Envelope]:
    got: list[Envelope] = []
    async with asyncio.timeout(5):
        async for envelope in subscription:
            got.append(envelope)
            if len(got) == count:
                break
    return got


def test_a_publisher_on_another_loop_wakes_the_subscriber(loops: tuple[IOLoop, IOLoop]) -> None:
    pub_loop, sub_loop = loops
    hub = MemoryEventPlane.Hub()
    pub_plane, sub_plane = MemoryEventPlane(hub), MemoryEventPlane(hub)
    subscription = sub_loop.run(sub_plane.subscribe(SCOPE, "ticks"), timeout=5)
    reading = sub_loop.submit(_read(subscription, 50))
    publisher = pub_loop.run(pub_plane.publisher(SCOPE, "ticks", "00000000000000aa"), timeout=5)

    async def publish() -> None:
        for n in range(50):
            await publisher.publish(Tick(n))

    pub_loop.run(publish(), timeout=5)
    got = reading.result(timeout=10)  # the subscriber's loop was woken for each envelope
    assert decode_ticks(got) == list(range(50))
    assert [e.sequence for e in got] == list(range(1, 51))
    assert sub_plane.stats()["ns.worker.ticks"]["received"] == 50
    assert pub_plane.stats()["ns.worker.ticks"]["published"] == 50
    sub_loop.run(sub_plane.close(), timeout=5)


def test_closing_from_its_loop_ends_iteration_and_later_deliveries_are_dropped(
    loops: tuple[IOLoop, IOLoop],
) -> None:
    pub_loop, sub_loop = loops
    hub = MemoryEventPlane.Hub()
    pub_plane, sub_plane = MemoryEventPlane(hub), MemoryEventPlane(hub)
    subscription = sub_loop.run(sub_plane.subscribe(SCOPE, "ticks"), timeout=5)

    async def drain() -> list[Envelope]:
        return [envelope async for envelope in subscription]

    reading = sub_loop.submit(drain())
    publisher = pub_loop.run(pub_plane.publisher(SCOPE, "ticks", "00000000000000aa"), timeout=5)
    pub_loop.run(publisher.publish(Tick(1)), timeout=5)
    sub_loop.run(sub_plane.close(), timeout=5)
    assert hub.subscribers(SCOPE, "ticks") == []
    pub_loop.run(publisher.publish(Tick(2)), timeout=5)  # nobody subscribes: goes nowhere
    assert decode_ticks(reading.result(timeout=5)) == [1]  # queued before the close, in order


def test_a_delivery_to_a_closed_loop_is_dropped_quietly() -> None:
    hub = MemoryEventPlane.Hub()
    sub_loop = _debug_loop("test-subscriber")
    subscription = sub_loop.run(MemoryEventPlane(hub).subscribe(SCOPE, "ticks"), timeout=5)
    sub_loop.stop()  # the subscriber's runtime is gone without closing its plane

    async def publish() -> Envelope:
        publisher = await MemoryEventPlane(hub).publisher(SCOPE, "ticks", "00000000000000aa")
        return await publisher.publish(Tick(1))

    assert asyncio.run(publish()).sequence == 1
    assert subscription.received == 0
