"""The router's KV index: which worker holds which chained block hashes, and prefix matching.

Fed by KV events (``Stored``/``Removed``/``Cleared``, per worker) or, in approximate mode, by the
router's own decisions. :meth:`KvIndex.find_matches` answers, for a request's chained block
hashes, how many leading blocks each worker holds: the overlap the KV policy turns into a cost.

Layout: one dict from block hash to an integer bit mask of the workers that hold it (a worker is a
bit, its *slot*), and per worker the set of its hashes (to drop it whole, and to count its tree).
Because hashes are chained (a block's hash covers every token before it), equal hashes mean
equal prefixes, so matching walks the request's blocks in order and narrows the mask: a worker
whose bit drops out at block ``i`` holds ``i`` leading blocks. The walk stops when no worker is
left, so a lookup costs what the longest match costs, one dict probe per block.

Memory is bounded: a worker may hold at most ``max_blocks_per_worker`` blocks in the index; past
that, its oldest-stored blocks are pruned (an approximation that only ever under-counts overlap).
Not thread-safe: one owner (the router, on its I/O loop) applies events and looks up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import compress, islice
from operator import ne

from troupe.kv._events import Cleared, KvCacheEvent, Removed, Stored, StoredBlock
from troupe.kv._sink import KvSink

__all__ = ["KvIndex"]

_DEFAULT_MAX_BLOCKS = 1 << 20
_CHUNK = 32


class KvIndex(KvSink):
    """Block hash → workers that hold it; per-worker prefix overlap for a request.

    A :class:`~troupe.kv.KvSink`: a :class:`~troupe.kv.KvFollower` feeds it each worker's events
    (data-parallel ranks of one worker are counted as one worker).

    Args:
        max_blocks_per_worker: cap on one worker's blocks in the index; the oldest are pruned
            (to ``prune_to`` of the cap) when it is exceeded.
        prune_to: the fraction of the cap a pruned worker keeps.
    """

    def __init__(
        self, *, max_blocks_per_worker: int = _DEFAULT_MAX_BLOCKS, prune_to: float = 0.8
    ) -> None:
        if max_blocks_per_worker < 1:
            raise ValueError("max_blocks_per_worker must be >= 1")
        if not 0.0 < prune_to <= 1.0:
            raise ValueError("prune_to must be in (0, 1]")
        self._owners: dict[int, int] = {}
        # Per worker: its hashes in insertion order (oldest first), for pruning and removal.
        self._blocks: dict[str, dict[int, None]] = {}
        self._slot: dict[str, int] = {}
        self._worker_of_slot: dict[int, str] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._cap = max_blocks_per_worker
        self._keep = max(1, int(max_blocks_per_worker * prune_to))
        self.pruned = 0
        """Blocks dropped by the per-worker cap since the index was made."""

    # --- workers ----------------------------------------------------------------------------

    def add_worker(self, worker: str) -> None:
        """Make ``worker`` known (holding nothing). Idempotent."""
        if worker in self._slot:
            return
        slot = self._free_slots.pop() if self._free_slots else self._take_slot()
        self._slot[worker] = slot
        self._worker_of_slot[slot] = worker
        self._blocks[worker] = {}

    def _take_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def remove_worker(self, worker: str) -> None:
        """Forget ``worker`` and every block it held. Unknown workers are ignored."""
        slot = self._slot.pop(worker, None)
        if slot is None:
            return
        self._drop(slot, self._blocks.pop(worker))
        del self._worker_of_slot[slot]
        self._free_slots.append(slot)

    def clear_worker(self, worker: str) -> None:
        """``worker`` holds nothing any more (a ``Cleared`` event); it stays known."""
        slot = self._slot.get(worker)
        if slot is None:
            return
        blocks = self._blocks[worker]
        self._drop(slot, blocks)
        blocks.clear()

    def workers(self) -> list[str]:
        """The known workers, sorted."""
        return sorted(self._slot)

    def export(self, worker: str) -> list[KvCacheEvent]:
        """A ``Stored`` event with every hash ``worker`` holds, oldest first: what rebuilds it
        (the :class:`~troupe.kv.KvSink` seam, for a follower's snapshots)."""
        blocks = self._blocks.get(worker)
        return [KvCacheEvent(0, Stored(None, [StoredBlock(h) for h in blocks]))] if blocks else []

    # --- events -----------------------------------------------------------------------------

    def apply(self, worker: str, event: KvCacheEvent) -> None:
        """Apply one of ``worker``'s KV events (the :class:`~troupe.kv.KvSink` seam)."""
        match event.data:
            case Stored(blocks=blocks):
                self.store(worker, [block.block_hash for block in blocks])
            case Removed(block_hashes=hashes):
                self.remove(worker, hashes)
            case Cleared():
                self.clear_worker(worker)

    def store(self, worker: str, block_hashes: Iterable[int]) -> None:
        """``worker`` now holds ``block_hashes`` (a ``Stored`` event). Adds the worker if new."""
        if worker not in self._slot:
            self.add_worker(worker)
        bit = 1 << self._slot[worker]
        owners = self._owners
        blocks = self._blocks[worker]
        get = owners.get
        for block in block_hashes:
            owners[block] = get(block, 0) | bit
            blocks[block] = None
        if len(blocks) > self._cap:
            self._prune(worker, blocks, bit)

    def remove(self, worker: str, block_hashes: Iterable[int]) -> None:
        """``worker`` no longer holds ``block_hashes`` (a ``Removed`` event)."""
        slot = self._slot.get(worker)
        if slot is None:
            return
        clear = ~(1 << slot)
        owners = self._owners
        blocks = self._blocks[worker]
        for block in block_hashes:
            if blocks.pop(block, 0) is None:  # it was there
                left = owners[block] & clear
                if left:
                    owners[block] = left
                else:
                    del owners[block]

    def _prune(self, worker: str, blocks: dict[int, None], bit: int) -> None:
        excess = len(blocks) - self._keep
        oldest = list(islice(blocks, excess))  # a dict keeps insertion order: oldest first
        for block in oldest:
            del blocks[block]
        self._drop(self._slot[worker], oldest)
        self.pruned += excess

    def _drop(self, slot: int, blocks: Iterable[int]) -> None:
        clear = ~(1 << slot)
        owners = self._owners
        for block in blocks:
            left = owners[block] & clear
            if left:
                owners[block] = left
            else:
                del owners[block]

    # --- lookups ----------------------------------------------------------------------------

    def find_matches(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """Leading blocks of ``block_hashes`` each worker holds; workers holding none are absent."""
        get = self._owners.get
        masks: list[int | None] = []
        # Chunks of hashes at C speed; the first unheld hash ends the walk (most prompts share a
        # prefix with some worker, then diverge: the rest need not be looked up).
        for start in range(0, len(block_hashes), _CHUNK):
            chunk = list(map(get, block_hashes[start : start + _CHUNK]))
            try:
                cut = chunk.index(None)
            except ValueError:
                masks += chunk
                continue
            masks += chunk[:cut]
            break
        held = len(masks)
        if not held:
            return {}
        # Runs of equal masks, found at C speed: a worker's depth changes only at a run's start.
        starts = compress(range(1, held), map(ne, masks[: held - 1], masks[1:held]))
        depth_of: dict[int, int] = {}
        active: int = masks[0]  # type: ignore[assignment]  # not None: held > 0
        for start in starts:
            narrowed = active & masks[start]  # type: ignore[operator]
            if narrowed != active:
                _record(active & ~narrowed, start, depth_of)
                active = narrowed
                if not active:
                    break
        else:
            _record(active, held, depth_of)
        names = self._worker_of_slot
        return {names[slot]: depth for slot, depth in depth_of.items() if slot in names}

    def block_count(self, worker: str) -> int:
        """How many blocks ``worker`` holds in the index (0 if unknown)."""
        blocks = self._blocks.get(worker)
        return len(blocks) if blocks is not None else 0

    def block_counts(self) -> Mapping[str, int]:
        """Blocks held per known worker."""
        return {worker: len(blocks) for worker, blocks in self._blocks.items()}

    def holds(self, worker: str, block_hash: int) -> bool:
        """Whether ``worker`` holds ``block_hash`` according to the index."""
        blocks = self._blocks.get(worker)
        return blocks is not None and block_hash in blocks

    def __len__(self) -> int:
        """Distinct block hashes held by any worker."""
        return len(self._owners)


def _record(mask: int, depth: int, depth_of: dict[int, int]) -> None:
    while mask:
        low = mask & -mask
        depth_of[low.bit_length() - 1] = depth
        mask ^= low
