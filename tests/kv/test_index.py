"""The router's KV index: prefix overlap per worker, events applied, workers dropped, a cap."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe.kv._index import KvIndex


def test_overlap_is_the_number_of_leading_blocks_each_worker_holds() -> None:
    index = KvIndex()
    index.store("a", [1, 2, 3, 4])
    index.store("b", [1, 2])
    index.store("c", [9])
    assert index.find_matches([1, 2, 3, 5]) == {"a": 3, "b": 2}
    assert index.find_matches([1, 2, 3, 4, 6]) == {"a": 4, "b": 2}
    assert index.find_matches([9, 1]) == {"c": 1}
    assert index.find_matches([7, 1, 2]) == {}
    assert index.find_matches([]) == {}


def test_a_hole_in_a_workers_chain_ends_its_match() -> None:
    index = KvIndex()
    index.store("a", [1, 3, 4])  # block 2 evicted before its children
    index.store("b", [1, 2, 3, 4])
    assert index.find_matches([1, 2, 3, 4]) == {"a": 1, "b": 4}


def test_removed_and_cleared_blocks_no_longer_match() -> None:
    index = KvIndex()
    index.store("a", [1, 2, 3])
    index.store("b", [1, 2, 3])
    index.remove("a", [3, 42])  # 42: never stored, ignored
    assert index.find_matches([1, 2, 3]) == {"a": 2, "b": 3}
    index.clear_worker("b")
    assert index.find_matches([1, 2, 3]) == {"a": 2}
    assert index.block_count("b") == 0
    assert index.workers() == ["a", "b"]


def test_a_removed_worker_is_gone_and_its_slot_is_reused_clean() -> None:
    index = KvIndex()
    index.store("a", [1, 2])
    index.store("b", [1])
    index.remove_worker("a")
    assert index.find_matches([1, 2]) == {"b": 1}
    assert len(index) == 1
    index.store("c", [5])  # takes a's slot: must not inherit a's blocks
    assert index.find_matches([1, 2]) == {"b": 1}
    assert index.find_matches([5]) == {"c": 1}
    index.remove_worker("nobody")


def test_a_worker_over_its_cap_is_pruned_oldest_first() -> None:
    index = KvIndex(max_blocks_per_worker=10, prune_to=0.5)
    index.store("a", range(10))
    assert index.block_count("a") == 10
    index.store("a", [10])
    assert index.block_count("a") == 5
    assert index.pruned == 6
    assert not index.holds("a", 0)
    assert index.holds("a", 10)
    assert len(index) == 5


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_blocks_per_worker"):
        KvIndex(max_blocks_per_worker=0)
    with pytest.raises(ValueError, match="prune_to"):
        KvIndex(prune_to=0)


def _reference(held: dict[str, set[int]], hashes: list[int]) -> dict[str, int]:
    out = {}
    for worker, blocks in held.items():
        depth = 0
        while depth < len(hashes) and hashes[depth] in blocks:
            depth += 1
        if depth:
            out[worker] = depth
    return out


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["store", "remove", "clear", "drop"]),
            st.sampled_from(["a", "b", "c", "d"]),
            st.lists(st.integers(0, 12), max_size=6),
        ),
        max_size=30,
    ),
    query=st.lists(st.integers(0, 12), max_size=8),
)
def test_matches_equal_a_naive_model(
    ops: list[tuple[str, str, list[int]]], query: list[int]
) -> None:
    index = KvIndex()
    held: dict[str, set[int]] = {}
    for op, worker, blocks in ops:
        if op == "store":
            index.store(worker, blocks)
            held.setdefault(worker, set()).update(blocks)
        elif op == "remove":
            index.remove(worker, blocks)
            held.get(worker, set()).difference_update(blocks)
        elif op == "clear":
            index.clear_worker(worker)
            if worker in held:
                held[worker] = set()
        else:
            index.remove_worker(worker)
            held.pop(worker, None)
    assert index.find_matches(query) == _reference(held, query)
    assert len(index) == len(set().union(*held.values())) if held else len(index) == 0


def test_many_workers_beyond_one_machine_word() -> None:
    rng = random.Random(7)
    index = KvIndex()
    prompt = [rng.getrandbits(64) for _ in range(256)]
    for w in range(100):
        index.store(f"w{w:03d}", prompt[: w + 1])
    matches = index.find_matches(prompt)
    assert matches == {f"w{w:03d}": w + 1 for w in range(100)}
