"""The memory store: virtual time, simulated outages, one server shared across event loops."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from troupe._support._clock import VirtualClock
from troupe.discovery import Delete, MemoryKvServer, MemoryStore, Put, Watch
from troupe.errors import DiscoveryUnavailable, LeaseLost

from ._helpers import WatchReader, is_delete

Readers = Callable[[Watch], WatchReader]


async def test_leases_expire_by_the_injected_clock(readers: Readers) -> None:
    clock = VirtualClock()
    server = MemoryKvServer(clock)
    async with MemoryStore(server) as store:
        lease = await store.grant_lease(10.0)
        await store.put("/k/a", b"1", lease=lease)
        watch = readers(store.watch("/k"))
        await watch.snapshot()

        clock.advance(9.0)
        await store.keep_alive(lease)  # deadline now at t=19
        clock.advance(9.0)
        assert await store.get("/k/a") is not None
        clock.advance(1.5)
        assert await store.get("/k/a") is None  # checked on access, no waiting for a reaper
        event = await watch.until(is_delete("/k/a"))
        assert isinstance(event, Delete)
        assert event.expired
        with pytest.raises(LeaseLost):
            await store.keep_alive(lease)


async def test_an_outage_fails_calls_and_watches_while_leases_keep_expiring(
    readers: Readers,
) -> None:
    clock = VirtualClock()
    server = MemoryKvServer(clock, name="mem://a")
    async with MemoryStore(server) as store:
        lease = await store.grant_lease(3.0)
        await store.put("/k/a", b"1", lease=lease)
        watch = readers(store.watch("/k"))
        await watch.snapshot()

        server.set_available(False)
        await watch.ended.wait()
        assert isinstance(watch.error, DiscoveryUnavailable)
        with pytest.raises(DiscoveryUnavailable) as info:
            await store.keep_alive(lease)
        assert info.value.endpoints == ("mem://a",)
        with pytest.raises(DiscoveryUnavailable):
            await anext(store.watch("/k"))

        clock.advance(5.0)
        server.expire_due()  # the "server side" expires the lease during the outage
        server.set_available(True)
        with pytest.raises(LeaseLost):
            await store.keep_alive(lease)
        assert await store.get("/k/a") is None


def test_stores_on_different_event_loops_share_one_server() -> None:
    server = MemoryKvServer()
    watching = threading.Event()
    events: list[object] = []

    async def watcher() -> None:
        async with MemoryStore(server) as store, store.watch("/shared") as watch:
            async for event in watch:
                events.append(event)
                watching.set()
                if isinstance(event, Put):
                    return

    async def writer() -> None:
        async with MemoryStore(server) as store:
            await store.put("/shared/k", b"from another loop")

    with ThreadPoolExecutor(2, thread_name_prefix="memory-loop") as pool:
        watched = pool.submit(asyncio.run, watcher())
        assert watching.wait(5)
        pool.submit(asyncio.run, writer()).result(5)
        watched.result(5)
    assert [type(e).__name__ for e in events] == ["Snapshot", "Put"]


async def test_lease_ttl_must_be_positive() -> None:
    async with MemoryStore() as store:
        with pytest.raises(ValueError, match="ttl"):
            await store.grant_lease(0)
