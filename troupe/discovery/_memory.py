"""The ``memory`` store: one process, for tests and embedding.

:class:`MemoryKvServer` is the "server": the key space, the leases and the watchers, guarded by a
lock so that stores on different event loops (several runtimes in one test process, each with its
own I/O loop thread) can share it. Pass one server to several :class:`MemoryStore` objects to
simulate several processes; nothing is global.

Leases expire by the server's clock (any object with ``now()``, such as
``VirtualClock``), checked on every access and by a reaper task in each connected
store. For fault tests the server
can be taken offline (:meth:`MemoryKvServer.set_available`): operations then raise
``DiscoveryUnavailable``, open watches fail with it, and leases keep expiring, as with a real
server that the process cannot reach.
"""

from __future__ import annotations

import asyncio
import builtins
import heapq
import itertools
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from troupe.discovery._store import (
    CLOSED,
    Delete,
    KeyValue,
    KeyValueStore,
    MonotonicClock,
    Put,
    QueueItem,
    Snapshot,
    TimeSource,
    WatchEvent,
    WatchQueue,
    check_key,
    drain_queue,
    key_matches,
    normalize_prefix,
)
from troupe.errors import DiscoveryUnavailable, KeyExists, LeaseLost

__all__ = ["MemoryKvServer", "MemoryStore"]

_Sink = Callable[[QueueItem], bool]


@dataclass
class _Lease:
    ttl: float
    deadline: float
    keys: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Watcher:
    prefix: str
    sink: _Sink


class MemoryKvServer:
    """Shared in-process state of memory stores: keys, revisions, leases and watchers.

    Thread-safe. Events reach each watcher in revision order on the watcher's own event loop.

    Args:
        clock: the time source leases expire by (default: ``time.monotonic``).
        name: shown in error messages as the store's endpoint.
    """

    def __init__(self, clock: TimeSource | None = None, *, name: str = "memory") -> None:
        self.clock: TimeSource = clock if clock is not None else MonotonicClock()
        self.name = name
        self._lock = threading.RLock()
        self._data: dict[str, KeyValue] = {}
        self._revision = 0
        self._lease_ids = itertools.count(1)
        self._leases: dict[int, _Lease] = {}
        self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, lease); may be stale
        self._watchers: list[_Watcher] = []
        self._available = True

    # --- inspection and fault injection (tests) ---------------------------------------------------

    @property
    def revision(self) -> int:
        """The current store revision (number of writes so far)."""
        with self._lock:
            return self._revision

    @property
    def available(self) -> bool:
        """False while the server is "unreachable" (see :meth:`set_available`)."""
        with self._lock:
            return self._available

    def set_available(self, available: bool) -> None:
        """Simulate an outage (False) or its end (True).

        While unavailable every store operation raises ``DiscoveryUnavailable`` and open watches
        fail with it; leases keep expiring by the clock, so a lease whose owner cannot reach the
        server for longer than its TTL is lost, as on etcd.
        """
        with self._lock:
            if self._available == available:
                return
            self._available = available
            if not available:
                watchers, self._watchers = self._watchers, []
                for watcher in watchers:
                    watcher.sink(
                        DiscoveryUnavailable("memory", (self.name,), "server unavailable (test)")
                    )

    def expire_due(self) -> None:
        """Expire every lease whose deadline has passed on the clock (reapers call this)."""
        with self._lock:
            self._expire_locked()

    # --- operations (called by MemoryStore; synchronous and quick) --------------------------------

    def _check(self) -> None:
        if not self._available:
            raise DiscoveryUnavailable("memory", (self.name,), "server unavailable (test)")
        self._expire_locked()

    def grant(self, ttl: float) -> int:
        """Grant a lease of ``ttl`` seconds; return its id."""
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0, got {ttl!r}")
        with self._lock:
            self._check()
            lease = next(self._lease_ids)
            deadline = self.clock.now() + ttl
            self._leases[lease] = _Lease(ttl, deadline)
            heapq.heappush(self._deadlines, (deadline, lease))
            return lease

    def keep_alive(self, lease: int) -> None:
        """Push the lease's deadline one TTL into the future."""
        with self._lock:
            self._check()
            state = self._live_lease(lease)
            state.deadline = self.clock.now() + state.ttl
            heapq.heappush(self._deadlines, (state.deadline, lease))

    def revoke(self, lease: int) -> None:
        """Delete the lease and its keys now."""
        with self._lock:
            self._check()
            state = self._leases.pop(lease, None)
            if state is not None:
                self._drop_keys(state, expired=True)

    def put(self, key: str, value: bytes, lease: int | None, *, create: bool = False) -> int:
        """Write ``key``; with ``create`` only if absent."""
        with self._lock:
            self._check()
            if lease is not None:
                self._live_lease(lease)
            old = self._data.get(key)
            if create and old is not None:
                raise KeyExists(key)
            if old is not None and old.lease is not None and old.lease != lease:
                old_state = self._leases.get(old.lease)
                if old_state is not None:
                    old_state.keys.discard(key)
            self._revision += 1
            kv = KeyValue(key, bytes(value), self._revision, lease)
            self._data[key] = kv
            if lease is not None:
                self._leases[lease].keys.add(key)
            self._publish(key, Put(kv))
            return self._revision

    def get(self, key: str) -> KeyValue | None:
        """The current entry of ``key``."""
        with self._lock:
            self._check()
            return self._data.get(key)

    def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        with self._lock:
            self._check()
            return self._delete_locked(key, expired=False)

    def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Entries under ``prefix`` and the current revision."""
        with self._lock:
            self._check()
            return self._list_locked(normalize_prefix(prefix)), self._revision

    def subscribe(self, prefix: str, sink: _Sink) -> tuple[Snapshot, object]:
        """Atomically take a snapshot of ``prefix`` and register ``sink`` for later events."""
        with self._lock:
            self._check()
            watcher = _Watcher(prefix, sink)
            self._watchers.append(watcher)
            snapshot = Snapshot(tuple(self._list_locked(prefix)), self._revision)
            return snapshot, watcher

    def unsubscribe(self, token: object) -> None:
        """Forget a watcher registered by :meth:`subscribe`."""
        with self._lock:
            self._watchers = [w for w in self._watchers if w is not token]

    # --- internals (lock held) --------------------------------------------------------------------

    def _live_lease(self, lease: int) -> _Lease:
        state = self._leases.get(lease)
        if state is None:
            raise LeaseLost(lease, "expired or revoked")
        return state

    def _list_locked(self, prefix: str) -> builtins.list[KeyValue]:
        return sorted(
            (kv for key, kv in self._data.items() if key_matches(key, prefix)),
            key=lambda kv: kv.key,
        )

    def _expire_locked(self) -> None:
        now = self.clock.now()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, lease = heapq.heappop(self._deadlines)
            state = self._leases.get(lease)
            if state is not None and state.deadline <= now:
                del self._leases[lease]
                self._drop_keys(state, expired=True)

    def _drop_keys(self, state: _Lease, *, expired: bool) -> None:
        for key in sorted(state.keys):
            self._delete_locked(key, expired=expired)

    def _delete_locked(self, key: str, *, expired: bool) -> bool:
        old = self._data.pop(key, None)
        if old is None:
            return False
        if old.lease is not None and (state := self._leases.get(old.lease)) is not None:
            state.keys.discard(key)
        self._revision += 1
        self._publish(key, Delete(key, self._revision, expired))
        return True

    def _publish(self, key: str, event: WatchEvent) -> None:
        dead = [w for w in self._watchers if key_matches(key, w.prefix) and not w.sink(event)]
        if dead:
            self._watchers = [w for w in self._watchers if w not in dead]


class MemoryStore(KeyValueStore):
    """A :class:`KeyValueStore` on a :class:`MemoryKvServer` (its own, or one shared).

    Args:
        server: the shared state; a private server is created when omitted.
        clock: time source of the private server (ignored when ``server`` is given: leases expire
            by the server's clock).
        reap_interval: seconds between checks for expired leases while connected.
    """

    name = "memory"

    def __init__(
        self,
        server: MemoryKvServer | None = None,
        *,
        clock: TimeSource | None = None,
        reap_interval: float = 0.05,
    ) -> None:
        self.server = server if server is not None else MemoryKvServer(clock)
        self._reap_interval = reap_interval
        self._reaper: asyncio.Task[None] | None = None
        self._queues: set[WatchQueue] = set()
        self._open = False

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (self.server.name,)

    async def connect(self) -> None:
        if not self.server.available:
            raise self._unavailable("server unavailable (test)")
        if self._open:
            return
        self._open = True
        self._reaper = asyncio.create_task(self._reap(), name="MemoryStore-reaper")

    async def close(self) -> None:
        self._open = False
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
        queues, self._queues = self._queues, set()
        for queue in queues:
            queue.put(CLOSED)

    async def _reap(self) -> None:
        while True:
            self.server.expire_due()
            await asyncio.sleep(self._reap_interval)

    def _require_open(self) -> MemoryKvServer:
        if not self._open:
            raise self._unavailable("store is not connected")
        return self.server

    async def grant_lease(self, ttl: float) -> int:
        return self._require_open().grant(ttl)

    async def keep_alive(self, lease: int) -> None:
        self._require_open().keep_alive(lease)

    async def revoke_lease(self, lease: int) -> None:
        self._require_open().revoke(lease)

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        return self._require_open().put(check_key(key), value, lease)

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        return self._require_open().put(check_key(key), value, lease, create=True)

    async def get(self, key: str) -> KeyValue | None:
        return self._require_open().get(check_key(key))

    async def delete(self, key: str) -> bool:
        return self._require_open().delete(check_key(key))

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        return self._require_open().list(prefix)

    async def _watch(self, prefix: str) -> AsyncGenerator[WatchEvent, None]:
        server = self._require_open()
        queue = WatchQueue()
        snapshot, token = server.subscribe(prefix, queue.put_threadsafe)
        self._queues.add(queue)
        try:
            yield snapshot
            async for event in drain_queue(queue):
                yield event
        finally:
            self._queues.discard(queue)
            server.unsubscribe(token)
