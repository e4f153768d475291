"""Store checks, part one: reads and writes — put/get/list/delete, create, prefixes as
subtrees, the lease a key is bound to, and a backend that does not answer."""

from __future__ import annotations

import asyncio
import time

from troupe.discovery import KeyValue, Put
from troupe.errors import DiscoveryError, DiscoveryUnavailable, KeyExists, LeaseLost
from troupe.testing.conformance._check import raises
from troupe.testing.conformance._store import StoreSession, store_check

__all__ = ["KEY_CHECKS"]


@store_check()
async def put_get_delete_list(s: StoreSession) -> None:
    """Writes raise the revision; get, list (sorted, by subtree) and delete see them."""
    store, root = await s.store(), s.root
    rev1 = await store.put(f"{root}/a", b"1")
    rev2 = await store.put(f"{root}/b", b"2")
    assert rev2 > rev1, (rev1, rev2)
    got = await store.get(f"{root}/a")
    assert got == KeyValue(f"{root}/a", b"1", rev1, None), got

    rev3 = await store.put(f"{root}/a", b"one")  # overwrite
    assert rev3 > rev2, (rev2, rev3)
    got = await store.get(f"{root}/a")
    assert got == KeyValue(f"{root}/a", b"one", rev3, None), got

    items, revision = await store.list(root)
    listed = [(kv.key, kv.value) for kv in items]
    assert listed == [(f"{root}/a", b"one"), (f"{root}/b", b"2")], listed
    assert revision >= rev3, (revision, rev3)

    assert await store.delete(f"{root}/a") is True
    assert await store.delete(f"{root}/a") is False, "deleted twice"
    assert await store.get(f"{root}/a") is None
    assert await store.get(f"{root}/never") is None
    items, _ = await store.list(f"{root}/")  # a trailing slash names the same subtree
    assert [kv.key for kv in items] == [f"{root}/b"], items


@store_check()
async def another_store_sees_the_writes(s: StoreSession) -> None:
    """A second store of the backend reads what the first wrote, at the same revision."""
    writer, reader = await s.store(), await s.store()
    rev = await writer.put(f"{s.root}/k", b"v")
    kv = await reader.get(f"{s.root}/k")
    assert kv is not None, "the other store does not see the key"
    assert (kv.value, kv.revision) == (b"v", rev), kv


@store_check("atomic_create")
async def concurrent_create_of_one_key_has_exactly_one_winner(s: StoreSession) -> None:
    """Sixteen creates of one key from four stores at once: one succeeds, the rest KeyExists."""
    clients = [await s.store() for _ in range(4)]
    key = f"{s.root}/contended"

    async def create(i: int) -> int | None:
        try:
            await clients[i % len(clients)].create(key, f"creator-{i}".encode())
        except KeyExists:
            return None
        return i

    results = await asyncio.gather(*(create(i) for i in range(16)))
    winners = [i for i in results if i is not None]
    assert len(winners) == 1, f"winners: {winners}"
    kv = await clients[0].get(key)
    assert kv is not None
    assert kv.value == f"creator-{winners[0]}".encode(), kv


@store_check()
async def put_overwrites_with_a_smaller_value(s: StoreSession) -> None:
    """A put replaces the whole value and its lease (no merging, nothing left over)."""
    writer, reader = await s.store(), await s.store()
    root = s.root
    lease = await writer.grant_lease(30.0)
    await writer.put(f"{root}/record", b'{"a":1,"b":{"c":2,"d":3}}', lease=lease)
    await writer.put(f"{root}/text", b'{"a":1}')
    await writer.put(f"{root}/record", b'{"b":{"c":2}}')  # fields removed, and no lease now
    await writer.put(f"{root}/text", b"a")  # no longer a JSON object
    for key, value in ((f"{root}/record", b'{"b":{"c":2}}'), (f"{root}/text", b"a")):
        for store in (writer, reader):
            kv = await store.get(key)
            assert kv is not None, key
            assert (kv.value, kv.lease) == (value, None), kv
    items, _ = await reader.list(root)
    assert [kv.value for kv in items] == [b'{"b":{"c":2}}', b"a"], items
    await writer.revoke_lease(lease)  # the lease no longer holds the key
    assert await reader.get(f"{root}/record") is not None, "revoking an old lease deleted it"


@store_check()
async def create_after_delete_succeeds(s: StoreSession) -> None:
    """create refuses an existing key (KeyExists naming it) and succeeds once it is deleted."""
    store, key = await s.store(), f"{s.root}/k"
    await store.create(key, b"1")
    with raises(KeyExists) as info:
        await store.create(key, b"2")
    assert info.value.key == key, info.value.key
    assert await store.delete(key)
    await store.create(key, b"3")
    kv = await store.get(key)
    assert kv is not None
    assert kv.value == b"3", kv


@store_check()
async def prefixes_respect_path_boundaries(s: StoreSession) -> None:
    """A prefix is a subtree: ``ns/comp`` covers ``ns/comp/...``, not ``ns/comp2`` nor itself."""
    store, root = await s.store(), s.root
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
        assert [kv.key for kv in items] == sorted(inside), (prefix, items)

    watch = s.reader(store.watch(f"{root}/ns/comp/"))
    snapshot = await watch.snapshot()
    assert sorted(kv.key for kv in snapshot.items) == sorted(inside), snapshot

    await store.put(f"{root}/ns/comp2/c", b"no")
    await store.put(f"{root}/ns/compx", b"no")
    await store.put(f"{root}/ns/comp", b"no, again")
    await store.put(f"{root}/ns/comp/b", b"yes")
    event = await watch.next()
    assert isinstance(event, Put), event
    assert event.key == f"{root}/ns/comp/b", event


@store_check()
async def every_read_tells_the_lease_a_key_is_bound_to(s: StoreSession) -> None:
    """Snapshots, list, get and watch events tell leased keys from keys bound to no lease."""
    writer, reader = await s.store(), await s.store()
    root = s.root
    lease = await writer.grant_lease(30.0)
    await writer.put(f"{root}/leased", b"1", lease=lease)
    await writer.put(f"{root}/by-hand", b"2")
    watch = s.reader(reader.watch(root))
    snapshot = await watch.snapshot()
    expected = {f"{root}/leased": lease, f"{root}/by-hand": None}
    assert {kv.key: kv.lease for kv in snapshot.items} == expected, snapshot
    items, _ = await reader.list(root)
    assert {kv.key: kv.lease for kv in items} == expected, items
    by_hand, leased = await reader.get(f"{root}/by-hand"), await reader.get(f"{root}/leased")
    assert by_hand is not None
    assert by_hand.lease is None, by_hand
    assert leased is not None
    assert leased.lease == lease, leased

    await writer.put(f"{root}/leased", b"rewritten without a lease")
    event = await watch.next()
    assert isinstance(event, Put), event
    assert (event.key, event.kv.lease) == (f"{root}/leased", None), event
    await writer.put(f"{root}/by-hand", b"now leased", lease=lease)
    event = await watch.next()
    assert isinstance(event, Put), event
    assert (event.key, event.kv.lease) == (f"{root}/by-hand", lease), event


@store_check()
async def keep_alive_of_an_unknown_lease_raises_lease_lost(s: StoreSession) -> None:
    """keep_alive of a lease nobody granted raises LeaseLost naming it."""
    store = await s.store()
    with raises(LeaseLost) as info:
        await store.keep_alive(7_777_777_777)
    assert info.value.lease_id == 7_777_777_777, info.value.lease_id


@store_check("unreachable")
async def an_unreachable_store_raises_discovery_unavailable(s: StoreSession) -> None:
    """connect() to a backend that does not answer: DiscoveryUnavailable within 3 s, naming
    the backend and its endpoint; the unconnected store refuses work with DiscoveryError."""
    assert s.subject.unreachable is not None
    unreachable = s.subject.unreachable()
    store, endpoint = unreachable.store, unreachable.endpoint
    try:
        started = time.monotonic()
        with raises(DiscoveryUnavailable) as info:
            await store.connect()
        took = time.monotonic() - started
        assert took < 3.0, f"connect took {took:.2f} s: not within its connect timeout"
        assert info.value.backend == s.subject.backend, info.value.backend
        assert info.value.endpoints == (endpoint,), info.value.endpoints
        assert endpoint in str(info.value), str(info.value)
        with raises(DiscoveryError, "a put on a store never connected"):
            await store.put("/k", b"v")
    finally:
        await store.close()


KEY_CHECKS = (
    put_get_delete_list,
    another_store_sees_the_writes,
    concurrent_create_of_one_key_has_exactly_one_winner,
    put_overwrites_with_a_smaller_value,
    create_after_delete_succeeds,
    prefixes_respect_path_boundaries,
    every_read_tells_the_lease_a_key_is_bound_to,
    keep_alive_of_an_unknown_lease_raises_lease_lost,
    an_unreachable_store_raises_discovery_unavailable,
)
"""The checks of this module, in the order they run."""
