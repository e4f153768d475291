"""vLLM's KV-event wire schema, as vLLM defines it, to build the frames its engine publishes.

vLLM's ``vllm/distributed/kv_events.py`` (releases with ``data_parallel_rank`` and ``medium``,
up to 0.11): msgspec structs, ``array_like=True`` (a struct is an array of its fields in
declaration order, a tagged one starting with the class name), ``omit_defaults``; a message is
``[topic, sequence as 8 bytes big-endian, msgpack(KVEventBatch)]``. Later releases dropped
``array_like`` (structs are maps, the tag under ``"type"``): :data:`MAP` builds those.
"""

from __future__ import annotations

from typing import Any

import msgspec


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base class for all KV cache-related events."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


class MapBlockStored(msgspec.Struct, omit_defaults=True, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class MapBlockRemoved(msgspec.Struct, omit_defaults=True, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class MapKVEventBatch(msgspec.Struct, omit_defaults=True):
    ts: float
    events: list[MapBlockStored | MapBlockRemoved]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()


def frames(sequence: int, batch: msgspec.Struct, topic: bytes = b"") -> list[bytes]:
    """The three frames vLLM's ZmqEventPublisher sends for ``batch``."""
    return [topic, sequence.to_bytes(8, "big"), _encoder.encode(batch)]
