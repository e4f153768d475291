"""Block hashing: how a token sequence becomes the KV-cache block hashes routers match.

Defined once, here; workers, engine adapters and routers all call these functions, so one scheme
holds across the fleet. It is the scheme of NVIDIA Dynamo's KV router
(``compute_block_hash_for_seq`` and ``compute_seq_hash_for_block`` in its ``kv_router``
protocols), so the numbers are the same:

- The token ids are cut into blocks of ``block_size``; a partial last block is not hashed (an
  engine caches only full blocks).
- Each block's **local hash** (``tokens_hash``) is XXH3-64 of its token ids written as unsigned
  32-bit little-endian integers, with seed :data:`KV_HASH_SEED` (1337). It depends only on the
  block's own tokens.
- The **sequence hash** (``block_hash``) chains them: ``seq[0] = local[0]`` (or, after a parent
  block, ``hash(parent, local[0])``), ``seq[i] = hash(seq[i-1], local[i])``, where
  ``hash(a, b)`` is XXH3-64 of ``a`` then ``b`` as unsigned 64-bit little-endian integers (16
  bytes), seed 1337. It identifies a block *and everything before it*: what a router matches.

:func:`block_hashes` gives the sequence hashes of a token sequence, :func:`local_block_hashes`
the local ones, :func:`sequence_hashes` chains local hashes. One XXH3 call per block; the tokens
are packed with :mod:`array`, never one by one in Python.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence

import xxhash

from troupe.errors import InvalidRequest

__all__ = [
    "KV_HASH_SEED",
    "block_hashes",
    "chain_hash",
    "local_block_hashes",
    "sequence_hashes",
]

KV_HASH_SEED = 1337
"""The XXH3 seed of every block hash (NVIDIA Dynamo's ``XXH3_SEED``)."""

_U64_MAX = 2**64 - 1
_pair = struct.Struct("<QQ")
_xxh3 = xxhash.xxh3_64_intdigest


def block_hashes(
    token_ids: Sequence[int], block_size: int, parent_hash: int | None = None
) -> list[int]:
    """The sequence hash of each full block of ``token_ids``: what routers match.

    A partial last block is left out. With ``parent_hash`` (the sequence hash of the block
    before), the tokens continue a sequence and must start at a block boundary.

    Raises:
        InvalidRequest: ``block_size`` < 1, or a token id outside 0 .. 2**32-1.
    """
    return sequence_hashes(local_block_hashes(token_ids, block_size), parent_hash)


def local_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The local hash of each full block of ``token_ids`` (a partial last block is left out).

    Raises:
        InvalidRequest: ``block_size`` < 1, or a token id outside 0 .. 2**32-1.
    """
    if block_size < 1:
        raise InvalidRequest(f"block_size must be >= 1, not {block_size}", param="block_size")
    full = len(token_ids) // block_size
    if full == 0:
        return []
    try:
        packed = array("I", token_ids[: full * block_size])
    except (OverflowError, TypeError) as exc:
        raise InvalidRequest(
            f"token ids must be integers in 0 .. 2**32-1: {exc}", param="token_ids"
        ) from None
    if sys.byteorder == "big":  # the hash is defined over little-endian bytes
        packed.byteswap()
    view = memoryview(packed).cast("B")
    step = block_size * 4
    return [_xxh3(view[i : i + step], seed=KV_HASH_SEED) for i in range(0, full * step, step)]


def chain_hash(parent: int, local: int) -> int:
    """The sequence hash of a block whose local hash is ``local``, after the block ``parent``."""
    return _xxh3(_pair.pack(parent, local), seed=KV_HASH_SEED)


def sequence_hashes(local_hashes: Sequence[int], parent: int | None = None) -> list[int]:
    """Chain local hashes into sequence hashes, after the block ``parent`` if given.

    Raises:
        InvalidRequest: a hash outside 0 .. 2**64-1.
    """
    result: list[int] = []
    previous = parent
    try:
        for local in local_hashes:
            previous = (
                local if previous is None else _xxh3(_pair.pack(previous, local), seed=KV_HASH_SEED)
            )
            result.append(previous)
    except struct.error as exc:
        raise InvalidRequest(
            f"block hashes must be integers in 0 .. 2**64-1: {exc}", param="parent_hash"
        ) from None
    if parent is None and result and not 0 <= result[0] <= _U64_MAX:
        raise InvalidRequest("block hashes must be integers in 0 .. 2**64-1", param="blocks")
    return result
