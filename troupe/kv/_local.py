"""The worker's own view of its KV cache: what it holds, and its recent events.

A :class:`LocalKvIndexer` is what a worker answers recovery queries from (NVIDIA Dynamo's
``LocalKvIndexer``): the sequence hashes it holds per data-parallel rank with each block's parent
and local hash, and the last ``ring_size`` events in a ring. A follower that lost events asks for
a range (:meth:`LocalKvIndexer.events_between`); once the ring no longer holds it, it asks for a
:meth:`LocalKvIndexer.dump`, events that rebuild the whole state.

Thread-safe: an engine's thread applies events while the I/O loop answers queries.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque

from troupe.errors import InvalidRequest
from troupe.kv._events import Cleared, KvCacheEvent, Removed, Stored, StoredBlock

__all__ = ["DEFAULT_RING_SIZE", "LocalKvIndexer"]

DEFAULT_RING_SIZE = 1024
"""How many recent events a worker keeps for range queries."""

# One held block: (parent sequence hash or None, local hash or None).
_Block = tuple[int | None, int | None]


class LocalKvIndexer:
    """Which blocks this worker holds, and its last ``ring_size`` events.

    Args:
        ring_size: how many recent events :meth:`events_between` can answer from.

    Raises:
        InvalidRequest: ``ring_size`` < 1.
    """

    def __init__(self, ring_size: int = DEFAULT_RING_SIZE) -> None:
        if ring_size < 1:
            raise InvalidRequest(f"ring_size must be >= 1, not {ring_size}", param="ring_size")
        self.ring_size = ring_size
        self._lock = threading.Lock()
        self._ranks: dict[int, dict[int, _Block]] = {}  # dp_rank -> block hash -> block
        self._ring: deque[KvCacheEvent] = deque(maxlen=ring_size)
        self._last = 0

    @property
    def last_event_id(self) -> int:
        """The id of the last event applied (0: none)."""
        return self._last

    def apply(self, event: KvCacheEvent) -> None:
        """Apply the worker's next event (its id must be :attr:`last_event_id` + 1).

        Raises:
            InvalidRequest: the event is not the next one.
        """
        with self._lock:
            if event.event_id != self._last + 1:
                raise InvalidRequest(
                    f"event {event.event_id} is not the next one (last applied: {self._last})",
                    param="event_id",
                )
            self._apply(event)
            self._ring.append(event)
            self._last = event.event_id

    def _apply(self, event: KvCacheEvent) -> None:
        match event.data:
            case Stored(parent_hash=parent, blocks=blocks):
                held = self._ranks.setdefault(event.dp_rank, {})
                for block in blocks:
                    held[block.block_hash] = (parent, block.tokens_hash)
                    parent = block.block_hash
            case Removed(block_hashes=hashes):
                held = self._ranks.get(event.dp_rank, {})
                for block_hash in hashes:
                    held.pop(block_hash, None)
            case Cleared():
                self._ranks.pop(event.dp_rank, None)

    def blocks(self, dp_rank: int | None = None) -> set[int]:
        """The sequence hashes held (of one rank, or of every rank)."""
        with self._lock:
            if dp_rank is not None:
                return set(self._ranks.get(dp_rank, ()))
            return {h for held in self._ranks.values() for h in held}

    def __len__(self) -> int:
        with self._lock:
            return sum(len(held) for held in self._ranks.values())

    def events_between(self, first: int, last: int) -> list[KvCacheEvent] | None:
        """The events ``first`` .. ``last`` (inclusive), or None when the ring no longer holds
        all of them (or ``last`` is beyond :attr:`last_event_id`): ask for a :meth:`dump`."""
        with self._lock:
            if first > last:
                return []
            if not self._ring or first < self._ring[0].event_id or last > self._last:
                return None
            start = first - self._ring[0].event_id
            return list(itertools.islice(self._ring, start, start + last - first + 1))

    def dump(self) -> tuple[list[KvCacheEvent], int]:
        """Events that rebuild the whole state from nothing, and the last event id they cover.

        Each block comes after its parent (when the parent is held), in ``Stored`` events of
        chains; every dump event carries that last event id as its ``event_id``.
        """
        with self._lock:
            last = self._last
            ranks = {rank: dict(held) for rank, held in self._ranks.items() if held}
        events: list[KvCacheEvent] = []
        for rank in sorted(ranks):
            events.extend(KvCacheEvent(last, stored, rank) for stored in _chains(ranks[rank]))
        return events, last


def _chains(held: dict[int, _Block]) -> list[Stored]:
    """``Stored`` events that rebuild ``held``, parents first, runs of single children merged."""
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for block_hash, (parent, _) in held.items():
        if parent is not None and parent in held and parent != block_hash:
            children.setdefault(parent, []).append(block_hash)
        else:
            roots.append(block_hash)
    stored: list[Stored] = []
    seen: set[int] = set()
    stack = list(reversed(roots))
    while stack:
        head = stack.pop()
        if head in seen:
            continue
        chain = [head]
        seen.add(head)
        while len(kids := children.get(chain[-1], [])) == 1 and kids[0] not in seen:
            chain.append(kids[0])
            seen.add(kids[0])
        stored.append(_stored(held, chain))
        stack.extend(reversed([k for k in children.get(chain[-1], []) if k not in seen]))
    # Only a hash collision can make a cycle, which no root reaches: keep those blocks too.
    stored.extend(_stored(held, [h]) for h in held if h not in seen)
    return stored


def _stored(held: dict[int, _Block], chain: list[int]) -> Stored:
    return Stored(held[chain[0]][0], [StoredBlock(h, held[h][1]) for h in chain])
