"""KvFollower on a durable (JetStream) event plane: replay instead of dumps, snapshots, fall-backs.

Workers publish through a real NATS server with JetStream (the ``nats_server`` fixture); the
follower's directory is in-process (:class:`FakeDirectory`), so every query a follower sends to
a worker is on record.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tests.kv._helpers import FakeDirectory, Lossy, rebuilt
from troupe import Config, Runtime
from troupe.config import DiscoveryConfig, NatsConfig, RequestPlaneConfig, TcpConfig
from troupe.discovery import MemoryKvServer
from troupe.errors import InvalidName, InvalidRequest, ProtocolError
from troupe.events import EventScope, NatsEventPlane, StreamLimits
from troupe.kv import (
    KV_EVENTS_TOPIC,
    FollowerSettings,
    KvCacheEvent,
    KvFollower,
    KvIndex,
    KvPublisher,
    KvView,
    Removed,
    Stored,
    StoredBlock,
    follow_kv_events,
)
from troupe.kv._replay import FollowerSnapshot, SnapshotWorker, decode_snapshot, encode_snapshot
from troupe.testing import NatsServer

A, B, C = "00000000000000aa", "00000000000000bb", "00000000000000cc"
PLANE = RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1", connect_timeout=0.5))
CONFIG = Config(discovery=DiscoveryConfig(kv_store="memory"), request_plane=PLANE)
# Replay grace: long where a test expects no dump (a loaded machine may be slow to replay),
# short where it waits for the grace to end.
FAST = FollowerSettings(retry_min=0.01, retry_max=0.05, replay_grace=10.0)
SHORT_GRACE = FollowerSettings(retry_min=0.01, retry_max=0.05, replay_grace=0.5)


@dataclass
class Durable:
    """Workers publishing KV events into a JetStream stream of a namespace of the test's own."""

    server: NatsServer
    scope: EventScope = field(
        default_factory=lambda: EventScope(f"t{uuid.uuid4().hex[:10]}", "backend")
    )
    directory: FakeDirectory = field(default_factory=FakeDirectory)
    publishers: dict[str, KvPublisher] = field(default_factory=dict)
    planes: list[NatsEventPlane] = field(default_factory=list)
    followers: list[KvFollower] = field(default_factory=list)

    async def plane(self, limits: StreamLimits | None = None) -> NatsEventPlane:
        plane = NatsEventPlane(NatsConfig(server=self.server.url), durable=True, limits=limits)
        await plane.connect()
        self.planes.append(plane)
        return plane

    async def worker(
        self,
        worker: str,
        *,
        join: bool = True,
        drop: set[int] = frozenset(),  # type: ignore[assignment]
        plane: NatsEventPlane | None = None,
    ) -> KvPublisher:
        plane = plane if plane is not None else await self.plane()
        inner = await plane.publisher(self.scope, KV_EVENTS_TOPIC, worker)
        publisher = KvPublisher(Lossy(inner, set(drop)), block_size=4)
        publisher.start()
        self.publishers[worker] = publisher
        if join:
            self.directory.join(worker, publisher.indexer)
        return publisher

    async def follower(self, settings: FollowerSettings = FAST) -> tuple[KvFollower, KvView]:
        view = KvView()
        follower = KvFollower(
            await self.plane(), self.scope, self.directory, view, settings=settings
        )
        await follower.start()
        self.followers.append(follower)
        return follower, view

    async def synced(self, follower: KvFollower, *workers: str) -> None:
        """Wait until the view holds exactly what each worker's dump rebuilds."""
        view = follower.sink
        assert isinstance(view, KvView)
        for worker in workers:
            await self.publishers[worker].flush(timeout=5)

        def done() -> bool:
            return all(
                follower.synced(w)
                and follower.last_event_id(w) == self.publishers[w].last_event_id
                and view.blocks(w) == rebuilt(self.publishers[w])
                for w in workers
            )

        assert await follower.wait_for(done, timeout=10), view.snapshot()

    def dumps_asked(self) -> list[str]:
        return [worker for worker, request in self.directory.requests if request.get("dump")]

    async def close(self) -> None:
        for follower in self.followers:
            await follower.close()
        for publisher in self.publishers.values():
            await publisher.close()
        for plane in self.planes:
            await plane.close()


@pytest.fixture
async def durable(nats_server: NatsServer) -> AsyncIterator[Durable]:
    made = Durable(nats_server)
    try:
        yield made
    finally:
        await made.close()


def fill(publisher: KvPublisher, count: int, salt: int) -> list[int]:
    """Store ``count`` two-block prompts (one event each), evict one block; return the hashes."""
    hashes: list[int] = []
    for n in range(count):
        hashes += publisher.stored(token_ids=[salt, n, n, n, salt, 1, 2, 3])
    publisher.removed(hashes[:1])
    return hashes


async def test_a_late_follower_replays_the_stream_and_asks_no_worker(durable: Durable) -> None:
    a = await durable.worker(A)
    b = await durable.worker(B)
    fill(a, 30, salt=1)  # events 1 .. 31
    fill(b, 12, salt=2)
    b.cleared()
    fill(b, 3, salt=3)
    follower, view = await durable.follower()  # nobody followed while they published
    assert follower.replaying
    await durable.synced(follower, A, B)
    assert durable.directory.requests == []  # the stream told it all: no dump, no range
    totals = follower.counters()
    assert (totals.dumps, totals.gaps, totals.unknown) == (0, 0, 0)
    assert totals.applied == a.last_event_id + b.last_event_id
    fill(a, 2, salt=4)  # and it goes on live
    await durable.synced(follower, A, B)
    assert view.workers() == {A, B}


async def test_a_gap_in_the_replayed_history_is_recovered_from_the_worker(
    durable: Durable,
) -> None:
    a = await durable.worker(A, drop={4})  # event 4 never reached the stream
    fill(a, 8, salt=5)
    follower, _ = await durable.follower()
    await durable.synced(follower, A)
    assert durable.directory.requests == [(A, {"first": 4, "last": 4})]
    assert (follower.counters(A).gaps, follower.counters(A).recovered) == (1, 1)


async def test_replayed_publishers_not_in_discovery_are_kept_until_listed_or_gone(
    durable: Durable,
) -> None:
    gone = await durable.worker(A, join=False)  # published, then died: never listed again
    late = await durable.worker(B, join=False)  # listed only after the replay reached it
    fill(gone, 5, salt=6)
    fill(late, 5, salt=7)
    await gone.flush(timeout=5)
    await late.flush(timeout=5)
    # B must be listed within the grace (at once, below); A is forgotten when it runs out.
    follower, view = await durable.follower(FollowerSettings(retry_min=0.01, replay_grace=2.0))
    assert await follower.wait_for(lambda: view.workers() == {A, B}, timeout=10)
    assert follower.workers() == []  # discovery lists neither
    durable.directory.join(B, late.indexer)
    await durable.synced(follower, B)
    assert await follower.wait_for(lambda: view.workers() == {B}, timeout=10)  # A went silent
    assert durable.directory.requests == []  # B's history came from the stream
    assert follower.workers() == [B]


async def test_a_listed_worker_without_a_replayed_history_is_asked_for_a_dump(
    durable: Durable,
) -> None:
    """A worker whose events never reached the stream (a plane of another kind, say) is not
    assumed empty: after ``replay_grace`` without its history, it is asked."""
    a = await durable.worker(A, drop=set(range(1, 6)))
    fill(a, 4, salt=8)  # events 1 .. 5, none in the stream
    follower, _ = await durable.follower(SHORT_GRACE)
    await durable.synced(follower, A)
    assert durable.dumps_asked() == [A]


async def test_a_snapshot_is_saved_past_the_threshold_and_a_new_follower_starts_from_it(
    durable: Durable,
) -> None:
    settings = FollowerSettings(retry_min=0.01, replay_grace=10.0, snapshot_threshold=10)
    a = await durable.worker(A)
    b = await durable.worker(B)
    fill(a, 20, salt=9)
    fill(b, 5, salt=10)
    second, _ = await durable.follower(settings)
    await durable.synced(second, A, B)
    assert await second.wait_for(lambda: second.counters().snapshots >= 1, timeout=10)
    loaded = await durable.planes[0].load_snapshot(durable.scope, settings.snapshot_name)
    assert loaded is not None
    snapshot, sequence = decode_snapshot(loaded[0]), loaded[1]
    assert sequence > 0
    assert {w.worker for w in snapshot.workers} <= {A, B}
    await second.close()  # saves no more: the snapshot stays where it is
    fill(a, 3, salt=11)  # after the snapshot
    third, view = await durable.follower(settings)
    await durable.synced(third, A, B)
    totals = third.counters()
    assert totals.restored == len(snapshot.workers) >= 1
    assert totals.applied < a.last_event_id + b.last_event_id  # only what came after it
    assert totals.dumps == 0
    assert durable.directory.requests == []
    assert view.workers() == {A, B}


async def test_a_stream_that_lost_its_first_events_falls_back_to_worker_dumps(
    durable: Durable,
) -> None:
    small = await durable.plane(StreamLimits(max_msgs=5))  # makes the namespace's stream
    a = await durable.worker(A, plane=small)
    fill(a, 12, salt=12)  # the stream keeps the last 5 events of 13
    await a.flush(timeout=5)
    follower, _ = await durable.follower()
    assert not follower.replaying  # ReplayUnavailable: the history would be cut
    await durable.synced(follower, A)
    assert durable.dumps_asked() == [A]


async def test_an_unreadable_snapshot_is_skipped_and_the_stream_replayed(
    durable: Durable,
) -> None:
    a = await durable.worker(A)
    fill(a, 4, salt=13)
    plane = await durable.plane()
    await plane.save_snapshot(durable.scope, FAST.snapshot_name, b"not a snapshot", sequence=1)
    follower, _ = await durable.follower()
    assert follower.replaying
    await durable.synced(follower, A)
    assert follower.counters().restored == 0
    assert durable.directory.requests == []


def test_a_views_export_rebuilds_it_and_the_snapshot_codec_round_trips() -> None:
    view = KvView()
    view.apply(A, KvCacheEvent(1, Stored(None, [StoredBlock(1), StoredBlock(2, 20)])))
    view.apply(A, KvCacheEvent(2, Stored(2, [StoredBlock(3)]), dp_rank=1))
    view.apply(A, KvCacheEvent(3, Removed([1])))
    events = view.export(A)
    rebuilt_view = KvView()
    for event in events:
        rebuilt_view.apply(A, event)
    assert rebuilt_view.snapshot() == view.snapshot() == {A: {2, 3}}
    assert rebuilt_view.blocks(A, dp_rank=1) == {3}
    assert view.export(B) == []
    snapshot = FollowerSnapshot([SnapshotWorker(A, 3, events)])
    assert decode_snapshot(encode_snapshot(snapshot)) == snapshot
    with pytest.raises(ProtocolError, match="not a KV follower snapshot"):
        decode_snapshot(b"garbage")
    index = KvIndex()
    index.apply(A, KvCacheEvent(1, Stored(None, [StoredBlock(5), StoredBlock(6)])))
    index.apply(A, KvCacheEvent(2, Removed([5])))
    again = KvIndex()
    for event in index.export(A):
        again.apply(A, event)
    assert again.find_matches([6]) == index.find_matches([6]) == {A: 1}
    assert index.export(B) == []
    with pytest.raises(InvalidRequest, match="snapshot_threshold"):
        FollowerSettings(snapshot_threshold=-1)
    with pytest.raises(InvalidName):
        FollowerSettings(snapshot_name="Not.A.Name")


def test_between_runtimes_a_late_router_replays_what_a_worker_published(
    nats_server: NatsServer,
) -> None:
    """Real runtimes: the worker's query endpoint on the tcp plane, discovery in memory; the
    router starts after the worker published, and rebuilds its view from the stream alone."""
    endpoint = f"t{uuid.uuid4().hex[:10]}.backend.generate"
    kv = MemoryKvServer()
    planes: list[tuple[Runtime, NatsEventPlane]] = []

    def durable_plane(rt: Runtime) -> NatsEventPlane:
        plane = NatsEventPlane(NatsConfig(server=nats_server.url), durable=True)
        rt.io.run(plane.connect(), timeout=10)
        planes.append((rt, plane))
        return plane

    with (
        Runtime(CONFIG, handle_signals=False, memory_server=kv) as worker,
        Runtime(CONFIG, handle_signals=False, memory_server=kv) as router,
    ):
        try:
            publisher = worker.kv_events(endpoint, block_size=4, plane=durable_plane(worker))
            fill(publisher, 10, salt=14)
            worker.io.run(publisher.flush(timeout=5), timeout=10)
            follower = follow_kv_events(
                router, endpoint, plane=durable_plane(router), settings=FAST
            )
            view = follower.sink
            assert isinstance(view, KvView)
            me = worker.instance_id

            def caught_up() -> bool:
                return (
                    follower.synced(me)
                    and follower.last_event_id(me) == publisher.last_event_id
                    and view.blocks(me) == rebuilt(publisher)
                )

            assert router.io.run(follower.wait_for(caught_up, timeout=10), timeout=15)
            assert follower.replaying
            assert follower.workers() == [me]
            assert (follower.counters().dumps, follower.counters().fetch_failures) == (0, 0)
        finally:
            for rt, plane in reversed(planes):
                rt.io.run(plane.close(), timeout=5)
