"""vLLM's own KV-event stream, turned into troupe KV events.

vLLM (``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'``)
publishes on a ZeroMQ PUB socket; each message has three frames: the topic (empty by default),
an 8-byte big-endian sequence number (0, 1, 2, ...), and the msgpack of a ``KVEventBatch``
``{ts, events, data_parallel_rank}`` whose events are tagged ``BlockStored{block_hashes,
parent_block_hash, token_ids, block_size, lora_id, medium, ...}``, ``BlockRemoved{block_hashes,
medium, ...}`` and ``AllBlocksCleared``. vLLM releases up to 0.11 encode structs as arrays (the
tag first); later ones as maps (the tag under ``"type"``); both decode here. vLLM's block hashes
are its own (integers, or bytes of SHA-256).

:class:`VllmKvEventsAdapter` subscribes to that socket and feeds a :class:`~troupe.kv.KvPublisher`.
It recomputes troupe's hashes from the token ids, so routers see one hashing scheme whatever the
engine, and keeps a map from vLLM's hash to troupe's for removals and parents. It drops, and
counts:

- ``malformed``: frames that are not a batch, events whose ``block_size`` is not the publisher's
  or whose token ids do not fill their blocks;
- ``orphaned``: a ``BlockStored`` whose parent it never saw (its chain cannot be computed);
- ``ignored``: events of another medium than the GPU (CPU offload tiers), removals of unknown
  blocks.

A gap in vLLM's sequence numbers (``sequence_gaps``) means lost batches; it is counted and
logged. LoRA adapters and hybrid-model cache groups are hashed as plain blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from troupe._support._logging import get_logger
from troupe.errors import ConfigError, TransportError
from troupe.kv._publisher import KvPublisher

__all__ = ["VllmKvEventsAdapter", "VllmKvEventsCounters"]

_log = get_logger("troupe.kv.vllm")

VllmHash = int | bytes


# --- vLLM's schema, both encodings (field order is the wire order of the array form) --------------


class _ArrayBlockStored(msgspec.Struct, array_like=True, tag="BlockStored", frozen=True):
    block_hashes: list[VllmHash]
    parent_block_hash: VllmHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class _ArrayBlockRemoved(msgspec.Struct, array_like=True, tag="BlockRemoved", frozen=True):
    block_hashes: list[VllmHash]
    medium: str | None = None


class _ArrayAllBlocksCleared(msgspec.Struct, array_like=True, tag="AllBlocksCleared", frozen=True):
    pass


class _ArrayBatch(msgspec.Struct, array_like=True, frozen=True):
    ts: float
    events: list[_ArrayBlockStored | _ArrayBlockRemoved | _ArrayAllBlocksCleared]
    data_parallel_rank: int | None = None


class _MapBlockStored(msgspec.Struct, tag="BlockStored", frozen=True):
    block_hashes: list[VllmHash]
    parent_block_hash: VllmHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class _MapBlockRemoved(msgspec.Struct, tag="BlockRemoved", frozen=True):
    block_hashes: list[VllmHash]
    medium: str | None = None


class _MapAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", frozen=True):
    pass


class _MapBatch(msgspec.Struct, frozen=True):
    ts: float
    events: list[_MapBlockStored | _MapBlockRemoved | _MapAllBlocksCleared]
    data_parallel_rank: int | None = None


_Stored = _ArrayBlockStored | _MapBlockStored
_Removed = _ArrayBlockRemoved | _MapBlockRemoved
_Batch = _ArrayBatch | _MapBatch

_array_decoder = msgspec.msgpack.Decoder(_ArrayBatch)
_map_decoder = msgspec.msgpack.Decoder(_MapBatch)
_MAP_FIRST_BYTES = frozenset({*range(0x80, 0x90), 0xDE, 0xDF})  # msgpack fixmap, map16, map32

_GPU_MEDIA = frozenset({None, "GPU", "gpu"})


def decode_vllm_batch(payload: bytes) -> _Batch:
    """Decode one ``KVEventBatch`` (array or map encoding).

    Raises:
        msgspec.DecodeError: it is not one (``ValidationError`` included).
    """
    if payload and payload[0] in _MAP_FIRST_BYTES:
        return _map_decoder.decode(payload)
    return _array_decoder.decode(payload)


@dataclasses.dataclass(slots=True)
class VllmKvEventsCounters:
    """What the adapter saw."""

    batches: int = 0
    events: int = 0
    malformed: int = 0
    orphaned: int = 0
    ignored: int = 0
    sequence_gaps: int = 0


class VllmKvEventsAdapter:
    """Subscribes to a vLLM engine's KV-event PUB socket and feeds ``publisher``.

    Args:
        publisher: where the translated events go (its ``block_size`` must be vLLM's).
        address: vLLM's PUB address, e.g. ``tcp://127.0.0.1:5557``.
        topic: the topic vLLM publishes on (``""``, its default, receives every topic).
    """

    def __init__(self, publisher: KvPublisher, address: str, *, topic: str = "") -> None:
        self.publisher = publisher
        self.address = address
        self.topic = topic
        self.counters = VllmKvEventsCounters()
        self._hashes: dict[int, dict[VllmHash, int]] = {}  # dp_rank -> vLLM hash -> troupe's
        self._last_sequence: int | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect to vLLM's socket and start translating, on the running loop.

        Raises:
            ConfigError: the address is not a ZeroMQ address.
        """
        if self._task is not None:
            return
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
            sock.connect(self.address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            ctx.term()
            raise ConfigError("vLLM KV events address", self.address, f"{exc}") from None
        self._ctx, self._sock = ctx, sock
        self._task = asyncio.get_running_loop().create_task(
            self._read(sock), name=f"VllmKvEventsAdapter-{self.address}"
        )

    async def close(self) -> None:
        """Stop reading and close the socket."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError as exc:
                raise TransportError(f"vLLM KV events socket failed: {exc}") from exc
            self.feed(frames)

    # --- translation: pure, testable with frames --------------------------------------------------

    def feed(self, frames: list[bytes]) -> None:
        """Translate one ZeroMQ message (three frames) into publisher calls."""
        if len(frames) != 3 or len(frames[1]) != 8:
            self._malformed("expected [topic, 8-byte sequence, payload]", frames=len(frames))
            return
        sequence = int.from_bytes(frames[1], "big")
        try:
            batch = decode_vllm_batch(frames[2])
        except msgspec.DecodeError as exc:  # ValidationError included
            self._malformed(str(exc))
            return
        if self._last_sequence is not None and sequence > self._last_sequence + 1:
            self.counters.sequence_gaps += 1
            _log.warning(
                "vLLM KV event batches lost",
                address=self.address,
                missing=sequence - self._last_sequence - 1,
            )
        self._last_sequence = sequence
        self.counters.batches += 1
        rank = batch.data_parallel_rank or 0
        for event in batch.events:
            self.counters.events += 1
            self._translate(event, rank)

    def _translate(self, event: Any, rank: int) -> None:
        hashes = self._hashes.setdefault(rank, {})
        if isinstance(event, _ArrayBlockStored | _MapBlockStored):
            self._stored(event, rank, hashes)
        elif isinstance(event, _ArrayBlockRemoved | _MapBlockRemoved):
            if event.medium not in _GPU_MEDIA:
                self.counters.ignored += 1
                return
            ours = [hashes.pop(h) for h in event.block_hashes if h in hashes]
            self.counters.ignored += len(event.block_hashes) - len(ours)
            self.publisher.removed(ours, dp_rank=rank)
        else:
            hashes.clear()
            self.publisher.cleared(dp_rank=rank)

    def _stored(self, event: _Stored, rank: int, hashes: dict[VllmHash, int]) -> None:
        if event.medium not in _GPU_MEDIA:
            self.counters.ignored += 1
            return
        size = self.publisher.block_size
        if event.block_size != size or len(event.token_ids) != size * len(event.block_hashes):
            self._malformed(
                "BlockStored does not match the publisher's block size",
                block_size=event.block_size,
                expected=size,
                blocks=len(event.block_hashes),
                tokens=len(event.token_ids),
            )
            return
        parent: int | None = None
        if event.parent_block_hash is not None:
            parent = hashes.get(event.parent_block_hash)
            if parent is None:
                self.counters.orphaned += 1
                return
        ours = self.publisher.stored(token_ids=event.token_ids, parent_hash=parent, dp_rank=rank)
        hashes.update(zip(event.block_hashes, ours, strict=True))

    def _malformed(self, reason: str, **details: Any) -> None:
        self.counters.malformed += 1
        if self.counters.malformed == 1 or self.counters.malformed % 1000 == 0:
            _log.warning(
                "vLLM KV event dropped",
                reason=reason,
                address=self.address,
                malformed=self.counters.malformed,
                **details,
            )
