"""Store checks, part two: watches and leases — a snapshot then events with no gap, keys that
vanish with their lease (expired or revoked), and a closed store ending its watches."""

from __future__ import annotations

import asyncio
import random

from troupe.discovery import Delete, KeyValue, Put, Snapshot, WatchEvent
from troupe.errors import LeaseLost
from troupe.testing.conformance._check import raises
from troupe.testing.conformance._store import StoreSession, store_check
from troupe.testing.conformance._watch import apply, is_delete

__all__ = ["EXPIRY_DEADLINE", "TTL", "WATCH_CHECKS"]

TTL = 1.0
"""The lease TTL of the expiry check, in seconds (etcd and NATS count whole seconds)."""
EXPIRY_DEADLINE = TTL + 4.0
"""How long an expiry may take to reach a watcher: the TTL, the slowest backend's expiry tick,
and scheduling slack."""


@store_check()
async def watch_from_a_snapshot_misses_and_repeats_nothing(s: StoreSession) -> None:
    """A watch opened while a writer runs: its snapshot plus its events equal the final state,
    in revision order, with nothing missed or repeated."""
    writer, watcher = await s.store(), await s.store()
    root = s.root
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
            await asyncio.sleep(0)  # let the watch start between writes

    writing = asyncio.create_task(write(), name="conformance-writer")
    try:
        await started.wait()
        reader = s.reader(watcher.watch(root))  # the snapshot is taken while the writer runs
        snapshot = await reader.snapshot()
    finally:
        await writing

    expected, _ = await watcher.list(root)
    view: dict[str, KeyValue] = {}
    apply(view, snapshot)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    events: list[WatchEvent] = []

    def same(view: dict[str, KeyValue], expected: list[KeyValue]) -> bool:
        if not s.subject.shared_revisions:  # a watch numbers its own events: compare values
            return {k: kv.value for k, kv in view.items()} == {kv.key: kv.value for kv in expected}
        return view == {kv.key: kv for kv in expected}

    while not same(view, expected):
        event = await reader.next(max(0.0, deadline - loop.time()))
        events.append(event)
        assert not isinstance(event, Snapshot), f"a second snapshot: {event}"
        if isinstance(event, Delete):
            assert event.key in view, f"delete of a key not in the view: {event}"
        else:
            known = view.get(event.key)
            assert known is None or event.revision > known.revision, f"repeated: {event}"
        assert event.revision > snapshot.revision, f"older than the snapshot: {event}"
        apply(view, event)

    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions), f"out of order: {revisions}"
    if type(watcher).exact_history:
        # Every write after the snapshot arrives once, in order.
        seen_puts = [e.revision for e in events if isinstance(e, Put)]
        assert seen_puts == [r for r in put_revisions if r > snapshot.revision], seen_puts


@store_check("ttl_leases")
async def lease_expiry_deletes_keys_and_notifies_watchers(s: StoreSession) -> None:
    """A lease nobody keeps alive expires after its TTL: its keys vanish (``expired`` deletes),
    it is lost for good; a lease kept alive outlives two TTLs."""
    owner, observer = await s.store(), await s.store()
    root = s.root
    watch = s.reader(observer.watch(root))
    await watch.snapshot()
    dying = await owner.grant_lease(TTL)
    living = await owner.grant_lease(TTL)
    await owner.put(f"{root}/dying-1", b"a", lease=dying)
    await owner.put(f"{root}/dying-2", b"b", lease=dying)
    await owner.put(f"{root}/living", b"c", lease=living)
    await owner.put(f"{root}/plain", b"d")
    kv = await observer.get(f"{root}/dying-1")
    assert kv is not None
    assert kv.lease == dying, kv
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def keep_living_alive() -> None:
        while True:
            await asyncio.sleep(TTL / 4)  # the keep-alive period: what a lease owner does
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
            assert event.expired, f"not marked expired: {event}"
            gone.append(event.key)
        assert sorted(gone) == [f"{root}/dying-1", f"{root}/dying-2"], gone
        took = loop.time() - started
        assert took >= TTL * 0.9, f"expired after {took:.2f} s, before its TTL"
        assert await observer.get(f"{root}/dying-1") is None
        with raises(LeaseLost, "keep_alive of an expired lease"):
            await owner.keep_alive(dying)
        with raises(LeaseLost, "put with an expired lease"):
            await owner.put(f"{root}/late", b"x", lease=dying)

        # The kept-alive lease outlives two TTLs: its key is never deleted meanwhile.
        await watch.none_until(is_delete(f"{root}/living"), started + 2 * TTL + 0.5)
        assert not keeper.done(), "keeping the lease alive failed"
        items, _ = await observer.list(root)
        assert [kv.key for kv in items] == [f"{root}/living", f"{root}/plain"], items
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)


@store_check()
async def revoke_deletes_at_once(s: StoreSession) -> None:
    """Revoking a lease deletes its keys at once (``expired`` deletes); an explicit delete is
    not an expiry; revoking twice is harmless."""
    owner, observer = await s.store(), await s.store()
    root = s.root
    lease = await owner.grant_lease(30.0)
    await owner.put(f"{root}/a", b"1", lease=lease)
    await owner.put(f"{root}/b", b"2", lease=lease)
    await owner.put(f"{root}/c", b"3", lease=lease)
    watch = s.reader(observer.watch(root))
    snapshot = await watch.snapshot()
    assert len(snapshot.items) == 3, snapshot

    assert await owner.delete(f"{root}/c")  # an explicit delete is not an expiry
    deleted = await watch.until(is_delete(f"{root}/c"))
    assert isinstance(deleted, Delete)
    assert deleted.expired is False, deleted

    await owner.revoke_lease(lease)
    for _ in range(2):
        event = await watch.until(lambda e: isinstance(e, Delete), timeout=3.0)
        assert isinstance(event, Delete)
        assert event.expired is True, f"removed by its lease, not marked expired: {event}"
    items, _ = await observer.list(root)
    assert items == [], items
    with raises(LeaseLost, "keep_alive of a revoked lease"):
        await owner.keep_alive(lease)
    await owner.revoke_lease(lease)  # revoking twice is harmless


@store_check()
async def closing_the_store_ends_its_watches(s: StoreSession) -> None:
    """A store closed by its owner ends its open watches normally (no error)."""
    store = await s.store()
    await store.put(f"{s.root}/a", b"1")
    reader = s.reader(store.watch(s.root))
    await reader.snapshot()
    await store.close()
    try:
        await asyncio.wait_for(reader.ended.wait(), 5.0)
    except TimeoutError:
        raise AssertionError("the watch did not end within 5 s of close()") from None
    assert reader.error is None, f"the watch failed instead of ending: {reader.error!r}"
    assert len(reader.events) == 1, f"events after close: {reader.events[1:]}"


WATCH_CHECKS = (
    watch_from_a_snapshot_misses_and_repeats_nothing,
    lease_expiry_deletes_keys_and_notifies_watchers,
    revoke_deletes_at_once,
    closing_the_store_ends_its_watches,
)
"""The checks of this module, in the order they run."""
