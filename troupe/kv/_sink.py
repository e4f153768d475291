"""Where a follower's events go: the :class:`KvSink` seam and the simple :class:`KvView`.

A :class:`~troupe.kv.KvFollower` turns the event stream into ordered, gap-free calls on a sink:
``apply(worker, event)`` for each worker's events in ``event_id`` order (after a recovery, the
events of a dump: ``remove_worker`` first, then the dump's ``Stored`` events), and
``remove_worker`` when the worker leaves. A KV router's radix index is one sink; :class:`KvView`
(which blocks each worker holds) is the simplest, for tests and for tools.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

from troupe.kv._events import Cleared, KvCacheEvent, Removed, Stored, StoredBlock

__all__ = ["KvSink", "KvView"]


class KvSink(ABC):
    """Receives each worker's KV events in order, from the follower's event loop."""

    @abstractmethod
    def apply(self, worker: str, event: KvCacheEvent) -> None:
        """Apply ``worker``'s next event (or an event of its dump)."""

    @abstractmethod
    def remove_worker(self, worker: str) -> None:
        """Forget everything about ``worker`` (it left, or a dump is about to replace it)."""

    def export(self, worker: str) -> list[KvCacheEvent] | None:
        """Events that rebuild what this sink holds for ``worker`` (applied after
        ``remove_worker``), for a follower's snapshots; None: this sink cannot say, and a
        follower into it keeps no snapshots."""
        return None


class KvView(KvSink):
    """Which sequence hashes each worker holds, per data-parallel rank; readable from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, dict[int, set[int]]] = {}  # worker -> dp_rank -> hashes

    def apply(self, worker: str, event: KvCacheEvent) -> None:
        with self._lock:
            match event.data:
                case Stored(blocks=blocks):
                    ranks = self._held.setdefault(worker, {})
                    ranks.setdefault(event.dp_rank, set()).update(b.block_hash for b in blocks)
                case Removed(block_hashes=hashes):
                    held = self._held.get(worker, {}).get(event.dp_rank)
                    if held is not None:
                        held.difference_update(hashes)
                case Cleared():
                    self._held.get(worker, {}).pop(event.dp_rank, None)

    def remove_worker(self, worker: str) -> None:
        with self._lock:
            self._held.pop(worker, None)

    def export(self, worker: str) -> list[KvCacheEvent]:
        """One ``Stored`` event per rank with every hash held (the view keeps no parents)."""
        with self._lock:
            ranks = {rank: sorted(held) for rank, held in self._held.get(worker, {}).items()}
        return [
            KvCacheEvent(0, Stored(None, [StoredBlock(h) for h in held]), rank)
            for rank, held in sorted(ranks.items())
            if held
        ]

    def workers(self) -> set[str]:
        """The workers the view has seen (and not removed)."""
        with self._lock:
            return set(self._held)

    def blocks(self, worker: str, dp_rank: int | None = None) -> set[int]:
        """The sequence hashes ``worker`` holds (of one rank, or of every rank)."""
        with self._lock:
            ranks = self._held.get(worker, {})
            if dp_rank is not None:
                return set(ranks.get(dp_rank, ()))
            return {h for held in ranks.values() for h in held}

    def snapshot(self) -> dict[str, set[int]]:
        """Every worker's sequence hashes (all ranks together)."""
        with self._lock:
            return {
                worker: {h for held in ranks.values() for h in held}
                for worker, ranks in self._held.items()
            }
