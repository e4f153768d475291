"""How the ``nats`` store reads its bucket: keys as subjects, messages as records, watch feeds.

Keys map to subjects reversibly: ``/`` separates tokens (``ns/comp/ep`` -> ``ns.comp.ep``), so a
prefix watch is a server-side filter on ``P.>`` that respects path boundaries; within a
token every character outside ``[A-Za-z0-9_-]`` is written ``=XX`` (hex of its UTF-8 bytes) and an
empty token (a leading ``/``) is ``=``.

A message's headers say what it is (a value, bound to a lease or not, or a delete marker placed by
a client or by the server); :class:`_Feed` turns one watch consumer's messages into a snapshot,
then events, and checks the consumer sequence for gaps. :mod:`troupe.discovery._nats` holds the
store that drives them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nats.aio.msg import Msg

from troupe.discovery._store import (
    CLOSED,
    Delete,
    KeyValue,
    Put,
    Snapshot,
    WatchEvent,
    _Closed,
    key_matches,
)
from troupe.errors import DiscoveryError

if TYPE_CHECKING:
    from troupe.discovery._nats import NatsStore

__all__ = ["decode_nats_key", "encode_nats_key"]

_LEASE_HEADER = "Troupe-Lease"
_REASON_HEADER = "Troupe-Reason"
_KV_OP = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"
_TTL_HEADER = "Nats-TTL"
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def encode_nats_key(key: str) -> str:
    """The KV key (subject tail) of ``key``: ``/`` becomes ``.``, other characters are escaped."""
    tokens = []
    for segment in key.split("/"):
        if not segment:
            tokens.append("=")
            continue
        tokens.append(
            "".join(c if c in _SAFE else "".join(f"={b:02X}" for b in c.encode()) for c in segment)
        )
    return ".".join(tokens)


def decode_nats_key(encoded: str) -> str:
    """Inverse of :func:`encode_nats_key`."""
    segments = []
    for part in encoded.split("."):
        if part == "=":
            segments.append("")
            continue
        out = bytearray()
        i = 0
        while i < len(part):
            if part[i] == "=":
                out.append(int(part[i + 1 : i + 3], 16))
                i += 3
            else:
                out.extend(part[i].encode())
                i += 1
        segments.append(out.decode())
    return "/".join(segments)


@dataclass
class _Record:
    """One message of the bucket, decoded."""

    key: str
    seq: int
    value: bytes | None  # None for a delete marker
    lease: int | None
    expired: bool  # for markers: removed by a TTL or a lease


def _record(key: str, seq: int, data: bytes | None, headers: dict[str, str] | None) -> _Record:
    headers = headers or {}
    # A lease without a TTL would never expire: only a message with both is bound to a lease
    # (and a header that is not a lease id, written by hand, binds it to none).
    lease_text = headers.get(_LEASE_HEADER, "")
    bound = lease_text.isascii() and lease_text.isdigit() and bool(headers.get(_TTL_HEADER))
    lease = int(lease_text) if bound else None
    if _MARKER_REASON in headers:  # placed by the server: TTL or age expiry, or a purge
        return _Record(key, seq, None, lease, headers[_MARKER_REASON] == "MaxAge")
    if headers.get(_KV_OP) in ("DEL", "PURGE"):
        return _Record(key, seq, None, lease, headers.get(_REASON_HEADER) == "lease")
    return _Record(key, seq, data or b"", lease, False)


class _Feed:
    """Turns one consumer's messages into a snapshot, then events; checks for gaps.

    Messages, a connection failure and the store's closing all arrive through one queue, on the
    store's event loop (nats-py runs callbacks there).
    """

    def __init__(self, store: NatsStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix
        self._queue: asyncio.Queue[Msg | DiscoveryError | _Closed] = asyncio.Queue()
        self._delivered = 0
        self._view: dict[str, KeyValue] = {}

    async def on_msg(self, msg: Msg) -> None:
        if msg.reply:  # status messages (heartbeats, flow control) have none; none are requested
            self._queue.put_nowait(msg)

    def fail(self, exc: DiscoveryError) -> None:
        """End the feed with ``exc`` (the connection was lost)."""
        self._queue.put_nowait(exc)

    def finish(self) -> None:
        """End the feed normally (the store was closed)."""
        self._queue.put_nowait(CLOSED)

    async def _next(self) -> _Record | None:
        item = await self._queue.get()
        if isinstance(item, _Closed):
            return None
        if isinstance(item, DiscoveryError):
            raise item
        meta = item.metadata
        consumer_seq = int(meta.sequence.consumer)
        if consumer_seq != self._delivered + 1:
            raise self._store._unavailable(
                f"watch on {self._prefix!r} missed messages "
                f"(consumer sequence {consumer_seq}, expected {self._delivered + 1})"
            )
        self._delivered = consumer_seq
        key = decode_nats_key(item.subject[len(self._store._pre) :])
        return _record(key, int(meta.sequence.stream), item.data, item.headers)

    async def snapshot(self, initial: int, last_seq: int) -> Snapshot:
        """Read the ``initial`` messages the consumer delivers first (the last one per key)."""
        revision = int(last_seq)
        for _ in range(initial):
            record = await self._next()
            if record is None:
                raise self._store._unavailable("store closed during a watch")
            revision = max(revision, record.seq)
            if record.value is not None and key_matches(record.key, self._prefix):
                self._view[record.key] = KeyValue(
                    record.key, record.value, record.seq, record.lease
                )
        return Snapshot(tuple(kv for _, kv in sorted(self._view.items())), revision)

    async def next_event(self) -> WatchEvent | None:
        """The next change, or None when the store was closed."""
        while True:
            record = await self._next()
            if record is None:
                return None
            if not key_matches(record.key, self._prefix):
                continue
            known = self._view.get(record.key)
            if record.value is None:
                if known is None:
                    continue  # a marker for a key already gone (a tombstone aging out)
                del self._view[record.key]
                return Delete(record.key, record.seq, record.expired)
            kv = KeyValue(record.key, record.value, record.seq, record.lease)
            self._view[record.key] = kv
            if known is not None and (known.value, known.lease) == (kv.value, kv.lease):
                continue  # a keep-alive re-publish: nothing changed
            return Put(kv)
