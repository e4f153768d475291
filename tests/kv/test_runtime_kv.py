"""KV events between real runtimes: the query endpoint on the request plane, recovery through it.

Workers and the router side are separate :class:`~troupe.Runtime` objects sharing one memory
discovery server and one in-process event plane; queries travel over the TCP request plane.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

from tests.kv._helpers import Lossy, rebuilt
from troupe import Config, Runtime
from troupe.config import (
    DiscoveryConfig,
    EventPlaneConfig,
    NatsConfig,
    RequestPlaneConfig,
    TcpConfig,
)
from troupe.discovery import MemoryKvServer
from troupe.errors import ConfigError, ConnectionLost, RemoteError
from troupe.events import (
    EventPublisher,
    EventScope,
    MemoryEventPlane,
    NatsEventPlane,
    ZmqEventPlane,
)
from troupe.kv import (
    KvFollower,
    KvPublisher,
    KvQueryAnswer,
    KvView,
    follow_kv_events,
    query_endpoint,
)
from troupe.testing import eventually, free_port

ENDPOINT = "ns.comp.generate"
PLANE = RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1", connect_timeout=0.5))
CONFIG = Config(discovery=DiscoveryConfig(kv_store="memory"), request_plane=PLANE)


class DroppingPlane(MemoryEventPlane):
    """Loses the events whose ids are in ``drop[publisher_id]``."""

    def __init__(self) -> None:
        super().__init__()
        self.drop: dict[str, set[int]] = {}

    async def publisher(self, scope: EventScope, topic: str, publisher_id: str) -> EventPublisher:
        inner = await super().publisher(scope, topic, publisher_id)
        return Lossy(inner, self.drop.setdefault(publisher_id, set()))


class Cluster:
    def __init__(self) -> None:
        self.kv = MemoryKvServer()
        self.plane = DroppingPlane()
        self.router_rt = self.runtime()
        self.workers: dict[str, tuple[Runtime, KvPublisher]] = {}
        self.follower: KvFollower | None = None

    def runtime(self) -> Runtime:
        return Runtime(CONFIG, handle_signals=False, memory_server=self.kv).start()

    def worker(self, drop: set[int] = frozenset()) -> tuple[str, KvPublisher]:  # type: ignore[assignment]
        rt = self.runtime()
        self.plane.drop[rt.instance_id] = set(drop)
        publisher = rt.kv_events(ENDPOINT, block_size=4, plane=self.plane)
        self.workers[rt.instance_id] = (rt, publisher)
        return rt.instance_id, publisher

    def follow(self) -> KvFollower:
        self.follower = follow_kv_events(self.router_rt, ENDPOINT, plane=self.plane)
        return self.follower

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        assert self.follower is not None
        ok = self.router_rt.io.run(self.follower.wait_for(predicate, timeout=10), timeout=15)
        assert ok, what

    def synced(self, *workers: str) -> None:
        """Wait until the view holds what each worker's dump rebuilds."""
        assert self.follower is not None
        follower, view = self.follower, self.follower.sink
        assert isinstance(view, KvView)
        for worker in workers:
            rt, publisher = self.workers[worker]
            rt.io.run(publisher.flush(timeout=5), timeout=10)

        def done() -> bool:
            return all(
                follower.synced(w)
                and follower.last_event_id(w) == self.workers[w][1].last_event_id
                and view.blocks(w) == rebuilt(self.workers[w][1])
                for w in workers
            )

        self.wait(done, f"view equals the dumps of {workers}: {view.snapshot()}")

    def close(self) -> None:
        for rt, _ in self.workers.values():
            rt.close()
        self.router_rt.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


def fill(publisher: KvPublisher, count: int, salt: int) -> list[int]:
    """Store ``count`` two-block prompts (one event each); return the hashes stored."""
    hashes: list[int] = []
    for n in range(count):
        hashes += publisher.stored(token_ids=[salt, n, n, n, salt, 1, 2, 3])
    return hashes


def test_two_workers_a_lost_event_recovered_from_the_query_endpoint(cluster: Cluster) -> None:
    a, pa = cluster.worker(drop={5})
    b, pb = cluster.worker()
    follower = cluster.follow()
    cluster.synced(a, b)  # both found in discovery, their (empty) dumps applied
    stored = fill(pa, 10, salt=1)  # events 1 .. 10; 5 is lost on the way
    fill(pb, 10, salt=2)
    pa.removed(stored[-1:])  # event 11
    cluster.synced(a, b)
    ca, cb = follower.counters(a), follower.counters(b)
    assert (ca.gaps, ca.recovered) == (1, 1)
    assert (cb.gaps, cb.recovered) == (0, 0)
    assert follower.block_size(a) == 4
    assert len(follower.sink.blocks(a)) == 19  # type: ignore[attr-defined]


def test_a_new_worker_is_fetched_whole_and_a_leaving_one_dropped(cluster: Cluster) -> None:
    follower = cluster.follow()
    a, pa = cluster.worker()
    fill(pa, 25, salt=3)
    cluster.synced(a)
    b, pb = cluster.worker()
    fill(pb, 5, salt=4)
    cluster.synced(a, b)
    assert follower.counters(b).dumps == 1
    rt_a, _ = cluster.workers.pop(a)
    rt_a.close()  # revokes the lease: the worker leaves discovery at once
    cluster.wait(lambda: a not in follower.workers(), "worker a left")
    assert follower.sink.workers() == {b}  # type: ignore[attr-defined]


def test_the_query_endpoint_answers_ranges_and_dumps(cluster: Cluster) -> None:
    a, pa = cluster.worker()
    fill(pa, 3, salt=5)
    record_router = cluster.router_rt.router(query_endpoint(ENDPOINT))
    record_router.wait_for_instances_sync(timeout=5)
    (instance,) = record_router.snapshot.instances
    assert instance.instance_id == a  # the worker's own instance id
    assert instance.record.metadata == {"kv_block_size": 4}

    def ask(request: Any) -> KvQueryAnswer:
        (chunk,) = record_router.generate_sync(request, instance_id=a)
        return msgspec.msgpack.decode(chunk, type=KvQueryAnswer)

    span = ask({"first": 2, "last": 3})
    assert (span.dump, span.last_event_id) == (False, 3)
    assert [e.event_id for e in span.events] == [2, 3]
    dump = ask({"dump": True})
    assert (dump.dump, dump.last_event_id) == (True, 3)
    assert {b.block_hash for e in dump.events for b in e.data.blocks} == pa.indexer.blocks()  # type: ignore[union-attr]
    assert ask({"first": 2, "last": 9}).dump  # not there (yet): a dump instead
    with pytest.raises(RemoteError, match="InvalidRequest"):
        ask({"first": "x"})


def test_one_publisher_per_component(cluster: Cluster) -> None:
    _, _ = cluster.worker()
    rt, _ = next(iter(cluster.workers.values()))
    with pytest.raises(ConfigError, match="one KV event publisher per component"):
        rt.kv_events("ns.comp.other", plane=cluster.plane)


def test_without_a_plane_the_runtimes_own_event_plane_is_used() -> None:
    """``DYN_EVENT_PLANE=zmq``: the worker publishes and the router follows on ``rt.event_plane``
    (brokerless: events sent before the router's connection is up are recovered)."""
    kv = MemoryKvServer()
    config = dataclasses.replace(CONFIG, events=EventPlaneConfig(plane="zmq"))
    with (
        Runtime(config, handle_signals=False, memory_server=kv) as worker,
        Runtime(config, handle_signals=False, memory_server=kv) as router,
    ):
        publisher = worker.kv_events(ENDPOINT, block_size=4)
        follower = follow_kv_events(router, ENDPOINT)
        assert isinstance(worker.event_plane, ZmqEventPlane)
        view = follower.sink
        assert isinstance(view, KvView)
        me = worker.instance_id

        def converged() -> bool:
            return follower.synced(me) and view.blocks(me) == rebuilt(publisher)

        fill(publisher, 5, salt=7)
        for probe in range(200):  # each probe event shows the follower what it missed, if any
            if router.io.run(follower.wait_for(converged, timeout=0.05), timeout=5):
                break
            publisher.stored(token_ids=[9, 9, 9, probe])
        else:
            pytest.fail(f"no convergence: {view.snapshot()}")


def test_an_unreachable_nats_event_plane_is_one_clear_error() -> None:
    nats = NatsConfig(server=f"nats://127.0.0.1:{free_port()}", connect_timeout=0.5)
    config = dataclasses.replace(CONFIG, nats=nats)
    with (
        Runtime(config, handle_signals=False, memory_server=MemoryKvServer()) as rt,
        pytest.raises(ConnectionLost, match="--no-kv-events"),
    ):
        rt.kv_events(ENDPOINT)


def test_over_the_brokerless_zeromq_plane(cluster: Cluster) -> None:
    """The real plane: events sent before a subscriber's connection is up are lost (ZeroMQ
    drops them); the follower recovers them from the worker at its next event."""
    planes: list[tuple[Runtime, ZmqEventPlane]] = []

    def zmq_plane(rt: Runtime, publishes: bool) -> ZmqEventPlane:
        lease = rt.io.run(rt.store.grant_lease(10.0), timeout=5) if publishes else None
        plane = ZmqEventPlane(rt.store, lease, host="127.0.0.1")
        planes.append((rt, plane))
        return plane

    router_plane = zmq_plane(cluster.router_rt, publishes=False)
    cluster.follower = follow_kv_events(cluster.router_rt, ENDPOINT, plane=router_plane)
    workers: dict[str, KvPublisher] = {}
    for _ in range(2):
        rt = cluster.runtime()
        plane = zmq_plane(rt, publishes=True)
        publisher = rt.kv_events(ENDPOINT, block_size=4, plane=plane)
        cluster.workers[rt.instance_id] = (rt, publisher)
        workers[rt.instance_id] = publisher
        fill(publisher, 20, salt=len(workers))
    follower, view = cluster.follower, cluster.follower.sink
    assert isinstance(view, KvView)

    def converged() -> bool:
        return all(follower.synced(w) and view.blocks(w) == rebuilt(p) for w, p in workers.items())

    try:
        for probe in range(200):  # each probe event shows the follower what it missed, if any
            if cluster.router_rt.io.run(follower.wait_for(converged, timeout=0.05), timeout=5):
                break
            for publisher in workers.values():
                publisher.stored(token_ids=[9, 9, 9, probe])
        else:
            pytest.fail(f"no convergence: {view.snapshot()}")
        totals = follower.counters()
        assert totals.dumps >= 2
        assert totals.malformed == 0
    finally:
        for rt, plane in reversed(planes):
            rt.io.run(plane.close(), timeout=5)


class LossyNatsPlane(NatsEventPlane):
    """NATS core, losing the events whose ids are in ``drop``."""

    def __init__(self, config: NatsConfig, drop: set[int]) -> None:
        super().__init__(config)
        self.drop = drop

    async def publisher(self, scope: EventScope, topic: str, publisher_id: str) -> EventPublisher:
        return Lossy(await super().publisher(scope, topic, publisher_id), self.drop)


def test_over_nats_core_a_lost_event_is_recovered(cluster: Cluster, nats_server: Any) -> None:
    config = NatsConfig(server=nats_server.url)
    planes: list[tuple[Runtime, NatsEventPlane]] = []

    def nats_plane(rt: Runtime, drop: set[int]) -> NatsEventPlane:
        plane = LossyNatsPlane(config, drop)
        rt.io.run(plane.connect(), timeout=10)
        planes.append((rt, plane))
        return plane

    try:
        follower = follow_kv_events(
            cluster.router_rt, ENDPOINT, plane=nats_plane(cluster.router_rt, set())
        )
        cluster.follower = follower
        rt = cluster.runtime()
        publisher = rt.kv_events(ENDPOINT, block_size=4, plane=nats_plane(rt, {4}))
        cluster.workers[rt.instance_id] = (rt, publisher)
        cluster.synced(rt.instance_id)  # found, its (empty) dump applied
        fill(publisher, 8, salt=6)  # event 4 is lost on the way
        cluster.synced(rt.instance_id)
        counters = follower.counters(rt.instance_id)
        assert (counters.gaps, counters.recovered) == (1, 1)
    finally:
        for owner, plane in reversed(planes):
            owner.io.run(plane.close(), timeout=5)


def test_a_follower_closed_early_leaves_no_actor_and_keeps_its_counters(
    cluster: Cluster,
) -> None:
    """A frontend drops a model's router (and its follower) while the runtime runs on: the
    follower's router and closer stop with it, its workers stop counting, its counters stay."""
    rt = cluster.router_rt
    registry = rt.metrics.registry
    labels = {"namespace": "ns", "component": "comp"}
    before = {ref.name for ref in rt.system.actors()}
    worker, publisher = cluster.worker()
    fill(publisher, 3, salt=1)
    for round_ in range(3):  # followed, closed, followed again: nothing piles up
        follower = cluster.follow()
        cluster.synced(worker)
        assert registry.get_sample_value("troupe_kv_follower_workers", labels) == 1
        assert {ref.name for ref in rt.system.actors()} > before
        rt.io.run(follower.close(), timeout=10)
        # Its router has stopped; the actor that would have closed it exits right after.
        eventually(lambda: {ref.name for ref in rt.system.actors()} == before, what="released")
        assert registry.get_sample_value("troupe_kv_follower_workers", labels) == 0
        dumps = registry.get_sample_value("troupe_kv_events_dumps_total", labels)
        assert dumps == round_ + 1  # one dump per follower: the closed ones' still count
