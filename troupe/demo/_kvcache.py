"""A paged KV cache, simulated: what the mock engine holds on its (imaginary) GPU.

Pure bookkeeping, no I/O and no clock: the mock engine (:mod:`troupe.demo.mocker`) asks it to
admit a request's prompt and to release it when the request ends, and publishes what changed.

- The cache has ``num_blocks`` blocks of ``block_size`` tokens. A prompt's full blocks are
  identified by troupe's chained block hashes (the sequence hashes of :mod:`troupe.kv`: a
  block's hash covers every token before it, so equal hashes mean equal prefixes); a partial
  last block takes a block of its own that no other request can share and that is never
  published.
- **Prefix reuse**: the leading blocks of a prompt that the cache already holds are hits; only
  the rest is stored (and must be computed: the engine charges prefill time for those tokens).
- **Reference counts**: a block used by a running request is not evictable. When its last
  request ends it stays cached, evictable, in least-recently-used order.
- **LRU eviction**: admitting a prompt that does not fit evicts unreferenced blocks, oldest
  first. A released request's blocks join the LRU order last block first, so a prefix's tail is
  evicted before its head and what stays cached is always a prefix of what was stored (the
  property routers rely on when they match leading blocks).
- A prompt that cannot fit now (too many blocks referenced) is not admitted (:meth:`admit`
  returns ``None``; the engine queues it); one larger than the whole cache never fits
  (:meth:`fits`).

Each admission says what changed (:class:`Admission`: the runs of blocks stored with their
parent, the blocks evicted) so its caller can publish ``Stored``/``Removed`` events that match
the cache's state exactly. Not thread-safe: its owner serialises calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from troupe.kv import block_hashes

__all__ = ["Admission", "KvCache", "StoredRun"]


@dataclass(frozen=True, slots=True)
class StoredRun:
    """Consecutive blocks newly stored by one admission (one ``Stored`` event).

    Attributes:
        block_hashes: the blocks (their chained sequence hashes), in prompt order.
        parent_hash: the block before the first one in the prompt (``None``: they start it).
    """

    block_hashes: tuple[int, ...]
    parent_hash: int | None


@dataclass(frozen=True, slots=True)
class Admission:
    """What admitting one prompt found and changed.

    Attributes:
        request_id: the id it was admitted under (give it to :meth:`KvCache.release`).
        block_hashes: the prompt's full blocks.
        prompt_tokens: the prompt's length in tokens.
        cached_blocks: its leading blocks the cache already held (prefix hits).
        cached_tokens: the tokens of those blocks: no prefill needed for them.
        stored: the blocks it added, as runs with their parent (normally one run).
        evicted: the blocks evicted to make room, in eviction order.
    """

    request_id: Hashable
    block_hashes: tuple[int, ...]
    prompt_tokens: int
    cached_blocks: int
    cached_tokens: int
    stored: tuple[StoredRun, ...]
    evicted: tuple[int, ...]

    @property
    def uncached_tokens(self) -> int:
        """Prompt tokens to prefill: those past the cached prefix."""
        return self.prompt_tokens - self.cached_tokens


class KvCache:
    """A simulated paged KV cache with prefix reuse, reference counts and LRU eviction.

    Args:
        block_size: tokens per block (>= 1).
        num_blocks: the cache's capacity in blocks (>= 1).

    Raises:
        ValueError: a size below 1.
    """

    def __init__(self, block_size: int, num_blocks: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, not {block_size}")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, not {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._refs: dict[int, int] = {}  # every cached block -> running requests using it
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks, oldest first
        self._held: dict[Hashable, tuple[tuple[int, ...], int]] = {}  # id -> (blocks, partial)
        self._partial = 0  # blocks held by partial last blocks (private to their request)
        self.prompt_tokens = 0
        """Prompt tokens admitted so far (the hit rate's denominator)."""
        self.hit_tokens = 0
        """Prompt tokens found cached so far."""
        self.stored_blocks = 0
        """Blocks stored so far."""
        self.evicted_blocks = 0
        """Blocks evicted so far."""

    # --- state ----------------------------------------------------------------------------------

    @property
    def used_blocks(self) -> int:
        """Blocks holding something: cached (referenced or not) and partial."""
        return len(self._refs) + self._partial

    @property
    def cached_blocks(self) -> int:
        """Blocks held with a hash (published), used or evictable."""
        return len(self._refs)

    @property
    def active_blocks(self) -> int:
        """Blocks used by running requests (not evictable)."""
        return self.used_blocks - len(self._lru)

    @property
    def free_blocks(self) -> int:
        """Blocks holding nothing."""
        return self.num_blocks - self.used_blocks

    @property
    def usage(self) -> float:
        """The fraction of the cache that running requests use (0..1)."""
        return self.active_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        """The fraction of admitted prompt tokens that were cached (0 before any admission)."""
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def running(self) -> int:
        """Requests admitted and not yet released."""
        return len(self._held)

    def cached(self) -> set[int]:
        """Every block hash the cache holds (referenced or evictable): what it has published."""
        return set(self._refs)

    def evictable(self) -> list[int]:
        """The unreferenced blocks, next to be evicted first."""
        return list(self._lru)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a prompt of ``num_tokens`` tokens takes."""
        return -(-num_tokens // self.block_size)

    def fits(self, num_tokens: int) -> bool:
        """Whether a prompt of ``num_tokens`` tokens can ever be admitted (the cache empty)."""
        return self.blocks_for(num_tokens) <= self.num_blocks

    def hashes(self, token_ids: Sequence[int]) -> list[int]:
        """The chained (sequence) hashes of the full blocks of ``token_ids``."""
        return block_hashes(token_ids, self.block_size)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` the cache holds (changes nothing)."""
        count = 0
        for block in hashes:
            if block not in self._refs:
                break
            count += 1
        return count

    # --- changes --------------------------------------------------------------------------------

    def admit(self, request_id: Hashable, token_ids: Sequence[int]) -> Admission | None:
        """Hold the prompt's blocks for ``request_id``, reusing its cached prefix.

        Returns:
            what was found and changed; ``None`` (nothing changed) when the prompt does not fit
            until running requests release blocks.

        Raises:
            ValueError: ``request_id`` is already admitted, or the prompt is larger than the
                whole cache (check :meth:`fits`).
        """
        if request_id in self._held:
            raise ValueError(f"request {request_id!r} is already admitted")
        if not self.fits(len(token_ids)):
            raise ValueError(
                f"a prompt of {len(token_ids)} tokens needs {self.blocks_for(len(token_ids))} "
                f"blocks; the cache has {self.num_blocks}"
            )
        hashes = tuple(block_hashes(token_ids, self.block_size))
        partial = 1 if len(token_ids) % self.block_size else 0
        refs = self._refs
        cached = self.match(hashes)
        reused = {block for block in hashes if block in refs}
        needed = len(set(hashes) - reused) + partial
        reclaimable = len(self._lru) - sum(1 for block in reused if block in self._lru)
        if needed > self.free_blocks + reclaimable:
            return None
        for block in reused:  # referenced first: what this prompt reuses is not evicted
            self._lru.pop(block, None)
        evicted: list[int] = []
        while self.free_blocks < needed:
            block, _ = self._lru.popitem(last=False)
            del refs[block]
            evicted.append(block)
        runs: list[StoredRun] = []
        first = -1  # where the run of new blocks being collected starts
        for index, block in enumerate(hashes):
            if block in refs:
                refs[block] += 1
                if first >= 0:
                    runs.append(_run(hashes, first, index))
                    first = -1
            else:
                refs[block] = 1
                if first < 0:
                    first = index
        if first >= 0:
            runs.append(_run(hashes, first, len(hashes)))
        self._partial += partial
        self._held[request_id] = (hashes, partial)
        cached_tokens = cached * self.block_size
        self.prompt_tokens += len(token_ids)
        self.hit_tokens += cached_tokens
        self.stored_blocks += sum(len(r.block_hashes) for r in runs)
        self.evicted_blocks += len(evicted)
        return Admission(
            request_id, hashes, len(token_ids), cached, cached_tokens, tuple(runs), tuple(evicted)
        )

    def release(self, request_id: Hashable) -> None:
        """``request_id`` ended: its blocks stay cached, evictable once no request uses them.

        Unknown ids are ignored (releasing twice is harmless).
        """
        held = self._held.pop(request_id, None)
        if held is None:
            return
        hashes, partial = held
        self._partial -= partial
        refs = self._refs
        for block in reversed(hashes):  # the tail first: it is evicted before its prefix
            left = refs[block] - 1
            refs[block] = left
            if left == 0:
                self._lru[block] = None
                self._lru.move_to_end(block)

    def clear(self) -> list[int]:
        """Evict every unreferenced block; return them (in eviction order)."""
        evicted = list(self._lru)
        for block in evicted:
            del self._refs[block]
        self._lru.clear()
        self.evicted_blocks += len(evicted)
        return evicted


def _run(hashes: tuple[int, ...], first: int, end: int) -> StoredRun:
    return StoredRun(hashes[first:end], hashes[first - 1] if first else None)
