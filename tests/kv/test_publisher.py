"""KvPublisher: numbering, the local indexer, ordered publication from any thread, losses."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import msgspec
import pytest

from troupe.errors import InvalidRequest, TransportError
from troupe.events import (
    Envelope,
    EventPublisher,
    EventScope,
    EventSubscription,
    MemoryEventPlane,
    decode_payload_as,
)
from troupe.kv import (
    KV_EVENTS_TOPIC,
    Cleared,
    KvCacheEvent,
    KvPublisher,
    Removed,
    Stored,
    StoredBlock,
    block_hashes,
    local_block_hashes,
)

SCOPE = EventScope("ns", "comp")
WORKER = "00000000000000aa"


async def received(subscription: EventSubscription, count: int) -> list[KvCacheEvent]:
    """The next ``count`` events of ``subscription`` (within 5 s)."""
    events: list[KvCacheEvent] = []
    iterator = aiter(subscription)
    async with asyncio.timeout(5):
        while len(events) < count:
            envelope = await anext(iterator)
            assert envelope.publisher_id == WORKER
            assert envelope.topic == KV_EVENTS_TOPIC
            events.append(decode_payload_as(envelope.payload, KvCacheEvent))
    return events


@pytest.fixture
async def plane() -> AsyncIterator[MemoryEventPlane]:
    plane = MemoryEventPlane()
    yield plane
    await plane.close()


async def test_events_are_numbered_recorded_and_published_in_order(
    plane: MemoryEventPlane,
) -> None:
    subscription = await plane.subscribe(SCOPE, KV_EVENTS_TOPIC)
    publisher = await KvPublisher.open(plane, SCOPE, WORKER, block_size=4)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    hashes = publisher.stored(token_ids=tokens)
    assert hashes == block_hashes(tokens, 4)
    more = publisher.stored(token_ids=[10, 11, 12, 13], parent_hash=hashes[-1])
    assert more == block_hashes([*tokens[:8], 10, 11, 12, 13], 4)[2:]
    publisher.removed([hashes[1], more[0]])
    publisher.cleared(dp_rank=1)
    events = await received(subscription, 4)
    assert [e.event_id for e in events] == [1, 2, 3, 4]
    local = local_block_hashes(tokens, 4)
    assert events[0].data == Stored(
        None, [StoredBlock(h, t) for h, t in zip(hashes, local, strict=True)]
    )
    assert events[1].data.parent_hash == hashes[-1]  # type: ignore[union-attr]
    assert events[2].data == Removed([hashes[1], more[0]])
    assert (events[3].data, events[3].dp_rank) == (Cleared(), 1)
    assert publisher.indexer.blocks() == {hashes[0]}
    assert publisher.last_event_id == 4
    assert publisher.metadata == {"kv_block_size": 4}
    await publisher.close()


async def test_precomputed_hashes_as_a_mock_engine_gives_them(plane: MemoryEventPlane) -> None:
    subscription = await plane.subscribe(SCOPE, KV_EVENTS_TOPIC)
    publisher = await KvPublisher.open(plane, SCOPE, WORKER)
    assert publisher.stored([11, 12], 10) == [11, 12]  # (block_hashes, parent_hash)
    blocks = [StoredBlock(13, 3), StoredBlock(14, 4)]
    assert publisher.stored(parent_hash=12, blocks=blocks) == [13, 14]
    first, second = await received(subscription, 2)
    assert first.data == Stored(10, [StoredBlock(11), StoredBlock(12)])
    assert second.data == Stored(12, blocks)
    await publisher.close()


async def test_nothing_is_published_for_no_block(plane: MemoryEventPlane) -> None:
    publisher = await KvPublisher.open(plane, SCOPE, WORKER, block_size=4)
    assert publisher.stored(token_ids=[1, 2, 3]) == []
    assert publisher.stored([]) == []
    publisher.removed([])
    await publisher.flush(timeout=5)
    assert (publisher.last_event_id, publisher.published) == (0, 0)
    await publisher.close()


async def test_bad_arguments_are_refused(plane: MemoryEventPlane) -> None:
    publisher = await KvPublisher.open(plane, SCOPE, WORKER)
    with pytest.raises(InvalidRequest, match="one of"):
        publisher.stored()
    with pytest.raises(InvalidRequest, match="one of"):
        publisher.stored([1], token_ids=[1] * 16)
    with pytest.raises(InvalidRequest, match="one of"):
        publisher.stored([1], blocks=[StoredBlock(1)])
    with pytest.raises(InvalidRequest, match="tokens_hashes"):
        publisher.stored([1, 2], tokens_hashes=[3])
    with pytest.raises(InvalidRequest, match="block_size"):
        await KvPublisher.open(plane, SCOPE, WORKER, block_size=0)
    assert publisher.last_event_id == 0
    await publisher.close()


async def test_calls_from_many_threads_publish_every_event_once_in_order(
    plane: MemoryEventPlane,
) -> None:
    subscription = await plane.subscribe(SCOPE, KV_EVENTS_TOPIC)
    publisher = await KvPublisher.open(plane, SCOPE, WORKER, block_size=2)

    def engine(n: int) -> None:
        for i in range(250):
            publisher.stored(token_ids=[n, i])

    threads = [threading.Thread(target=engine, args=(n,), name=f"engine-{n}") for n in range(4)]
    for thread in threads:
        thread.start()
    await asyncio.to_thread(lambda: [t.join() for t in threads])
    await publisher.flush(timeout=5)
    events = await received(subscription, 1000)
    assert [e.event_id for e in events] == list(range(1, 1001))
    assert publisher.published == 1000
    assert len(publisher.indexer) == 1000
    await publisher.close()


class _Flaky(EventPublisher):
    """Refuses the events whose ids are in ``refuse``; records the rest."""

    def __init__(self, refuse: set[int]) -> None:
        super().__init__(SCOPE, KV_EVENTS_TOPIC, WORKER)
        self.refuse = refuse
        self.sent: list[int] = []
        self.closed = False

    async def publish(self, event: msgspec.Struct | bytes) -> Envelope:
        assert isinstance(event, KvCacheEvent)
        if event.event_id in self.refuse:
            raise TransportError("plane down")
        self.sent.append(event.event_id)
        return self._next(event)

    async def close(self) -> None:
        self.closed = True


async def test_an_event_the_plane_refuses_is_counted_and_kept_locally() -> None:
    flaky = _Flaky({2})
    publisher = KvPublisher(flaky, block_size=1)
    publisher.start()
    for token in (1, 2, 3):
        publisher.stored(token_ids=[token])
    await publisher.flush(timeout=5)
    assert flaky.sent == [1, 3]
    assert (publisher.published, publisher.dropped) == (2, 1)
    assert len(publisher.indexer) == 3  # a follower recovers event 2 from here
    await publisher.close()
    assert flaky.closed


async def test_events_past_max_pending_are_dropped_not_queued() -> None:
    flaky = _Flaky(set())
    publisher = KvPublisher(flaky, block_size=1, max_pending=2)  # not started: nothing drains
    for token in range(5):
        publisher.stored(token_ids=[token])
    assert publisher.dropped == 3
    publisher.start()
    await publisher.flush(timeout=5)
    assert flaky.sent == [1, 2]
    assert publisher.last_event_id == 5
    await publisher.close()


async def test_close_publishes_what_is_queued_then_only_records() -> None:
    flaky = _Flaky(set())
    publisher = KvPublisher(flaky, block_size=1)
    publisher.start()
    publisher.stored(token_ids=[1])
    publisher.stored(token_ids=[2])
    await publisher.close()
    assert flaky.sent == [1, 2]
    assert flaky.closed
    publisher.stored(token_ids=[3])  # a draining request: recorded, not published
    assert publisher.last_event_id == 3
    assert flaky.sent == [1, 2]
    assert publisher.dropped == 1
