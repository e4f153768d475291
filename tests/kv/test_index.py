"""The router's KV index: prefix overlap per worker, events applied, workers dropped, a cap."""

from __future__ import annotations

import random
from collections.abc import Callable

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


def test_a_hole_counts_a_worker_no_less_than_its_leading_blocks_and_within_its_chain() -> None:
    index = KvIndex()
    chain = list(range(1, 65))
    index.store("a", [h for h in chain if h != 41])  # block 40 evicted before its children
    index.store("b", chain)
    index.store("c", chain[:20])
    index.store("d", [1, 3, 4])  # a hole at block 1, which every walk probes
    matches = index.find_matches(chain)
    assert matches["b"] == 64
    assert matches["c"] == 20  # no hole: exact, whatever the others hold
    assert matches["d"] == 1
    count = matches["a"]
    assert count >= 40  # never fewer than its leading blocks
    assert index.holds("a", chain[count - 1])  # and it holds the block its count ends on
    assert count == len(chain) or not index.holds("a", chain[count])


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
    assert index.find_matches([1, 2]) == {"a": 2, "b": 1}
    index.remove_worker("a")
    assert index.find_matches([1, 2]) == {"b": 1}
    assert len(index) == 1
    index.store("c", [5])  # takes a's slot: must not inherit a's blocks
    assert index.find_matches([1, 2]) == {"b": 1}
    assert index.find_matches([5]) == {"c": 1}
    index.store("c", [1, 2])  # nor be named as a
    assert index.find_matches([1, 2]) == {"b": 1, "c": 2}
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


def test_pruning_takes_a_chains_head_first_so_the_worker_drops_out_at_block_0() -> None:
    index = KvIndex(max_blocks_per_worker=8, prune_to=0.5)
    chain = list(range(1, 13))
    index.store("a", chain[:6])
    index.store("a", chain[6:10])  # 10 > 8: the 6 oldest go, the chain's head first
    index.store("b", chain[:8])
    assert [h for h in chain if index.holds("a", h)] == chain[6:10]
    assert index.find_matches(chain) == {"b": 8}  # "a" is not counted past its lost head


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_blocks_per_worker"):
        KvIndex(max_blocks_per_worker=0)
    with pytest.raises(ValueError, match="prune_to"):
        KvIndex(prune_to=0)


def _leading(holds: Callable[[int], bool], hashes: list[int]) -> int:
    depth = 0
    while depth < len(hashes) and holds(hashes[depth]):
        depth += 1
    return depth


def _reference(held: dict[str, set[int]], hashes: list[int]) -> dict[str, int]:
    out = {}
    for worker, blocks in held.items():
        depth = _leading(blocks.__contains__, hashes)
        if depth:
            out[worker] = depth
    return out


# A tree of chained blocks: the trunk, two branches off its block 3, one off a branch, a new root.
_TRUNK = list(range(1, 13))
_CHAINS = [
    _TRUNK,
    [*_TRUNK[:4], *range(20, 30)],
    [*_TRUNK[:4], *range(30, 36)],
    [*_TRUNK[:4], *range(20, 25), *range(40, 46)],
    list(range(50, 60)),
]
_FRESH = list(range(100, 110))  # hashes no worker ever holds


def _subtree(chain: int, depth: int) -> set[int]:
    """Block ``depth`` of chain ``chain`` and every block after it in any chain through it."""
    node = _CHAINS[chain][: depth + 1]
    return {h for c in _CHAINS if c[: depth + 1] == node for h in c[depth:]}


_prefix_closed_ops = st.lists(
    st.tuples(
        st.sampled_from(["extend", "store", "evict", "clear", "drop"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.integers(0, len(_CHAINS) - 1),
        st.integers(0, 14),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=_prefix_closed_ops,
    query=st.tuples(
        st.integers(0, len(_CHAINS) - 1), st.integers(0, 14), st.integers(0, len(_FRESH))
    ),
    cap=st.sampled_from([None, 4, 9]),
)
def test_matches_equal_a_naive_model_when_caches_keep_prefixes(
    ops: list[tuple[str, str, int, int]], query: tuple[int, int, int], cap: int | None
) -> None:
    # Every worker's holdings stay prefix-closed: whole prefixes stored or extended, evictions
    # take a block with everything after it. With a cap, pruning leaves the index holding less
    # than the model, but never a hole that is counted past: matches equal the leading blocks the
    # index itself holds.
    index = KvIndex() if cap is None else KvIndex(max_blocks_per_worker=cap, prune_to=0.5)
    held: dict[str, set[int]] = {}
    for op, worker, chain_no, depth in ops:
        chain = _CHAINS[chain_no]
        if op == "extend":  # a Stored event: the blocks after what the worker holds of the chain
            have = _leading(held.get(worker, set()).__contains__, chain)
            index.store(worker, chain[have:depth])
            held.setdefault(worker, set()).update(chain[:depth])
        elif op == "store":  # a whole prefix, held blocks again (approximate mode does this)
            if cap is not None:
                continue  # a pruned head stored again lands after its tail: not prefix order
            index.store(worker, chain[:depth])
            held.setdefault(worker, set()).update(chain[:depth])
        elif op == "evict":
            gone = _subtree(chain_no, min(depth, len(chain) - 1))
            index.remove(worker, sorted(gone, reverse=True))
            held.get(worker, set()).difference_update(gone)
        else:
            _clear_or_drop(index, held, op, worker)
    chain_no, depth, fresh = query
    hashes = _CHAINS[chain_no][:depth] + _FRESH[:fresh]
    in_index = {w: {h for h in hashes if index.holds(w, h)} for w in index.workers()}
    assert index.find_matches(hashes) == _reference(in_index, hashes)
    if cap is None:
        assert index.find_matches(hashes) == _reference(held, hashes)
        assert len(index) == len(set().union(*held.values())) if held else len(index) == 0


def _clear_or_drop(index: KvIndex, held: dict[str, set[int]], op: str, worker: str) -> None:
    """A ``Cleared`` event (``op == "clear"``) or the worker leaving, in the index and the model."""
    if op == "clear":
        index.clear_worker(worker)
        if worker in held:
            held[worker] = set()
    else:
        index.remove_worker(worker)
        held.pop(worker, None)


# Blocks as runs (``range(lo, hi)``: long holdings, holes of several blocks) or scattered.
_blocks = st.one_of(
    st.tuples(st.integers(0, 40), st.integers(0, 40)).map(lambda r: list(range(*r))),
    st.lists(st.integers(0, 40), max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["store", "remove", "clear", "drop"]),
            st.sampled_from(["a", "b", "c", "d"]),
            _blocks,
        ),
        max_size=30,
    ),
    query=st.one_of(
        st.integers(0, 41).map(lambda n: list(range(n))), st.lists(st.integers(0, 40), max_size=40)
    ),
)
def test_matches_with_holes_stay_within_the_bound(
    ops: list[tuple[str, str, list[int]]], query: list[int]
) -> None:
    # Arbitrary holdings: a worker is counted at least its leading blocks, it holds the block
    # before its count and lacks the block at its count; a worker without block 0 is absent.
    index = KvIndex()
    held: dict[str, set[int]] = {}
    for op, worker, blocks in ops:
        if op == "store":
            index.store(worker, blocks)
            held.setdefault(worker, set()).update(blocks)
        elif op == "remove":
            index.remove(worker, blocks)
            held.get(worker, set()).difference_update(blocks)
        else:
            _clear_or_drop(index, held, op, worker)
    matches = index.find_matches(query)
    assert set(matches) == {w for w, blocks in held.items() if query and query[0] in blocks}
    # Together these make the count exact for a worker with no hole in the prompt.
    for worker, count in matches.items():
        has = held[worker]
        assert _leading(has.__contains__, query) <= count <= len(query)
        assert query[count - 1] in has
        assert count == len(query) or query[count] not in has


def test_many_workers_beyond_one_machine_word() -> None:
    rng = random.Random(7)
    index = KvIndex()
    prompt = [rng.getrandbits(64) for _ in range(256)]
    for w in range(100):
        index.store(f"w{w:03d}", prompt[: w + 1])
    matches = index.find_matches(prompt)
    assert matches == {f"w{w:03d}": w + 1 for w in range(100)}


def test_sixty_four_workers_at_many_depths_on_a_long_prompt() -> None:
    rng = random.Random(11)
    prompt = [rng.getrandbits(64) for _ in range(256)]
    depths = {f"w{w:02d}": rng.randint(1, 256) for w in range(72)}
    depths["w00"], depths["w01"], depths["w02"] = 1, 255, 256
    index = KvIndex()
    for worker, depth in depths.items():
        index.store(worker, prompt[:depth])
    index.store("other", [rng.getrandbits(64) for _ in range(64)])  # holds none of the prompt
    assert index.find_matches(prompt) == depths
    for cut in (1, 2, 3, 100, 255):
        assert index.find_matches(prompt[:cut]) == {w: min(d, cut) for w, d in depths.items()}


def test_a_prompt_longer_than_every_workers_holdings() -> None:
    rng = random.Random(12)
    prompt = [rng.getrandbits(64) for _ in range(256)]
    index = KvIndex()
    for w, depth in enumerate((3, 17, 64, 64, 130, 200)):
        index.store(f"w{w}", prompt[:depth])
    extended = [*prompt[:200], *(rng.getrandbits(64) for _ in range(56))]
    expected = {"w0": 3, "w1": 17, "w2": 64, "w3": 64, "w4": 130, "w5": 200}
    assert index.find_matches(prompt) == expected
    assert index.find_matches(extended) == expected


def test_every_worker_holding_the_whole_prompt() -> None:
    rng = random.Random(13)
    prompt = [rng.getrandbits(64) for _ in range(256)]
    index = KvIndex()
    for w in range(64):
        index.store(f"w{w}", prompt)
    assert index.find_matches(prompt) == {f"w{w}": 256 for w in range(64)}
    assert index.find_matches(prompt[:1]) == {f"w{w}": 1 for w in range(64)}
    index.remove_worker("w5")  # "new" takes its slot: lookups must name the new worker
    index.store("new", prompt)
    expected = {f"w{w}": 256 for w in range(64) if w != 5} | {"new": 256}
    assert index.find_matches(prompt) == expected
