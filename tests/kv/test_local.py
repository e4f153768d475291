"""LocalKvIndexer: state per rank, the ring of recent events, dumps that rebuild the state."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe.errors import InvalidRequest
from troupe.kv import (
    Cleared,
    KvCacheEvent,
    KvEventData,
    KvView,
    LocalKvIndexer,
    Removed,
    Stored,
    StoredBlock,
    block_hashes,
)


def stored(hashes: list[int], parent: int | None = None) -> Stored:
    return Stored(parent, [StoredBlock(h, h ^ 1) for h in hashes])


def feed(indexer: LocalKvIndexer, *data: KvEventData, dp_rank: int = 0) -> None:
    for item in data:
        indexer.apply(KvCacheEvent(indexer.last_event_id + 1, item, dp_rank))


def rebuilt(indexer: LocalKvIndexer) -> dict[int, set[int]]:
    """What a follower that applies the dump holds, per rank."""
    events, _ = indexer.dump()
    view = KvView()
    for event in events:
        view.apply("w", event)
    return {rank: view.blocks("w", rank) for rank in (0, 1, 2)}


def test_stored_removed_cleared_per_rank() -> None:
    indexer = LocalKvIndexer()
    feed(indexer, stored([1, 2, 3]), stored([4], parent=3), Removed([2, 99]))
    feed(indexer, stored([10, 11]), dp_rank=1)
    assert indexer.blocks(0) == {1, 3, 4}
    assert indexer.blocks(1) == {10, 11}
    assert indexer.blocks() == {1, 3, 4, 10, 11}
    assert len(indexer) == 5
    feed(indexer, Cleared(), dp_rank=1)
    assert indexer.blocks() == {1, 3, 4}
    assert indexer.last_event_id == 5


def test_events_must_come_in_order() -> None:
    indexer = LocalKvIndexer()
    with pytest.raises(InvalidRequest, match="not the next one"):
        indexer.apply(KvCacheEvent(2, Cleared()))
    feed(indexer, Cleared())
    with pytest.raises(InvalidRequest, match="not the next one"):
        indexer.apply(KvCacheEvent(1, Cleared()))


def test_the_ring_answers_ranges_it_still_holds() -> None:
    indexer = LocalKvIndexer(ring_size=4)
    feed(indexer, *(stored([n]) for n in range(1, 11)))  # events 1 .. 10; the ring holds 7 .. 10
    got = indexer.events_between(7, 10)
    assert got is not None
    assert [e.event_id for e in got] == [7, 8, 9, 10]
    assert [e.event_id for e in indexer.events_between(8, 9) or []] == [8, 9]
    assert indexer.events_between(6, 8) is None  # 6 fell out of the ring
    assert indexer.events_between(9, 11) is None  # 11 does not exist yet
    assert indexer.events_between(5, 4) == []


def test_an_empty_indexer_has_no_range_and_an_empty_dump() -> None:
    indexer = LocalKvIndexer()
    assert indexer.events_between(1, 1) is None
    assert indexer.dump() == ([], 0)


def test_ring_size_must_be_positive() -> None:
    with pytest.raises(InvalidRequest, match="ring_size"):
        LocalKvIndexer(ring_size=0)


def test_a_dump_puts_parents_first_and_merges_chains() -> None:
    indexer = LocalKvIndexer()
    # A tree: 1 -> 2 -> 3, and 2 -> 4 -> 5 (a branch), plus 7 whose parent 6 was evicted.
    feed(indexer, stored([1, 2, 3]), stored([4, 5], parent=2), stored([6, 7]), Removed([6]))
    events, last = indexer.dump()
    assert last == 4
    assert all(e.event_id == 4 for e in events)
    chains = [(e.data.parent_hash, [b.block_hash for b in e.data.blocks]) for e in events]
    assert sorted(chains, key=str) == sorted(
        [(None, [1, 2]), (2, [3]), (2, [4, 5]), (6, [7])], key=str
    )
    position = {h: i for i, (_, blocks) in enumerate(chains) for h in blocks}
    assert position[2] < position[3]
    assert position[2] < position[4]
    tokens = {b.block_hash: b.tokens_hash for e in events for b in e.data.blocks}
    assert tokens == {h: h ^ 1 for h in (1, 2, 3, 4, 5, 7)}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_dump_rebuilds_exactly_the_state(data: st.DataObject) -> None:
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    indexer = LocalKvIndexer(ring_size=8)
    for _ in range(data.draw(st.integers(0, 40))):
        rank = rng.choice([0, 0, 1])
        held = sorted(indexer.blocks(rank))
        roll = rng.random()
        if roll < 0.6:
            parent = rng.choice([None, *held]) if held else None
            tokens = [rng.randrange(50) for _ in range(4 * rng.randint(1, 3))]
            hashes = block_hashes(tokens, 4, parent)
            feed(indexer, stored(hashes, parent), dp_rank=rank)
        elif roll < 0.95 and held:
            feed(indexer, Removed(rng.sample(held, rng.randint(1, len(held)))), dp_rank=rank)
        else:
            feed(indexer, Cleared(), dp_rank=rank)
    assert rebuilt(indexer) == {rank: indexer.blocks(rank) for rank in (0, 1, 2)}
