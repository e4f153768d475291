"""Durable replay for a :class:`~troupe.kv.KvFollower`: where it starts, and its snapshots.

On a durable event plane (NATS JetStream, ``DYN_DURABLE_KV_EVENTS``) the ``kv-events`` topic is
kept in a stream, so a follower started after the workers published rebuilds their state from
the stream instead of asking every worker for a dump:

- :func:`open_replay` loads the latest snapshot of the follower's view (object
  ``{component}.{snapshot_name}`` of the namespace's snapshot bucket), then subscribes with
  ``after_sequence`` = the snapshot's stream sequence, or 0 without one. Replaying from 0 (not
  ``from_start``) makes the plane refuse a stream that no longer holds its first events
  (``ReplayUnavailable``), so a history is never silently cut; the caller then falls back to
  worker dumps.
- :class:`SnapshotWriter` saves the view (each synced worker: its last event id and the events
  that rebuild what the sink holds, ``KvSink.export``) with the stream sequence of the last
  event folded into it, one save at a time.

The snapshot is msgpack of :class:`FollowerSnapshot`; codecs here are pure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import msgspec

from troupe._support._logging import get_logger
from troupe.errors import ProtocolError, ReplayUnavailable, TransportError
from troupe.events import EventPlane, EventScope, EventSubscription
from troupe.kv._events import KV_EVENTS_TOPIC, KvCacheEvent
from troupe.kv._sink import KvSink

__all__ = [
    "FollowerSnapshot",
    "SnapshotWorker",
    "SnapshotWriter",
    "decode_snapshot",
    "encode_snapshot",
    "open_replay",
]

_log = get_logger("troupe.kv.replay")


class SnapshotWorker(msgspec.Struct, frozen=True, array_like=True):
    """One worker in a snapshot: what the sink held for it, up to ``last_event_id``."""

    worker: str
    last_event_id: int
    events: list[KvCacheEvent]


class FollowerSnapshot(msgspec.Struct, frozen=True, tag="troupe.kv.follower.v1"):
    """A follower's view at one stream sequence (kept beside it, in the object's metadata)."""

    workers: list[SnapshotWorker]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(FollowerSnapshot)


def encode_snapshot(snapshot: FollowerSnapshot) -> bytes:
    """The bytes of a snapshot."""
    return _encoder.encode(snapshot)


def decode_snapshot(data: bytes) -> FollowerSnapshot:
    """Decode a snapshot.

    Raises:
        ProtocolError: the bytes are not a follower's snapshot.
    """
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"not a KV follower snapshot: {exc}") from None


async def open_replay(
    plane: EventPlane, scope: EventScope, snapshot_name: str | None
) -> tuple[EventSubscription, FollowerSnapshot | None] | None:
    """Subscribe to ``scope``'s KV events replaying the stream, after the latest snapshot.

    Returns the subscription and the snapshot it continues (None: it replays the whole
    stream), or None when the stream cannot give the history (the caller subscribes live and
    asks the workers). A snapshot that cannot be read is logged and skipped.

    Raises:
        TransportError: the plane cannot be reached.
    """
    snapshot: FollowerSnapshot | None = None
    sequence = 0
    if snapshot_name is not None:
        try:
            loaded = await plane.load_snapshot(scope, snapshot_name)
            if loaded is not None:
                snapshot, sequence = decode_snapshot(loaded[0]), loaded[1]
        except (ProtocolError, TransportError) as exc:
            _log.warning("KV events: snapshot not usable; replaying the stream", error=str(exc))
            snapshot, sequence = None, 0
    try:
        subscription = await plane.subscribe(scope, KV_EVENTS_TOPIC, after_sequence=sequence)
    except ReplayUnavailable as exc:
        _log.info("KV events: the stream cannot replay; fetching from the workers", error=str(exc))
        return None
    return subscription, snapshot


class SnapshotWriter:
    """Saves a follower's view to the plane's object store, one save at a time.

    Args:
        plane: the durable event plane.
        scope: the followed namespace and component.
        name: the snapshot's name.
        sink: where the view is (its :meth:`~troupe.kv.KvSink.export`).
        on_saved: called on the loop after each snapshot saved.
    """

    def __init__(
        self,
        plane: EventPlane,
        scope: EventScope,
        name: str,
        sink: KvSink,
        on_saved: Callable[[], None] = lambda: None,
    ) -> None:
        self._plane = plane
        self._scope = scope
        self._name = name
        self._sink = sink
        self._on_saved = on_saved
        self._task: asyncio.Task[None] | None = None
        self.saved = 0
        """Snapshots saved so far."""

    @property
    def busy(self) -> bool:
        """Whether a save is under way."""
        return self._task is not None and not self._task.done()

    def save(self, workers: Iterable[tuple[str, int]], sequence: int) -> bool:
        """Take the view of ``workers`` (id, last event id) now and save it in the background,
        covering the stream up to ``sequence``; False if a save is still under way or the sink
        cannot export."""
        if self.busy:
            return False
        taken: list[SnapshotWorker] = []
        for worker, last in workers:
            events = self._sink.export(worker)
            if events is None:
                return False
            taken.append(SnapshotWorker(worker, last, events))
        data = encode_snapshot(FollowerSnapshot(taken))
        self._task = asyncio.get_running_loop().create_task(
            self._save(data, sequence, len(taken)),
            name=f"KvFollower-{self._scope.namespace}.{self._scope.component}-snapshot",
        )
        return True

    async def _save(self, data: bytes, sequence: int, workers: int) -> None:
        try:
            await self._plane.save_snapshot(self._scope, self._name, data, sequence=sequence)
        except TransportError as exc:
            _log.warning("KV events: snapshot not saved; trying again later", error=str(exc))
            return
        self.saved += 1
        self._on_saved()
        _log.info(
            "KV events: snapshot saved",
            snapshot=self._name,
            sequence=sequence,
            workers=workers,
            size=len(data),
        )

    async def close(self, timeout: float = 5.0) -> None:
        """Let a save under way finish (within ``timeout`` seconds, then it is cancelled: the
        previous snapshot stays)."""
        task = self._task
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
