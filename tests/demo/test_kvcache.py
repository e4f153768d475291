"""The mock engine's paged KV cache: prefix hits, LRU eviction, reference counts, capacity, and
the changes it reports (which must rebuild its state exactly)."""

from __future__ import annotations

import random

import pytest

from troupe.demo._kvcache import Admission, KvCache
from troupe.kv import block_hashes

BS = 4


def tokens(*blocks: int, extra: int = 0) -> list[int]:
    """Full blocks, block ``b`` being ``[b*100, b*100+1, ...]``, then ``extra`` tokens."""
    ids = [b * 100 + i for b in blocks for i in range(BS)]
    return ids + [9_000 + i for i in range(extra)]


def chained(ids: list[int]) -> tuple[int, ...]:
    return tuple(block_hashes(ids, BS))


class View:
    """What a follower of the cache's changes knows: rebuilt from admissions alone."""

    def __init__(self) -> None:
        self.blocks: set[int] = set()

    def apply(self, admission: Admission) -> None:
        for block in admission.evicted:
            assert block in self.blocks, "evicted a block never stored"
            self.blocks.remove(block)
        for run in admission.stored:
            assert run.parent_hash is None or run.parent_hash in self.blocks
            assert not self.blocks & set(run.block_hashes), "stored a block twice"
            self.blocks.update(run.block_hashes)

    def clear(self, evicted: list[int]) -> None:
        self.blocks.difference_update(evicted)


def admit(cache: KvCache, view: View, rid: object, ids: list[int]) -> Admission:
    admission = cache.admit(rid, ids)
    assert admission is not None
    view.apply(admission)
    return admission


def test_a_shared_prefix_is_a_hit_and_only_the_rest_is_stored() -> None:
    cache, view = KvCache(BS, 16), View()
    first = admit(cache, view, "a", tokens(1, 2, 3))
    assert (first.cached_blocks, first.cached_tokens, first.uncached_tokens) == (0, 0, 12)
    [run] = first.stored
    assert run.parent_hash is None
    assert run.block_hashes == chained(tokens(1, 2, 3))
    cache.release("a")

    second = admit(cache, view, "b", tokens(1, 2, 7, extra=2))
    assert (second.cached_blocks, second.cached_tokens, second.uncached_tokens) == (2, 8, 6)
    [run] = second.stored
    assert run.parent_hash == first.block_hashes[1]  # it follows the shared prefix
    assert run.block_hashes == chained(tokens(1, 2, 7))[2:]
    assert second.evicted == ()
    assert cache.hit_tokens == 8
    assert cache.prompt_tokens == 12 + 14
    assert cache.hit_rate == pytest.approx(8 / 26)
    assert view.blocks == cache.cached()


def test_the_same_blocks_at_another_position_are_not_a_hit() -> None:
    cache = KvCache(BS, 16)
    assert cache.admit("a", tokens(1, 2)) is not None
    cache.release("a")
    other = cache.admit("b", tokens(2, 1))  # same blocks, other order: other prefixes
    assert other is not None
    assert other.cached_blocks == 0


def test_lru_evicts_the_oldest_released_blocks_tail_first() -> None:
    cache, view = KvCache(BS, 4), View()
    a = admit(cache, view, "a", tokens(1, 2))
    cache.release("a")
    b = admit(cache, view, "b", tokens(3, 4))
    cache.release("b")
    assert cache.evictable() == [a.block_hashes[1], a.block_hashes[0], *b.block_hashes[::-1]]

    c = admit(cache, view, "c", tokens(5))
    assert c.evicted == (a.block_hashes[1],)  # a's tail before its head
    d = admit(cache, view, "d", tokens(6))
    assert d.evicted == (a.block_hashes[0],)
    assert view.blocks == cache.cached()
    assert cache.used_blocks == cache.num_blocks


def test_a_hit_refreshes_blocks_in_the_lru_order() -> None:
    cache, view = KvCache(BS, 4), View()
    a = admit(cache, view, "a", tokens(1, 2))
    cache.release("a")
    b = admit(cache, view, "b", tokens(3, 4))
    cache.release("b")
    again = admit(cache, view, "a2", tokens(1, 2))  # a is used again: now the newest
    assert again.cached_blocks == 2
    cache.release("a2")
    c = admit(cache, view, "c", tokens(5, 6))
    assert c.evicted == (b.block_hashes[1], b.block_hashes[0])
    assert set(a.block_hashes) <= cache.cached()


def test_blocks_of_running_requests_are_never_evicted() -> None:
    cache, view = KvCache(BS, 4), View()
    running = admit(cache, view, "running", tokens(1, 2, 3))
    assert cache.active_blocks == 3
    assert cache.admit("big", tokens(4, 5)) is None  # 2 blocks needed, 1 free, none evictable
    assert cache.prompt_tokens == 12  # a refused admission changes nothing
    small = admit(cache, view, "small", tokens(4))
    assert small.evicted == ()
    cache.release("small")
    # running's blocks stay; only small's block can go
    assert cache.admit("big", tokens(6, 7)) is None
    cache.release("running")
    big = admit(cache, view, "big", tokens(6, 7))
    assert big.evicted == (small.block_hashes[0], running.block_hashes[2])
    assert view.blocks == cache.cached()


def test_a_prompt_reusing_evictable_blocks_does_not_evict_them_for_itself() -> None:
    cache, view = KvCache(BS, 3), View()
    a = admit(cache, view, "a", tokens(1, 2))
    cache.release("a")
    b = admit(cache, view, "b", tokens(1, 2, 3))  # needs 1 new block: the free one
    assert (b.cached_blocks, b.evicted) == (2, ())
    cache.release("b")
    c = admit(cache, view, "c", tokens(1, 4, 5))  # 2 new blocks: evicts b's tail and a's 2nd
    assert c.cached_blocks == 1
    assert c.evicted == (b.block_hashes[2], a.block_hashes[1])
    assert view.blocks == cache.cached()


def test_a_partial_last_block_takes_a_private_block() -> None:
    cache, view = KvCache(BS, 3), View()
    a = admit(cache, view, "a", tokens(1, extra=3))
    assert len(a.block_hashes) == 1
    assert (cache.used_blocks, cache.active_blocks, cache.cached_blocks) == (2, 2, 1)
    assert cache.usage == pytest.approx(2 / 3)
    b = cache.admit("b", tokens(1, extra=1))  # shares block 1, needs a partial block of its own
    assert b is not None
    assert (b.cached_blocks, b.stored) == (1, ())
    assert cache.admit("c", tokens(extra=1)) is None  # all three blocks taken
    cache.release("a")
    cache.release("b")
    assert (cache.used_blocks, cache.active_blocks, cache.usage) == (1, 0, 0.0)


def test_capacity_is_checked() -> None:
    cache = KvCache(BS, 2)
    assert (cache.fits(8), cache.fits(9)) == (True, False)
    with pytest.raises(ValueError, match="needs 3 blocks; the cache has 2"):
        cache.admit("x", tokens(1, 2, extra=1))
    assert cache.admit("x", tokens(1, 2)) is not None
    with pytest.raises(ValueError, match="already admitted"):
        cache.admit("x", tokens(3))
    with pytest.raises(ValueError, match="block_size"):
        KvCache(0, 1)
    with pytest.raises(ValueError, match="num_blocks"):
        KvCache(1, 0)


def test_release_is_idempotent_and_clear_drops_only_unused_blocks() -> None:
    cache, view = KvCache(BS, 8), View()
    admit(cache, view, "a", tokens(1, 2))
    kept = admit(cache, view, "b", tokens(3))
    cache.release("a")
    cache.release("a")
    cache.release("unknown")
    view.clear(cache.clear())
    assert cache.cached() == view.blocks == set(kept.block_hashes)
    assert cache.evicted_blocks == 2


@pytest.mark.parametrize("seed", range(5))
def test_random_workloads_respect_capacity_and_report_every_change(seed: int) -> None:
    rng = random.Random(seed)
    cache, view = KvCache(BS, 24), View()
    prefixes = [tokens(*range(p * 10, p * 10 + rng.randint(1, 6))) for p in range(5)]
    running: list[int] = []
    for rid in range(400):
        if running and (rng.random() < 0.5 or len(running) > 6):
            cache.release(running.pop(rng.randrange(len(running))))
        ids = rng.choice(prefixes)[: rng.randint(1, 24)] + tokens(rid + 1000)[: rng.randint(0, 7)]
        admission = cache.admit(rid, ids)
        if admission is not None:
            view.apply(admission)
            running.append(rid)
            assert admission.cached_blocks == len(admission.block_hashes) - sum(
                len(r.block_hashes) for r in admission.stored
            )
        assert cache.used_blocks <= cache.num_blocks
        assert 0 <= cache.active_blocks <= cache.used_blocks
        assert view.blocks == cache.cached()
    assert 0 < cache.hit_rate < 1
