"""One suite, every store: memory, file, etcd, NATS (real servers) and Kubernetes (the fake).

Each test gets stores of one backend that see each other (``stores``) and a key root of its own
(``root``): the etcd and NATS servers are shared by the session. Two properties do not apply to
the kubernetes store, and their tests run over ``KV_BACKENDS`` only (see ``conftest.py``): an
atomic ``create`` across processes (each pod writes its own resource) and TTL leases (the pod's
life is the lease; ``tests/discovery/test_kubernetes_store.py`` covers it).
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from troupe.config import EtcdConfig, FileKvConfig, KubernetesConfig, NatsConfig
from troupe.discovery import (
    Delete,
    EtcdStore,
    FileStore,
    KeyValue,
    KeyValueStore,
    KubernetesStore,
    MemoryKvServer,
    MemoryStore,
    NatsStore,
    Put,
    Snapshot,
    Watch,
)
from troupe.errors import DiscoveryError, DiscoveryUnavailable, KeyExists, LeaseLost

from ._helpers import StoreFactory, WatchReader, apply, is_delete
from .conftest import KV_BACKENDS

Readers = Callable[[Watch], WatchReader]
TTL = 1.0  # short leases: etcd and NATS count whole seconds, 1 s is their minimum
EXPIRY_DEADLINE = TTL + 4.0  # TTL + the slowest backend's expiry tick + scheduling slack


async def test_put_get_delete_list(stores: StoreFactory, root: str) -> None:
    store = await stores()
    rev1 = await store.put(f"{root}/a", b"1")
    rev2 = await store.put(f"{root}/b", b"2")
    assert rev2 > rev1
    assert await store.get(f"{root}/a") == KeyValue(f"{root}/a", b"1", rev1, None)

    rev3 = await store.put(f"{root}/a", b"one")  # overwrite
    assert rev3 > rev2
    assert await store.get(f"{root}/a") == KeyValue(f"{root}/a", b"one", rev3, None)

    items, revision = await store.list(root)
    assert [(kv.key, kv.value) for kv in items] == [(f"{root}/a", b"one"), (f"{root}/b", b"2")]
    assert revision >= rev3

    assert await store.delete(f"{root}/a") is True
    assert await store.delete(f"{root}/a") is False
    assert await store.get(f"{root}/a") is None
    assert await store.get(f"{root}/never") is None
    items, _ = await store.list(f"{root}/")  # a trailing slash names the same subtree
    assert [kv.key for kv in items] == [f"{root}/b"]


async def test_another_store_sees_the_writes(stores: StoreFactory, root: str) -> None:
    writer, reader = await stores(), await stores()
    rev = await writer.put(f"{root}/k", b"v")
    kv = await reader.get(f"{root}/k")
    assert kv is not None
    assert (kv.value, kv.revision) == (b"v", rev)


@pytest.mark.parametrize("backend", KV_BACKENDS)  # kubernetes: create is atomic per pod only
async def test_concurrent_create_of_one_key_has_exactly_one_winner(
    stores: StoreFactory, root: str
) -> None:
    clients = [await stores() for _ in range(4)]
    key = f"{root}/contended"

    async def create(i: int) -> int | None:
        try:
            await clients[i % len(clients)].create(key, f"creator-{i}".encode())
        except KeyExists:
            return None
        return i

    results = await asyncio.gather(*(create(i) for i in range(16)))
    winners = [i for i in results if i is not None]
    assert len(winners) == 1, results
    kv = await clients[0].get(key)
    assert kv is not None
    assert kv.value == f"creator-{winners[0]}".encode()


async def test_put_overwrites_with_a_smaller_value(stores: StoreFactory, root: str) -> None:
    writer, reader = await stores(), await stores()
    lease = await writer.grant_lease(30.0)
    await writer.put(f"{root}/record", b'{"a":1,"b":{"c":2,"d":3}}', lease=lease)
    await writer.put(f"{root}/text", b'{"a":1}')
    await writer.put(f"{root}/record", b'{"b":{"c":2}}')  # fields removed, and no lease now
    await writer.put(f"{root}/text", b"a")  # no longer a JSON object
    for key, value in ((f"{root}/record", b'{"b":{"c":2}}'), (f"{root}/text", b"a")):
        for store in (writer, reader):
            kv = await store.get(key)
            assert kv is not None
            assert (kv.value, kv.lease) == (value, None), key
    items, _ = await reader.list(root)
    assert [kv.value for kv in items] == [b'{"b":{"c":2}}', b"a"]
    await writer.revoke_lease(lease)  # the lease no longer holds the key
    assert await reader.get(f"{root}/record") is not None


async def test_create_after_delete_succeeds(stores: StoreFactory, root: str) -> None:
    store = await stores()
    await store.create(f"{root}/k", b"1")
    with pytest.raises(KeyExists) as info:
        await store.create(f"{root}/k", b"2")
    assert info.value.key == f"{root}/k"
    assert await store.delete(f"{root}/k")
    await store.create(f"{root}/k", b"3")
    kv = await store.get(f"{root}/k")
    assert kv is not None
    assert kv.value == b"3"


async def test_prefixes_respect_path_boundaries(
    stores: StoreFactory, root: str, readers: Readers
) -> None:
    store = await stores()
    inside = [f"{root}/ns/comp/a", f"{root}/ns/comp/x/y"]
    outside = [
        f"{root}/ns/comp",  # a prefix covers the keys below it, not itself
        f"{root}/ns/comp2/b",
        f"{root}/ns/comp-x",
        f"{root}/ns/co",
        f"{root}/ns/comp.z",
    ]
    for key in inside + outside:
        await store.put(key, b"v")

    for prefix in (f"{root}/ns/comp", f"{root}/ns/comp/"):
        items, _ = await store.list(prefix)
        assert [kv.key for kv in items] == sorted(inside), prefix

    watch = readers(store.watch(f"{root}/ns/comp/"))
    snapshot = await watch.snapshot()
    assert sorted(kv.key for kv in snapshot.items) == sorted(inside)

    await store.put(f"{root}/ns/comp2/c", b"no")
    await store.put(f"{root}/ns/compx", b"no")
    await store.put(f"{root}/ns/comp", b"no, again")
    await store.put(f"{root}/ns/comp/b", b"yes")
    event = await watch.next()
    assert isinstance(event, Put)
    assert event.key == f"{root}/ns/comp/b"


async def test_every_read_tells_the_lease_a_key_is_bound_to(
    stores: StoreFactory, root: str, readers: Readers
) -> None:
    """Routers ignore instance records bound to no lease: every backend must tell them apart."""
    writer, reader = await stores(), await stores()
    lease = await writer.grant_lease(30.0)
    await writer.put(f"{root}/leased", b"1", lease=lease)
    await writer.put(f"{root}/by-hand", b"2")
    watch = readers(reader.watch(root))
    snapshot = await watch.snapshot()
    assert {kv.key: kv.lease for kv in snapshot.items} == {
        f"{root}/leased": lease,
        f"{root}/by-hand": None,
    }
    items, _ = await reader.list(root)
    assert {kv.key: kv.lease for kv in items} == {f"{root}/leased": lease, f"{root}/by-hand": None}
    by_hand, leased = await reader.get(f"{root}/by-hand"), await reader.get(f"{root}/leased")
    assert by_hand is not None
    assert by_hand.lease is None
    assert leased is not None
    assert leased.lease == lease

    await writer.put(f"{root}/leased", b"rewritten without a lease")
    event = await watch.next()
    assert isinstance(event, Put)
    assert (event.key, event.kv.lease) == (f"{root}/leased", None)
    await writer.put(f"{root}/by-hand", b"now leased", lease=lease)
    event = await watch.next()
    assert isinstance(event, Put)
    assert (event.key, event.kv.lease) == (f"{root}/by-hand", lease)


async def test_watch_from_a_snapshot_misses_and_repeats_nothing(
    stores: StoreFactory, root: str, readers: Readers, backend: str
) -> None:
    writer, watcher = await stores(), await stores()
    keys = [f"{root}/k{i:02d}" for i in range(12)]
    for key in keys[:6]:
        await writer.put(key, b"initial")
    rng = random.Random(7)
    put_revisions: list[int] = []
    started = asyncio.Event()

    async def write() -> None:
        for step in range(60):
            if step == 5:
                started.set()
            key = rng.choice(keys)
            if rng.random() < 0.3:
                await writer.delete(key)
            else:
                put_revisions.append(await writer.put(key, f"v{step}".encode()))
            await asyncio.sleep(0)

    writing = asyncio.create_task(write(), name="conformance-writer")
    await started.wait()
    reader = readers(watcher.watch(root))  # the snapshot is taken while the writer runs
    snapshot = await reader.snapshot()
    await writing

    expected, _ = await watcher.list(root)
    view: dict[str, KeyValue] = {}
    apply(view, snapshot)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    events = []

    def same(view: dict[str, KeyValue], expected: list[KeyValue]) -> bool:
        if backend == "kubernetes":  # a watch numbers its own events: compare the values
            return {k: kv.value for k, kv in view.items()} == {kv.key: kv.value for kv in expected}
        return view == {kv.key: kv for kv in expected}

    while not same(view, expected):
        event = await reader.next(max(0.0, deadline - loop.time()))
        events.append(event)
        assert not isinstance(event, Snapshot)
        if isinstance(event, Delete):
            assert event.key in view, f"delete of a key not in the view: {event}"
        else:
            known = view.get(event.key)
            assert known is None or event.revision > known.revision, f"repeated: {event}"
        assert event.revision > snapshot.revision
        apply(view, event)

    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions)
    if type(watcher).exact_history:
        # Every write after the snapshot arrives once, in order.
        seen_puts = [e.revision for e in events if isinstance(e, Put)]
        assert seen_puts == [r for r in put_revisions if r > snapshot.revision]


@pytest.mark.parametrize("backend", KV_BACKENDS)  # kubernetes: the pod's life is the lease
async def test_lease_expiry_deletes_keys_and_notifies_watchers(
    stores: StoreFactory, root: str, readers: Readers
) -> None:
    owner, observer = await stores(), await stores()
    watch = readers(observer.watch(root))
    await watch.snapshot()
    dying = await owner.grant_lease(TTL)
    living = await owner.grant_lease(TTL)
    await owner.put(f"{root}/dying-1", b"a", lease=dying)
    await owner.put(f"{root}/dying-2", b"b", lease=dying)
    await owner.put(f"{root}/living", b"c", lease=living)
    await owner.put(f"{root}/plain", b"d")
    kv = await observer.get(f"{root}/dying-1")
    assert kv is not None
    assert kv.lease == dying
    started = time.monotonic()

    async def keep_living_alive() -> None:
        while True:
            await asyncio.sleep(TTL / 4)
            await owner.keep_alive(living)

    keeper = asyncio.create_task(keep_living_alive(), name="conformance-keeper")
    try:
        gone = []
        for _ in range(2):
            event = await watch.until(
                lambda e: isinstance(e, Delete) and e.key.startswith(f"{root}/dying"),
                timeout=EXPIRY_DEADLINE,
            )
            assert isinstance(event, Delete)
            assert event.expired, event
            gone.append(event.key)
        assert sorted(gone) == [f"{root}/dying-1", f"{root}/dying-2"]
        assert time.monotonic() - started >= TTL * 0.9  # not before the TTL
        assert await observer.get(f"{root}/dying-1") is None
        with pytest.raises(LeaseLost):
            await owner.keep_alive(dying)
        with pytest.raises(LeaseLost):
            await owner.put(f"{root}/late", b"x", lease=dying)

        # The kept-alive lease outlives two TTLs.
        await asyncio.sleep(max(0.0, started + 2 * TTL + 0.5 - time.monotonic()))
        assert keeper.done() is False
        items, _ = await observer.list(root)
        assert [kv.key for kv in items] == [f"{root}/living", f"{root}/plain"]
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)


async def test_revoke_deletes_at_once(stores: StoreFactory, root: str, readers: Readers) -> None:
    owner, observer = await stores(), await stores()
    lease = await owner.grant_lease(30.0)
    await owner.put(f"{root}/a", b"1", lease=lease)
    await owner.put(f"{root}/b", b"2", lease=lease)
    await owner.put(f"{root}/c", b"3", lease=lease)
    watch = readers(observer.watch(root))
    assert len((await watch.snapshot()).items) == 3

    assert await owner.delete(f"{root}/c")  # an explicit delete is not an expiry
    deleted = await watch.until(is_delete(f"{root}/c"))
    assert isinstance(deleted, Delete)
    assert deleted.expired is False

    await owner.revoke_lease(lease)
    for _ in range(2):
        event = await watch.until(lambda e: isinstance(e, Delete), timeout=3.0)
        assert isinstance(event, Delete)
        assert event.expired is True  # removed by its lease
    assert (await observer.list(root))[0] == []
    with pytest.raises(LeaseLost):
        await owner.keep_alive(lease)
    await owner.revoke_lease(lease)  # revoking twice is harmless


async def test_keep_alive_of_an_unknown_lease_raises_lease_lost(stores: StoreFactory) -> None:
    store = await stores()
    with pytest.raises(LeaseLost) as info:
        await store.keep_alive(7_777_777_777)
    assert info.value.lease_id == 7_777_777_777


async def test_closing_the_store_ends_its_watches(stores: StoreFactory, root: str) -> None:
    store = await stores()
    await store.put(f"{root}/a", b"1")
    watch = store.watch(root)
    first = await anext(watch)
    assert isinstance(first, Snapshot)
    pending = asyncio.create_task(anext(watch))
    await asyncio.sleep(0.05)
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 5.0)
    await watch.aclose()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when this returns: nothing listens


async def test_an_unreachable_store_raises_discovery_unavailable(
    backend: str, tmp_path: Path
) -> None:
    store: KeyValueStore
    if backend == "etcd":
        url = f"http://127.0.0.1:{_closed_port()}"
        store = EtcdStore(EtcdConfig(endpoints=(url,), connect_timeout=1.0))
    elif backend == "nats":
        url = f"nats://127.0.0.1:{_closed_port()}"
        store = NatsStore(NatsConfig(server=url, connect_timeout=1.0))
    elif backend == "kubernetes":
        url = f"http://127.0.0.1:{_closed_port()}"
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            '{"apiVersion": "v1", "kind": "Config", "current-context": "c",'
            f' "clusters": [{{"name": "c", "cluster": {{"server": "{url}"}}}}],'
            ' "users": [{"name": "u", "user": {"token": "t"}}],'
            ' "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}'
        )
        store = KubernetesStore(KubernetesConfig(kubeconfig=str(kubeconfig), connect_timeout=1.0))
    elif backend == "file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        url = str(blocker / "kv")
        store = FileStore(FileKvConfig(path=url))
    else:
        server = MemoryKvServer(name="memory://test")
        server.set_available(False)
        url = "memory://test"
        store = MemoryStore(server)
    started = time.monotonic()
    with pytest.raises(DiscoveryUnavailable) as info:
        await store.connect()
    assert time.monotonic() - started < 3.0  # within the connect timeout, not a hang
    assert info.value.backend == backend
    assert info.value.endpoints == (url,)
    assert url in str(info.value)
    with pytest.raises(DiscoveryError):
        await store.put("/k", b"v")  # never connected
    await store.close()
