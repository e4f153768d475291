"""KvFollower against a directory without discovery: order, gaps, dumps, strangers, garbage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.kv._helpers import FakeDirectory, Lossy, rebuilt
from troupe.errors import InvalidRequest
from troupe.events import EventScope, MemoryEventPlane, decode_payload_as, encode_event
from troupe.kv import (
    KV_EVENTS_TOPIC,
    FollowerSettings,
    KvCacheEvent,
    KvFollower,
    KvPublisher,
    KvView,
    Stored,
    StoredBlock,
)

SCOPE = EventScope("ns", "comp")
A, B = "00000000000000aa", "00000000000000bb"


@dataclass
class Setup:
    plane: MemoryEventPlane
    directory: FakeDirectory
    view: KvView
    follower: KvFollower
    publishers: dict[str, KvPublisher] = field(default_factory=dict)

    async def worker(self, worker: str, *, drop: set[int] = frozenset(), ring: int = 1024,
                     join: bool = True) -> KvPublisher:  # fmt: skip
        inner = await self.plane.publisher(SCOPE, KV_EVENTS_TOPIC, worker)
        publisher = KvPublisher(Lossy(inner, set(drop)), block_size=4, ring_size=ring)
        publisher.start()
        self.publishers[worker] = publisher
        if join:
            self.directory.join(worker, publisher.indexer)
        return publisher

    async def synced(self, *workers: str) -> None:
        """Wait until the view holds exactly what each worker's dump rebuilds."""

        def done() -> bool:
            return all(
                self.follower.synced(w)
                and self.follower.last_event_id(w) == self.publishers[w].last_event_id
                and self.view.blocks(w) == rebuilt(self.publishers[w])
                for w in workers
            )

        for publisher in self.publishers.values():
            await publisher.flush(timeout=5)
        assert await self.follower.wait_for(done, timeout=5), self.view.snapshot()


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    plane = MemoryEventPlane()
    directory = FakeDirectory()
    view = KvView()
    settings = FollowerSettings(retry_min=0.01, retry_max=0.05, buffer_limit=50)
    follower = KvFollower(plane, SCOPE, directory, view, settings=settings)
    await follower.start()
    s = Setup(plane, directory, view, follower)
    yield s
    await follower.close()
    for publisher in s.publishers.values():
        await publisher.close()
    await plane.close()


def store(publisher: KvPublisher, *tokens: int) -> list[int]:
    return publisher.stored(token_ids=list(tokens))


async def test_two_workers_each_followed_in_order(setup: Setup) -> None:
    a, b = await setup.worker(A), await setup.worker(B)
    await setup.synced(A, B)
    for n in range(20):
        store(a, n, n, n, n, 1, 2, 3, 4)
        store(b, n, 9, 9, 9)
    hashes = store(a, 100, 101, 102, 103)
    a.removed(hashes)
    b.cleared()
    store(b, 7, 7, 7, 7)
    await setup.synced(A, B)
    assert setup.view.workers() == {A, B}
    counters = setup.follower.counters(A)
    assert (counters.applied, counters.gaps, counters.dumps) == (22, 0, 1)
    assert setup.follower.block_size(A) == 4
    assert setup.follower.workers() == [A, B]


async def test_a_dropped_event_is_a_gap_recovered_from_the_worker(setup: Setup) -> None:
    a = await setup.worker(A, drop={3, 7})
    await setup.synced(A)
    for n in range(10):
        store(a, n, 0, 0, 0)
    await setup.synced(A)
    counters = setup.follower.counters(A)
    assert (counters.gaps, counters.recovered) == (2, 2)
    assert counters.dumps == 1  # only the first fetch: the ring still held the ranges
    assert (A, {"first": 3, "last": 3}) in setup.directory.requests
    assert (A, {"first": 7, "last": 7}) in setup.directory.requests


async def test_a_gap_the_ring_no_longer_holds_falls_back_to_a_dump(setup: Setup) -> None:
    a = await setup.worker(A, drop={2, 3, 4, 5, 6}, ring=2)
    await setup.synced(A)
    for n in range(8):
        store(a, n, 1, 1, 1)
    await setup.synced(A)
    counters = setup.follower.counters(A)
    assert (counters.gaps, counters.recovered, counters.dumps) == (1, 1, 2)


async def test_a_worker_already_holding_blocks_is_fetched_whole(setup: Setup) -> None:
    a = await setup.worker(A, join=False)
    for n in range(30):
        store(a, n, 5, 5, 5, 6, 6, 6, 6)
    await a.flush(timeout=5)
    assert setup.follower.counters().unknown == 30  # not in discovery: dropped
    setup.directory.join(A, a.indexer)
    await setup.synced(A)
    assert len(setup.view.blocks(A)) == 60
    assert setup.follower.counters(A).dumps == 1


async def test_a_worker_that_leaves_is_forgotten_at_once(setup: Setup) -> None:
    a, b = await setup.worker(A), await setup.worker(B)
    store(a, 1, 2, 3, 4)
    store(b, 1, 2, 3, 4)
    await setup.synced(A, B)
    setup.directory.leave(A)
    assert await setup.follower.wait_for(lambda: A not in setup.follower.workers(), timeout=5)
    assert setup.view.workers() == {B}
    store(a, 5, 6, 7, 8)  # events of a worker that left: a stranger's
    await a.flush(timeout=5)
    assert await setup.follower.wait_for(lambda: setup.follower.counters().unknown == 1, 5)
    assert setup.view.workers() == {B}


async def test_malformed_payloads_are_counted_and_the_follower_keeps_going(
    setup: Setup,
) -> None:
    a = await setup.worker(A)
    store(a, 1, 1, 1, 1)
    await setup.synced(A)
    raw = await setup.plane.publisher(SCOPE, KV_EVENTS_TOPIC, A)
    await raw.publish(b"\xc1 not msgpack")
    await raw.publish(encode_event(Stored(None, [])))  # msgpack, but not a KvCacheEvent
    store(a, 2, 2, 2, 2)
    await setup.synced(A)
    counters = setup.follower.counters(A)
    assert counters.malformed == 2
    assert counters.applied == 1


async def test_garbage_that_is_not_an_envelope_is_counted_in_the_totals(setup: Setup) -> None:
    a = await setup.worker(A)
    await setup.synced(A)
    for subscription in setup.plane.hub.subscribers(SCOPE, KV_EVENTS_TOPIC):
        subscription.deliver(b"garbage")
    store(a, 3, 3, 3, 3)
    await setup.synced(A)
    assert setup.follower.counters().malformed == 1


async def test_a_repeated_event_is_a_duplicate(setup: Setup) -> None:
    a = await setup.worker(A)
    store(a, 1, 1, 1, 1)
    await setup.synced(A)
    before = setup.follower.counters(A).duplicates  # event 1 may have come after the dump
    raw = await setup.plane.publisher(SCOPE, KV_EVENTS_TOPIC, A)
    first = a.indexer.events_between(1, 1)
    assert first is not None
    await raw.publish(encode_event(first[0]))
    store(a, 2, 2, 2, 2)
    await setup.synced(A)
    assert setup.follower.counters(A).duplicates == before + 1


async def test_events_during_a_fetch_wait_and_follow_its_answer(setup: Setup) -> None:
    setup.directory.gate = asyncio.Event()
    a = await setup.worker(A)
    for n in range(10):
        store(a, n, 4, 4, 4)
    await a.flush(timeout=5)
    await asyncio.sleep(0)  # the follower reads what was published: it is all held
    assert setup.view.blocks(A) == set()
    setup.directory.gate.set()
    await setup.synced(A)
    counters = setup.follower.counters(A)
    assert counters.superseded + counters.applied == 10  # covered by the dump, or after it


async def test_a_buffer_that_overflows_during_a_fetch_ends_in_a_dump(setup: Setup) -> None:
    setup.directory.gate = asyncio.Event()
    a = await setup.worker(A)
    for n in range(80):  # the buffer holds 50
        store(a, n, 8, 8, 8)
    await a.flush(timeout=5)
    setup.directory.gate.set()
    await setup.synced(A)
    assert setup.follower.counters(A).dumps == 2


async def test_a_failed_query_is_retried(setup: Setup) -> None:
    setup.directory.fail = 2
    a = await setup.worker(A)
    store(a, 1, 2, 3, 4)
    await setup.synced(A)
    assert setup.follower.counters(A).fetch_failures == 2


async def test_a_wrong_range_answer_falls_back_to_a_dump(setup: Setup) -> None:
    a = await setup.worker(A, drop={2})
    await setup.synced(A)
    store(a, 1, 1, 1, 1)
    # The worker's ring "forgets" event 2 after answering badly: simulate with a stale copy.
    original = setup.directory.query

    async def skewed(worker: str, request: dict[str, object]) -> object:
        answer = await original(worker, request)
        if request.get("first") == 2:
            return type(answer)(last_event_id=answer.last_event_id, dump=False, events=[])
        return answer

    setup.directory.query = skewed  # type: ignore[method-assign]
    store(a, 2, 2, 2, 2)
    store(a, 3, 3, 3, 3)
    await setup.synced(A)
    assert setup.follower.counters(A).dumps == 2


def test_settings_are_checked() -> None:
    with pytest.raises(InvalidRequest, match="fetch_timeout"):
        FollowerSettings(fetch_timeout=0)
    with pytest.raises(InvalidRequest, match="buffer_limit"):
        FollowerSettings(buffer_limit=0)


def test_stored_block_without_a_local_hash_round_trips() -> None:
    event = KvCacheEvent(1, Stored(None, [StoredBlock(5)]))
    assert decode_payload_as(encode_event(event), KvCacheEvent) == event
