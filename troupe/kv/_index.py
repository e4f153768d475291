"""The router's KV index: which worker holds which chained block hashes, and prefix matching.

Fed by KV events (``Stored``/``Removed``/``Cleared``, per worker) or, in approximate mode, by the
router's own decisions. :meth:`KvIndex.find_matches` answers, for a request's chained block
hashes, how many leading blocks each worker holds: the overlap the KV policy turns into a cost.

Layout: one dict from block hash to an integer bit mask of the workers that hold it (a worker is a
bit, its *slot*), and per worker the set of its hashes (to drop it whole, and to count its tree).
Because hashes are chained (a block's hash covers every token before it), equal hashes mean
equal prefixes.

Matching relies on caches being *prefix-closed*: a worker that holds block ``i`` of a chain
holds blocks ``0..i-1`` too. vLLM frees a request's blocks tail first, so the tail is evicted
first; SGLang's and TensorRT-LLM's radix caches evict leaves; troupe's mock engine
(:mod:`troupe.demo._kvcache`) keeps prefixes too; approximate mode stores and expires whole
routed prefixes. Then the owner mask along a request never grows (``mask(i + 1)`` is a subset of
``mask(i)``), and equal masks at two positions mean the same mask at every block between them.
So matching does not probe every block: from a position with a known mask it gallops ahead (1,
2, 4, 8, ... blocks) while the mask stays the same, then binary-searches the first block where
it changes; the workers whose bits drop out at block ``i`` hold ``i`` leading blocks. A lookup
costs about ``2 * log2(length)`` probes per run of equal masks it crosses, not one probe per
matched block, and stops when no worker is left.

Where holdings are not prefix-closed (a worker holds block ``i`` but not an earlier block: a
*hole*), the walk may not probe the hole and may count that worker past it: never fewer than its
true leading blocks, never past the first block it lacks among those probed, and it always holds
the block just before its count. Holes arise where the index merges caches: the data-parallel
ranks of one worker are one worker here, so one rank's ``Removed`` drops a block that another
rank may still hold with its successors.

The index's own pruning leaves no hole that is counted past, as long as each block was first
stored after the blocks before it in its chain. Events from prefix-closed caches keep that
order: an engine stores a block again only once everything after it is gone, and storing a held
block again keeps its place. Pruning drops a worker's oldest-stored blocks, so it takes a
chain's head before its tail, and the worker drops out at block 0. (Approximate mode stores a
routed prefix whole: a head pruned from the index and routed again lands after its old tail, so
a later pruning there can leave a hole, to which the bound above applies.)

Memory is bounded: a worker may hold at most ``max_blocks_per_worker`` blocks in the index; past
that, its oldest-stored blocks are pruned (an approximation that only ever under-counts overlap).
Not thread-safe: one owner (the router, on its I/O loop) applies events and looks up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import islice

from troupe.kv._events import Cleared, KvCacheEvent, Removed, Stored, StoredBlock
from troupe.kv._sink import KvSink

__all__ = ["KvIndex"]

_DEFAULT_MAX_BLOCKS = 1 << 20
_NAMES_CACHED = 1024  # masks whose names a lookup keeps at hand


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
        # A mask -> its workers' names, for lookups; emptied when a worker leaves its slot.
        self._names_of: dict[int, tuple[str, ...]] = {}
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
        self._names_of.clear()

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
        """Leading blocks of ``block_hashes`` each worker holds; workers holding none are absent.

        Exact when every worker's holdings are prefix-closed (see the module docstring: vLLM,
        SGLang, TensorRT-LLM and troupe's mock engine keep them so). Otherwise a worker with a
        hole in its chain may be counted past the hole, as the walk probes only some blocks: its
        count is never below its true leading blocks, it holds the block just before its count,
        and it lacks the block at its count (where that block is in ``block_hashes``). A worker
        that lacks block 0 is always absent.
        """
        end = len(block_hashes)
        if not end:
            return {}
        get = self._owners.get
        active = get(block_hashes[0], 0)  # the workers still matching at position ``lo``
        if not active:
            return {}
        names_of = self._names_of.get
        found: dict[str, int] = {}
        last = end - 1
        lo = 0
        while lo < last:
            # Gallop: lo + 1, then 2, 4, 8, ... further (clamped to ``last``) while the mask stays.
            step = 1
            hi = lo + 1
            mask = get(block_hashes[hi], 0)
            while mask == active:
                lo = hi
                if hi == last:
                    break
                step += step
                hi += step
                if hi > last:  # noqa: PLR1730 (min() would be a call per probe)
                    hi = last
                mask = get(block_hashes[hi], 0)
            else:
                # The mask differs at ``hi``: binary-search the first differing block in (lo, hi].
                while hi - lo > 1:
                    mid = (lo + hi) >> 1
                    probe = get(block_hashes[mid], 0)
                    if probe == active:
                        lo = mid
                    else:
                        hi = mid
                        mask = probe
                gone = active & ~mask
                if gone:
                    found.update(dict.fromkeys(names_of(gone) or self._names(gone), hi))
                    active &= mask
                    if not active:
                        return found
                lo = hi
                continue
            break  # the mask held to the last block
        found.update(dict.fromkeys(names_of(active) or self._names(active), end))
        return found

    def _names(self, mask: int) -> tuple[str, ...]:
        """The names of the workers whose slots are in ``mask`` (unknown slots skipped), cached."""
        worker_of_slot = self._worker_of_slot
        names = []
        rest = mask
        while rest:
            low = rest & -rest
            name = worker_of_slot.get(low.bit_length() - 1)
            if name is not None:
                names.append(name)
            rest ^= low
        cache = self._names_of
        if len(cache) >= _NAMES_CACHED:
            cache.clear()
        cache[mask] = held = tuple(names)
        return held

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
