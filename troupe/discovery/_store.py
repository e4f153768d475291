"""The discovery plane's seam: the asyncio ``KeyValueStore`` interface every backend implements.

A store holds keys (``str``) mapped to values (``bytes``), optionally bound to a *lease*: a lease
lives while someone calls :meth:`KeyValueStore.keep_alive` at least once per TTL; when it expires
or is revoked, every key bound to it disappears and watchers see a :class:`Delete`. The LeaseActor
drives ``grant_lease``/``keep_alive``/``revoke_lease``; the WatcherActor consumes
:meth:`KeyValueStore.watch`, which yields a :class:`Snapshot` of the prefix first and then
:class:`Put`/:class:`Delete` events with no gap between the two (revision-based), and raises
:class:`~troupe.errors.DiscoveryUnavailable` when the connection to the store is lost (the caller
watches again and diffs the new snapshot against what it knew).

A prefix names a subtree: ``ns/comp`` (or ``ns/comp/``) matches the keys below it,
``ns/comp/...``, never ``ns/comp`` itself nor ``ns/comp2/...``; the empty prefix matches every key.
So a store reads no key outside ``ns/comp/``: an etcd user granted only that prefix (``etcdctl
role grant-permission ROLE readwrite ns/comp/ --prefix``) may list and watch it.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import ClassVar, Protocol, Self

import msgspec

from troupe.errors import DiscoveryError, DiscoveryUnavailable

__all__ = [
    "Delete",
    "KeyValue",
    "KeyValueStore",
    "MonotonicClock",
    "Put",
    "Snapshot",
    "TimeSource",
    "Watch",
    "WatchEvent",
    "key_matches",
    "normalize_prefix",
]


class KeyValue(msgspec.Struct, frozen=True):
    """One stored key: its value, the store revision that last wrote it, and its lease.

    ``lease`` is the id of the lease the key is bound to, and None for a key that nothing
    expires (written without a lease, e.g. by hand): routers ignore such instance records.
    """

    key: str
    value: bytes
    revision: int
    lease: int | None = None


class Snapshot(msgspec.Struct, frozen=True, tag=True):
    """First event of every watch: the complete matching set as of ``revision``."""

    items: tuple[KeyValue, ...]
    revision: int


class Put(msgspec.Struct, frozen=True, tag=True):
    """A key was created or updated."""

    kv: KeyValue

    @property
    def key(self) -> str:
        """The key written."""
        return self.kv.key

    @property
    def revision(self) -> int:
        """The store revision of the write."""
        return self.kv.revision


class Delete(msgspec.Struct, frozen=True, tag=True):
    """A key disappeared.

    ``expired`` is True when its lease removed it (the TTL ran out, or the lease was revoked) and
    False when it was deleted explicitly; docs/discovery.md says how each backend tells them apart.
    """

    key: str
    revision: int
    expired: bool = False


WatchEvent = Snapshot | Put | Delete
"""What a watch yields: one :class:`Snapshot`, then :class:`Put` and :class:`Delete` events."""


class TimeSource(Protocol):
    """The part of a clock that stores need: monotonic seconds (troupe's clocks fit)."""

    def now(self) -> float:
        """Seconds on a monotonic scale; only differences matter."""
        ...


class MonotonicClock:
    """The default :class:`TimeSource`: ``time.monotonic``."""

    def now(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()


def normalize_prefix(prefix: str) -> str:
    """Strip trailing ``/`` so that ``ns/comp/`` and ``ns/comp`` name the same subtree."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
    return prefix.rstrip("/")


def key_matches(key: str, prefix: str) -> bool:
    """Whether ``key`` lies below the (normalised) ``prefix``: ``prefix + "/..."``."""
    if not prefix:
        return True
    return key.startswith(prefix + "/")


def check_key(key: str) -> str:
    """Reject keys every backend cannot store: non-strings and the empty string."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, not {type(key).__name__}")
    if not key or key.strip("/") == "":
        raise DiscoveryError(f"invalid key {key!r}: keys must contain something besides '/'")
    return key


class Watch:
    """An open watch: an async iterator of :data:`WatchEvent` that must be closed.

    Use it as ``async with store.watch(prefix) as events: async for event in events: ...``, or
    call :meth:`aclose` when done (from the task that iterates, or after cancelling that task).
    The iteration ends normally when the store is closed by its owner, and raises
    :class:`~troupe.errors.DiscoveryUnavailable` when the connection to the store is lost.
    """

    def __init__(self, events: AsyncGenerator[WatchEvent, None], prefix: str) -> None:
        self._events = events
        self.prefix = prefix

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Stop watching and release the server-side watch."""
        await self._events.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Closed:
    """Marker put in a watch queue when the store was closed by its owner."""


CLOSED = _Closed()
"""Queue item that ends a watch normally (the store was closed on purpose)."""

QueueItem = WatchEvent | DiscoveryError | _Closed


class WatchQueue:
    """The per-watch event queue that backends feed; safe to feed from other threads."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[QueueItem] = asyncio.Queue()

    def put(self, item: QueueItem) -> None:
        """Enqueue from the watch's own event loop."""
        self._queue.put_nowait(item)

    def put_threadsafe(self, item: QueueItem) -> bool:
        """Enqueue from any thread; False when the watch's loop is already closed."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: that watcher is gone
            return False
        return True

    async def get(self) -> QueueItem:
        """Next item, waiting for one."""
        return await self._queue.get()

    def get_nowait(self) -> QueueItem | None:
        """Next item if one is queued."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None


class KeyValueStore(ABC):
    """A key-value store with leases and prefix watches: the discovery plane's only interface.

    Every method is a coroutine for the owning event loop (the runtime's I/O loop). Failures are
    typed: :class:`~troupe.errors.DiscoveryUnavailable` when the store cannot be reached (it names
    the backend and endpoints), :class:`~troupe.errors.LeaseLost` when a lease has expired or was
    revoked, :class:`~troupe.errors.KeyExists` from :meth:`create`, and
    :class:`~troupe.errors.DiscoveryError` for anything else the store refused.
    """

    name: ClassVar[str]
    """Backend name: ``etcd``, ``memory``, ``file`` or ``nats``."""

    exact_history: ClassVar[bool] = True
    """Whether a watch reports every write. False for stores that poll (``file``), or keep one
    value per key (``nats``: a write replaced before a lagging watch read it is gone): they may
    merge several writes to one key into the last, but never miss the final state."""

    @property
    @abstractmethod
    def endpoints(self) -> tuple[str, ...]:
        """Where the store lives (URLs, a directory, ...), for error messages."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abstractmethod
    async def connect(self) -> None:
        """Connect within the configured connect timeout.

        Raises:
            DiscoveryUnavailable: no endpoint answered; the error names every endpoint tried.
        """

    @abstractmethod
    async def close(self) -> None:
        """Disconnect; open watches end normally. Leases are not revoked (they expire)."""

    @abstractmethod
    async def grant_lease(self, ttl: float) -> int:
        """Create a lease that lives ``ttl`` seconds past each keep-alive; return its id.

        etcd and NATS count whole seconds: ``ttl`` is rounded up there.
        """

    @abstractmethod
    async def keep_alive(self, lease: int) -> None:
        """Extend the lease by its TTL.

        Raises:
            LeaseLost: the lease expired or was revoked; its keys are gone.
        """

    @abstractmethod
    async def revoke_lease(self, lease: int) -> None:
        """End the lease now: its keys vanish at once (watchers see ``Delete(expired=True)``).

        Revoking an unknown or already expired lease is not an error.
        """

    @abstractmethod
    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Create or overwrite ``key``; return the revision of the write.

        Raises:
            LeaseLost: ``lease`` is given but no longer alive.
        """

    @abstractmethod
    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Create ``key`` only if it is absent (atomically); return the revision.

        Raises:
            KeyExists: the key is present.
            LeaseLost: ``lease`` is given but no longer alive.
        """

    @abstractmethod
    async def get(self, key: str) -> KeyValue | None:
        """The key's current value, or None."""

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""

    @abstractmethod
    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` (sorted by key) and the store revision they reflect."""

    def watch(self, prefix: str) -> Watch:
        """Watch ``prefix``: a :class:`Snapshot` first, then :class:`Put`/:class:`Delete` events.

        The watch starts on the first ``__anext__``. Events after the snapshot have revisions
        above the snapshot's; no event is lost or repeated between the two.
        """
        normalized = normalize_prefix(prefix)
        return Watch(self._watch(normalized), normalized)

    @abstractmethod
    def _watch(self, prefix: str) -> AsyncGenerator[WatchEvent, None]:
        """The backend's watch generator for a normalised prefix."""

    def _unavailable(self, detail: str) -> DiscoveryUnavailable:
        return DiscoveryUnavailable(self.name, self.endpoints, detail)


async def drain_queue(queue: WatchQueue) -> AsyncGenerator[WatchEvent, None]:
    """Yield a watch queue's events until the store is closed (return) or fails (raise)."""
    while True:
        item = await queue.get()
        if isinstance(item, _Closed):
            return
        if isinstance(item, DiscoveryError):
            raise item
        yield item
