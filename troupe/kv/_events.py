"""The KV-cache events a worker publishes: which blocks it stored, removed, or cleared.

They travel as the payload of an event-plane :class:`~troupe.events.Envelope` on the topic
:data:`KV_EVENTS_TOPIC` of the worker's namespace and component; the envelope's
``publisher_id`` is the worker's instance id. Each event carries the worker's own ``event_id``
(1, 2, 3, ... for the life of the worker), which is what a follower orders by and checks for
gaps. Hashes are unsigned 64-bit integers (see :mod:`troupe.kv._hashing`): ``block_hash`` is the
chained sequence hash that routers match, ``tokens_hash`` the block's local hash.

The shapes follow NVIDIA Dynamo's ``KvCacheEvent`` (``Stored`` / ``Removed`` / ``Cleared``, with
``event_id`` and ``dp_rank``).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = [
    "KV_EVENTS_TOPIC",
    "Cleared",
    "KvCacheEvent",
    "KvEventData",
    "Removed",
    "Stored",
    "StoredBlock",
]

KV_EVENTS_TOPIC = "kv-events"
"""The event-plane topic of KV-cache events (NVIDIA Dynamo's ``kv-events`` subject)."""

Hash = Annotated[int, msgspec.Meta(ge=0)]
"""An unsigned 64-bit hash (msgpack carries nothing above 2**64 - 1)."""


class StoredBlock(msgspec.Struct, frozen=True):
    """One stored block: its sequence hash and its local (tokens-only) hash."""

    block_hash: Hash
    """The chained sequence hash: identifies the block and every block before it."""
    tokens_hash: Hash | None = None
    """The local hash: XXH3-64 of this block's token ids alone (None when the publisher was
    given sequence hashes only)."""


class Stored(msgspec.Struct, frozen=True, tag=True):
    """Blocks were stored: a chain, each block the parent of the next."""

    parent_hash: Hash | None
    """The sequence hash of the block before the first one (None: the chain starts a sequence)."""
    blocks: list[StoredBlock]


class Removed(msgspec.Struct, frozen=True, tag=True):
    """Blocks were evicted."""

    block_hashes: list[Hash]


class Cleared(msgspec.Struct, frozen=True, tag=True):
    """Every block (of the event's ``dp_rank``) was dropped."""


KvEventData = Stored | Removed | Cleared
"""What a :class:`KvCacheEvent` says happened."""


class KvCacheEvent(msgspec.Struct, frozen=True):
    """One change to a worker's KV cache, numbered by the worker."""

    event_id: Annotated[int, msgspec.Meta(ge=0)]
    """1, 2, 3, ... per worker; a follower that sees ``last + 2`` knows it lost one."""
    data: KvEventData
    dp_rank: Annotated[int, msgspec.Meta(ge=0)] = 0
    """The data-parallel rank whose cache changed (0 without data parallelism)."""
