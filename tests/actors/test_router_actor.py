"""The RouterActor on its own with a virtual clock (address preference, set-aside), and wire
versions: only instances of this wire version get requests."""

from __future__ import annotations

import logging
import threading

import msgspec
import pytest

from troupe._support._clock import VirtualClock
from troupe.actors import Actor, ActorSystem, Joined, Left, Subscribe
from troupe.actors.routing import (
    RouterActor,
    SetAside,
    SnapshotHolder,
    choose_address,
)
from troupe.errors import (
    IncompatibleInstances,
    NoInstances,
)
from troupe.messages import WIRE_VERSION, InstanceRecord, decode_record, encode_record
from troupe.testing._wait import eventually

from ._cluster import (
    COMP,
    EP,
    NAME,
    NS,
    Cluster,
    Worker,
    call,
)

# --- the actor on its own, with a virtual clock ---------------------------------------------------


class FakeWatcher(Actor[Subscribe]):
    def __init__(self, subscribed: threading.Event) -> None:
        super().__init__()
        self.subscribed = subscribed

    def receive(self, message: Subscribe) -> int:
        self.subscribed.set()
        return 0


def record(instance_id: str, transport: dict[str, str]) -> InstanceRecord:
    return InstanceRecord.create(
        NS, COMP, NAME, instance_id=instance_id, transport=transport, started_at=0.0
    )


def test_address_preference_is_tcp_http_nats_inproc() -> None:
    both = record("00000000000000aa", {"inproc": "inproc://w", "http": "http://h:1", "nats": "n"})
    assert choose_address(both) == "http://h:1"
    assert choose_address(record("00000000000000aa", {"tcp": "tcp://a:1", "http": "x"})) == (
        "tcp://a:1"
    )
    assert choose_address(record("00000000000000aa", {"other": "x"})) is None


def test_set_aside_excludes_for_the_window_then_re_includes() -> None:
    clock = VirtualClock()
    system = ActorSystem("router-test", clock=clock)
    holder = SnapshotHolder()
    subscribed = threading.Event()
    try:
        watcher = system.spawn(lambda: FakeWatcher(subscribed))
        actor = system.spawn(lambda: RouterActor(watcher, holder, set_aside_for=5.0))
        assert subscribed.wait(5)
        a, b = "00000000000000aa", "00000000000000bb"
        actor.tell(Joined(f"/k/{a}", a, record(a, {"tcp": "tcp://127.0.0.1:1"})))
        actor.tell(Joined(f"/k/{b}", b, record(b, {"inproc": "inproc://b"})))
        snap = holder.wait_sync(lambda s: len(s.instances) == 2, 5)
        assert snap is not None
        assert [(i.instance_id, i.address) for i in snap.available] == [
            (a, "tcp://127.0.0.1:1"),
            (b, "inproc://b"),
        ]

        actor.tell(SetAside(a))
        snap = holder.wait_sync(lambda s: a in s.set_aside, 5)
        assert snap is not None
        assert snap.set_aside[a] == 5.0
        assert [i.instance_id for i in snap.available] == [b]
        version = snap.version

        assert clock.pending() == [5.0]
        clock.advance(4.9)
        actor.ask(SetAside("00000000000000cc"))  # a barrier (unknown ids are ignored)
        assert holder.current.version == version  # still aside
        clock.advance(0.2)
        snap = holder.wait_sync(lambda s: a not in s.set_aside, 5)
        assert snap is not None
        assert [i.instance_id for i in snap.available] == [a, b]

        actor.tell(SetAside(b))
        actor.tell(Left(f"/k/{b}", b, "expired"))
        snap = holder.wait_sync(lambda s: b not in s.by_id, 5)
        assert snap is not None
        assert dict(snap.set_aside) == {}
        assert clock.pending() == []  # Left cancelled the re-inclusion timer
        version = snap.version
        clock.advance(10)
        actor.ask(SetAside("00000000000000cc"))  # barrier
        assert holder.current.version == version
        assert [i.instance_id for i in holder.current.instances] == [a]
    finally:
        system.shutdown(timeout=5)


# --- wire versions -------------------------------------------------------------------------------


def downgrade(cluster: Cluster, worker: Worker, wire: int = 0) -> None:
    """Re-write ``worker``'s registration as an older troupe (one of ``wire``) would have."""
    key = f"/services/{NS}/{COMP}/{NAME}/{worker.id}"
    stored = cluster.rt.io.run(cluster.rt.store.get(key), timeout=5)
    assert stored is not None
    current = decode_record(stored.value, key=key)
    assert current.wire == WIRE_VERSION  # what every registration writes
    old = msgspec.structs.replace(current, wire=wire)
    put = cluster.rt.store.put(key, encode_record(old), lease=stored.lease)  # still leased
    cluster.rt.io.run(put, timeout=5)


def test_only_instances_of_this_wire_version_get_requests(cluster: Cluster) -> None:
    current, old = cluster.inproc_worker(), cluster.inproc_worker()
    downgrade(cluster, old)
    router = cluster.router(expect=1)
    eventually(lambda: dict(router.snapshot.incompatible) == {old.id: 0}, what="old listed")
    assert router.instance_ids() == [current.id]
    assert [call(router)[0] for _ in range(6)] == [current.id] * 6
    with pytest.raises(IncompatibleInstances) as info:
        call(router, instance_id=old.id)  # direct routing does not reach it either
    assert info.value.versions == {old.id: 0}
    assert old.seen == []
    assert len(current.seen) == 6


def test_only_incompatible_instances_fail_at_once_naming_the_versions(cluster: Cluster) -> None:
    olds = [cluster.inproc_worker(), cluster.inproc_worker()]
    for worker in olds:
        downgrade(cluster, worker)
    router = cluster.router(expect=0)
    eventually(lambda: len(router.snapshot.incompatible) == 2, what="both old ones listed")
    with pytest.raises(IncompatibleInstances) as info:
        call(router)
    error = info.value
    assert isinstance(error, NoInstances)  # the frontend's 503
    assert error.endpoint == EP
    assert error.versions == {w.id: 0 for w in olds}
    assert error.wire == WIRE_VERSION
    assert str(error) == (
        f"2 instances of {EP} speak wire version 0, this troupe speaks 1: upgrade them together"
    )

    async def on_the_io_loop() -> None:
        async for _ in router.generate({"kind": "who"}):
            pass

    with pytest.raises(IncompatibleInstances):
        cluster.rt.io.run(on_the_io_loop(), timeout=5)
    with pytest.raises(IncompatibleInstances):
        router.wait_for_instances_sync(timeout=0.05)
    assert all(w.seen == [] for w in olds)

    fresh = cluster.inproc_worker()  # a current instance makes the endpoint routable again
    eventually(lambda: router.instance_ids() == [fresh.id], what="the current one")
    assert call(router) == [fresh.id]


def test_the_router_actor_checks_the_wire_version_when_records_arrive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    system = ActorSystem("router-wire-test", clock=VirtualClock())
    holder = SnapshotHolder()
    subscribed = threading.Event()
    a, b, c = "00000000000000aa", "00000000000000bb", "00000000000000cc"

    def rec(instance_id: str, wire: int, model: str = "m") -> InstanceRecord:
        return InstanceRecord.create(
            NS,
            COMP,
            NAME,
            instance_id=instance_id,
            transport={"inproc": f"inproc://{instance_id}"},
            metadata={"model": model},
            wire=wire,
        )

    def accept(record: InstanceRecord) -> bool:
        return bool(record.metadata["model"] == "m")

    try:
        watcher = system.spawn(lambda: FakeWatcher(subscribed))
        actor = system.spawn(lambda: RouterActor(watcher, holder, instance_filter=accept))
        assert subscribed.wait(5)
        with caplog.at_level(logging.WARNING, logger="troupe.actors.router"):
            actor.tell(Joined(f"/k/{a}", a, rec(a, 0)))
            actor.tell(Joined(f"/k/{b}", b, rec(b, WIRE_VERSION)))
            actor.tell(Joined(f"/k/{c}", c, rec(c, 0, model="other")))  # filtered: not counted
            snap = holder.wait_sync(lambda s: len(s.instances) == 1 and bool(s.incompatible), 5)
            assert snap is not None
            assert dict(snap.incompatible) == {a: 0}
            assert [i.instance_id for i in snap.instances] == [b]
            version = snap.version
            actor.tell(Joined(f"/k/{a}", a, rec(a, 0)))  # the same again: no news, no warning
            actor.ask(SetAside("00000000000000dd"))  # a barrier (unknown ids are ignored)
            assert holder.current.version == version
        warnings = [r for r in caplog.records if "wire version" in r.getMessage()]
        assert len(warnings) == 1
        assert "'instance_wire': 0" in warnings[0].getMessage()
        assert f"'wire': {WIRE_VERSION}" in warnings[0].getMessage()

        actor.tell(Joined(f"/k/{a}", a, rec(a, WIRE_VERSION)))  # upgraded in place
        snap = holder.wait_sync(lambda s: len(s.instances) == 2, 5)
        assert snap is not None
        assert dict(snap.incompatible) == {}
        actor.tell(Joined(f"/k/{a}", a, rec(a, 2)))  # a newer one is no more routable
        snap = holder.wait_sync(lambda s: bool(s.incompatible), 5)
        assert snap is not None
        assert dict(snap.incompatible) == {a: 2}
        assert [i.instance_id for i in snap.instances] == [b]
        actor.tell(Left(f"/k/{a}", a, "expired"))
        snap = holder.wait_sync(lambda s: not s.incompatible, 5)
        assert snap is not None
        assert [i.instance_id for i in snap.instances] == [b]
    finally:
        system.shutdown(timeout=5)


def test_a_failed_instance_is_excluded_at_once_before_the_actor_catches_up(
    cluster: Cluster,
) -> None:
    a, b = cluster.inproc_worker(), cluster.inproc_worker()
    router = cluster.router(expect=2, policy="round_robin", set_aside_for=30.0)
    router._actor.stop()  # its snapshot will never say "set aside": only the handle knows

    async def picks() -> list[str]:
        router._set_aside(a.id)  # what a failed request does, on the I/O loop
        return [router._pick(None, None).instance_id for _ in range(6)]

    assert cluster.rt.io.run(picks(), timeout=5) == [b.id] * 6
    assert a.id not in router.snapshot.set_aside
