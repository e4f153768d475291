"""LeaseActor and WatcherActor on the memory store: registration, loss, re-grant, resync."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from troupe import Config, Runtime
from troupe.actors import Actor, ActorRef, Backoff
from troupe.actors._lease import LeaseActor, LeaseInfo, Register, Status, Unregister
from troupe.actors._watcher import Instances, Joined, Left, Subscribe, WatcherActor
from troupe.discovery import MemoryKvServer, MemoryStore
from troupe.testing._wait import eventually

PREFIX = "/services/ns/comp/ep"
FAST = Backoff(min=0.02, max=0.2)


def decode(key: str, value: bytes) -> tuple[str, Any]:
    if value == b"garbage":
        raise ValueError("not a record")
    return key.rsplit("/", 1)[-1], value.decode()


class Collector(Actor[Joined | Left]):
    def __init__(self, seen: list[Joined | Left]) -> None:
        super().__init__()
        self.seen = seen

    def receive(self, message: Joined | Left) -> None:
        self.seen.append(message)


@pytest.fixture
def rt() -> Iterator[Runtime]:
    with Runtime(Config(), handle_signals=False) as runtime:
        yield runtime


@pytest.fixture
def server() -> MemoryKvServer:
    return MemoryKvServer()


def store_on(rt: Runtime, server: MemoryKvServer) -> MemoryStore:
    store = MemoryStore(server, reap_interval=0.02)
    rt.io.run(store.connect(), timeout=5)
    return store


def keys(rt: Runtime, store: MemoryStore) -> list[str]:
    items, _ = rt.io.run(store.list(PREFIX), timeout=5)
    return [kv.key for kv in items]


def put(rt: Runtime, store: MemoryStore, key: str, value: bytes) -> None:
    """Write ``key`` as a worker would: bound to a lease (watchers ignore keys bound to none)."""
    lease = rt.io.run(store.grant_lease(60.0), timeout=5)
    rt.io.run(store.put(key, value, lease=lease), timeout=5)


def status(lease: ActorRef[Any]) -> LeaseInfo:
    info: LeaseInfo = lease.ask(Status())
    return info


def test_register_is_bound_to_the_lease_and_a_clean_stop_revokes_it(
    rt: Runtime, server: MemoryKvServer
) -> None:
    store = store_on(rt, server)
    lease = rt.spawn(lambda: LeaseActor(store, ttl=5.0))
    assert lease.ask(Register(f"{PREFIX}/aaaa", b"a"), timeout=5) is None
    info = status(lease)
    assert info.state == "alive"
    assert info.keys == (f"{PREFIX}/aaaa",)
    kv = rt.io.run(store.get(f"{PREFIX}/aaaa"), timeout=5)
    assert kv is not None
    assert kv.lease == info.lease_id
    lease.stop()
    assert keys(rt, store) == []  # revoked at once, not at TTL expiry


def test_keep_alive_holds_the_lease_past_its_ttl(rt: Runtime, server: MemoryKvServer) -> None:
    store = store_on(rt, server)
    lease = rt.spawn(lambda: LeaseActor(store, ttl=0.3))
    lease.ask(Register(f"{PREFIX}/aaaa", b"a"), timeout=5)
    done = threading.Event()
    rt.clock.call_later(1.0, done.set)  # three TTLs
    assert done.wait(5)
    assert keys(rt, store) == [f"{PREFIX}/aaaa"]
    assert status(lease).grants == 1


def test_revoked_lease_is_re_granted_and_keys_re_registered(
    rt: Runtime, server: MemoryKvServer
) -> None:
    store = store_on(rt, server)
    lease = rt.spawn(lambda: LeaseActor(store, ttl=0.6, backoff=FAST))
    lease.ask(Register(f"{PREFIX}/aaaa", b"a"), timeout=5)
    lease.ask(Register(f"{PREFIX}/bbbb", b"b"), timeout=5)
    first = status(lease).lease_id
    assert first is not None
    server.revoke(first)
    info = eventually(lambda: (s := status(lease)).grants == 2 and s.state == "alive" and s)
    assert info.lease_id != first
    eventually(lambda: keys(rt, store) == [f"{PREFIX}/aaaa", f"{PREFIX}/bbbb"])
    kv = rt.io.run(store.get(f"{PREFIX}/aaaa"), timeout=5)
    assert kv is not None
    assert kv.lease == info.lease_id


def test_store_unreachable_longer_than_ttl_then_back(rt: Runtime, server: MemoryKvServer) -> None:
    store = store_on(rt, server)
    lease = rt.spawn(lambda: LeaseActor(store, ttl=0.5, backoff=FAST))
    lease.ask(Register(f"{PREFIX}/aaaa", b"a"), timeout=5)
    server.set_available(False)
    server_expired = threading.Event()
    rt.clock.call_later(1.0, server_expired.set)  # two TTLs of outage: the lease expires
    assert server_expired.wait(5)
    server.expire_due()
    assert lease.is_alive()  # the process keeps running
    server.set_available(True)
    eventually(lambda: keys(rt, store) == [f"{PREFIX}/aaaa"], timeout=5)
    assert status(lease).grants >= 2


def test_unregister_deletes_and_stops_re_registering(rt: Runtime, server: MemoryKvServer) -> None:
    store = store_on(rt, server)
    lease = rt.spawn(lambda: LeaseActor(store, ttl=5.0))
    lease.ask(Register(f"{PREFIX}/aaaa", b"a"), timeout=5)
    assert lease.ask(Unregister(f"{PREFIX}/aaaa"), timeout=5) is True
    assert lease.ask(Unregister(f"{PREFIX}/aaaa"), timeout=5) is False
    assert keys(rt, store) == []
    assert status(lease).keys == ()


def test_watcher_sends_current_set_first_then_deltas(rt: Runtime, server: MemoryKvServer) -> None:
    store = store_on(rt, server)
    put(rt, store, f"{PREFIX}/aaaa", b"a")
    put(rt, store, "/services/ns/comp/ep2/zzzz", b"z")  # another endpoint
    watcher = rt.spawn(lambda: WatcherActor(store, PREFIX, decode))
    eventually(lambda: watcher.ask(Instances()) == {f"{PREFIX}/aaaa": "a"})
    seen: list[Joined | Left] = []
    collector = rt.spawn(lambda: Collector(seen))
    assert watcher.ask(Subscribe(collector)) == 1
    put(rt, store, f"{PREFIX}/bbbb", b"b")
    rt.io.run(store.delete(f"{PREFIX}/aaaa"), timeout=5)
    eventually(lambda: len(seen) == 3)
    assert seen == [
        Joined(f"{PREFIX}/aaaa", "aaaa", "a"),
        Joined(f"{PREFIX}/bbbb", "bbbb", "b"),
        Left(f"{PREFIX}/aaaa", "aaaa", "deleted"),
    ]


def test_lease_expiry_gives_left_expired(rt: Runtime, server: MemoryKvServer) -> None:
    store = store_on(rt, server)
    watcher = rt.spawn(lambda: WatcherActor(store, PREFIX, decode))
    seen: list[Joined | Left] = []
    watcher.ask(Subscribe(rt.spawn(lambda: Collector(seen))))
    lease = rt.spawn(lambda: LeaseActor(store, ttl=5.0))
    lease.ask(Register(f"{PREFIX}/aaaa", b"a"), timeout=5)
    lease.stop()
    eventually(lambda: len(seen) == 2)
    assert seen[1] == Left(f"{PREFIX}/aaaa", "aaaa", "expired")


def test_bad_record_is_skipped_and_the_watch_keeps_going(
    rt: Runtime, server: MemoryKvServer
) -> None:
    store = store_on(rt, server)
    watcher = rt.spawn(lambda: WatcherActor(store, PREFIX, decode))
    seen: list[Joined | Left] = []
    watcher.ask(Subscribe(rt.spawn(lambda: Collector(seen))))
    put(rt, store, f"{PREFIX}/bad0", b"garbage")
    put(rt, store, f"{PREFIX}/good", b"g")
    eventually(lambda: len(seen) == 1)
    assert seen == [Joined(f"{PREFIX}/good", "good", "g")]
    assert watcher.is_alive()


def test_reconnect_resyncs_and_sends_only_the_difference(
    rt: Runtime, server: MemoryKvServer
) -> None:
    store = store_on(rt, server)
    put(rt, store, f"{PREFIX}/keep", b"k")
    short = rt.io.run(store.grant_lease(0.3), timeout=5)
    rt.io.run(store.put(f"{PREFIX}/gone", b"g", lease=short), timeout=5)
    watcher = rt.spawn(lambda: WatcherActor(store, PREFIX, decode, backoff=FAST))
    seen: list[Joined | Left] = []
    watcher.ask(Subscribe(rt.spawn(lambda: Collector(seen))))
    eventually(lambda: len(seen) == 2)
    seen.clear()

    server.set_available(False)  # the watch breaks; "gone" expires during the outage
    outage = threading.Event()
    rt.clock.call_later(0.6, outage.set)
    assert outage.wait(5)
    server.expire_due()
    server.set_available(True)
    put(rt, store, f"{PREFIX}/new0", b"n")
    eventually(lambda: len(seen) == 2, timeout=5)
    assert sorted(seen, key=lambda m: m.key) == [
        Left(f"{PREFIX}/gone", "gone", "resync"),
        Joined(f"{PREFIX}/new0", "new0", "n"),
    ]
    assert watcher.ask(Instances()) == {f"{PREFIX}/keep": "k", f"{PREFIX}/new0": "n"}
