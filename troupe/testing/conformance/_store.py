"""The store kit's subject: :class:`StoreUnderTest` (how to build stores of the backend checked,
and what it supports), and the per-check session that connects them and closes them again.

The checks themselves live in :mod:`troupe.testing.conformance._store_keys` (reads and
writes, prefixes, leases on keys, an unreachable backend) and
:mod:`troupe.testing.conformance._store_watches` (snapshot-then-events, lease expiry and
revocation, closing).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from troupe.discovery import KeyValueStore, Watch
from troupe.testing.conformance._check import Check
from troupe.testing.conformance._watch import WatchReader

__all__ = ["StoreSession", "StoreUnderTest", "UnreachableStore", "store_check"]


@dataclass(frozen=True)
class UnreachableStore:
    """A store whose backend does not answer, and the endpoint its error must name.

    Attributes:
        store: a new, unconnected store; ``connect()`` must raise
            :class:`~troupe.errors.DiscoveryUnavailable` within 3 s.
        endpoint: what the error's ``endpoints`` holds (a URL, a path).
    """

    store: KeyValueStore
    endpoint: str


@dataclass(frozen=True)
class StoreUnderTest:
    """The store a kit checks: a factory of its stores, and what its backend supports.

    Every store the factory makes sees the same data (one etcd cluster, one directory, one
    bucket). Each check connects the stores it needs, works under a key prefix of its own, and
    closes them when it ends. The flags turn off the checks whose property the backend lacks.

    Attributes:
        store: builds a new, unconnected store of the backend.
        backend: the backend's name, as its ``DiscoveryUnavailable`` errors report it.
        ttl_leases: leases expire when nobody keeps them alive for their TTL.
        atomic_create: ``create`` of one key from several stores at once has one winner.
        shared_revisions: watch events carry the revisions that ``get``/``list`` report (not
            numbers of the watch's own).
        unreachable: builds a store whose backend does not answer.
    """

    store: Callable[[], KeyValueStore]
    backend: str
    ttl_leases: bool = True
    atomic_create: bool = True
    shared_revisions: bool = True
    unreachable: Callable[[], UnreachableStore] | None = None


class StoreSession:
    """What one check uses of the backend: a key prefix of its own, connected stores and watch
    readers; everything is closed when the check ends."""

    def __init__(self, subject: StoreUnderTest, stack: contextlib.AsyncExitStack) -> None:
        self.subject = subject
        self.root = f"/conformance-{uuid.uuid4().hex[:10]}"
        """The key prefix of this check: other checks on the same backend never touch it."""
        self._stack = stack

    async def store(self) -> KeyValueStore:
        """A new, connected store."""
        store = self.subject.store()
        await store.connect()
        self._stack.push_async_callback(store.close)
        return store

    def reader(self, watch: Watch) -> WatchReader:
        """Read ``watch`` with deadlines (closed when the check ends)."""
        reader = WatchReader(watch)
        self._stack.push_async_callback(reader.close)
        return reader


def store_check(
    *needs: str,
) -> Callable[[Callable[[StoreSession], Awaitable[None]]], Check[StoreUnderTest]]:
    """Make a :class:`Check` of an async function of a :class:`StoreSession`; its name is the
    function's, its doc the docstring's first line."""

    def wrap(func: Callable[[StoreSession], Awaitable[None]]) -> Check[StoreUnderTest]:
        async def run(subject: StoreUnderTest) -> None:
            async with contextlib.AsyncExitStack() as stack:
                await func(StoreSession(subject, stack))

        doc = (func.__doc__ or "").strip().split("\n")[0]
        return Check(func.__name__, doc, needs, run)

    return wrap
