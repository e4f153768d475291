"""Block hashing: pinned vectors, chaining, partial blocks, bad input."""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from troupe.errors import InvalidRequest
from troupe.kv import (
    KV_HASH_SEED,
    block_hashes,
    chain_hash,
    local_block_hashes,
    sequence_hashes,
)

# Computed once with the definition (XXH3-64, seed 1337, u32 / u64 little-endian) and pinned:
# the numbers routers and workers agree on (NVIDIA Dynamo's KV router computes the same).
LOCAL_1234 = 14643705804678351452  # tokens 1, 2, 3, 4
LOCAL_5678 = 16777012769546811212  # tokens 5, 6, 7, 8
SEQ_1234_5678 = 4945711292740353085  # chain_hash(LOCAL_1234, LOCAL_5678)
LOCAL_0_15 = 15310707395893867146  # tokens 0 .. 15
SEQ_0_31 = 13769157705258532664  # second block of tokens 0 .. 31 (block size 16)


def test_pinned_vectors() -> None:
    assert KV_HASH_SEED == 1337
    assert local_block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == [LOCAL_1234, LOCAL_5678]
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == [LOCAL_1234, SEQ_1234_5678]
    assert chain_hash(LOCAL_1234, LOCAL_5678) == SEQ_1234_5678
    assert block_hashes(list(range(32)), 16) == [LOCAL_0_15, SEQ_0_31]


def test_the_definition_spelled_out() -> None:
    def xxh3(data: bytes) -> int:
        return xxhash.xxh3_64_intdigest(data, seed=1337)

    local = [xxh3(struct.pack("<4I", 1, 2, 3, 4)), xxh3(struct.pack("<4I", 5, 6, 7, 8))]
    assert local == [LOCAL_1234, LOCAL_5678]
    assert xxh3(struct.pack("<QQ", *local)) == SEQ_1234_5678


def test_a_partial_last_block_is_not_hashed() -> None:
    assert block_hashes([1, 2, 3, 4, 5, 6, 7], 4) == [LOCAL_1234]
    assert block_hashes([1, 2, 3], 4) == []
    assert block_hashes([], 4) == []


def test_the_first_block_hash_is_its_local_hash_and_the_rest_chain() -> None:
    tokens = list(range(100, 164))
    local = local_block_hashes(tokens, 16)
    seq = block_hashes(tokens, 16)
    assert seq[0] == local[0]
    for i in range(1, 4):
        assert seq[i] == chain_hash(seq[i - 1], local[i])
    assert sequence_hashes(local) == seq


def test_a_continuation_after_a_parent_matches_the_whole_sequence() -> None:
    tokens = list(range(64))
    whole = block_hashes(tokens, 16)
    assert block_hashes(tokens[32:], 16, whole[1]) == whole[2:]


def test_equal_blocks_at_different_places_differ_only_in_sequence_hash() -> None:
    tokens = [7] * 32
    local = local_block_hashes(tokens, 16)
    seq = block_hashes(tokens, 16)
    assert local[0] == local[1]
    assert seq[0] != seq[1]


@given(st.lists(st.integers(0, 2**32 - 1), max_size=80), st.integers(1, 17))
def test_block_count_and_prefix_property(tokens: list[int], size: int) -> None:
    seq = block_hashes(tokens, size)
    assert len(seq) == len(tokens) // size
    # A prefix of the tokens hashes to a prefix of the hashes: what routers match on.
    cut = len(tokens) // 2
    assert block_hashes(tokens[:cut], size) == seq[: cut // size]


@pytest.mark.parametrize("tokens", [[-1, 0], [2**32, 0], ["a", 0]])
def test_token_ids_outside_u32_are_refused(tokens: list[object]) -> None:
    with pytest.raises(InvalidRequest, match="token ids"):
        block_hashes(tokens, 2)  # type: ignore[arg-type]


def test_block_size_must_be_positive() -> None:
    with pytest.raises(InvalidRequest, match="block_size"):
        block_hashes([1, 2], 0)


def test_parent_hash_outside_u64_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="2\\*\\*64"):
        block_hashes([1, 2], 2, parent_hash=2**64)
