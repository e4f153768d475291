"""JetStream for the durable ``nats`` event plane: the stream per namespace, replay, snapshots.

- Stream ``troupe-events-{namespace}``: subjects ``namespace.{ns}.component.*.*`` (every event
  topic of the namespace, nothing else), file storage, oldest events discarded past
  :class:`StreamLimits` (age, count). Created by the first plane that needs it; a stream that
  exists is used as it is.
- Replay: an ordered push consumer (ephemeral, no acknowledgements, no state kept on the server
  beyond the subscription) filtered on one topic's subject, from the stream's start or from a
  sequence on; it goes on with live events, and re-creates itself from the last sequence it saw
  if the connection drops or a message goes missing.
- Snapshots: object store bucket ``troupe-snapshots-{namespace}``, object
  ``{component}.{name}``; the stream sequence the snapshot covers is a header of the object's
  metadata (``Troupe-Stream-Sequence``), so a reader replays only what came after it.

Functions over a :class:`~nats.js.JetStreamContext`; :class:`~troupe.events.NatsEventPlane`
owns the connection and calls them.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.object_store import ObjectStore

from troupe.errors import ConfigError, ConnectionLost, ReplayUnavailable, TransportError
from troupe.events._plane import EventScope
from troupe.messages import validate_name

__all__ = [
    "SEQUENCE_HEADER",
    "StreamLimits",
    "bucket_name",
    "ensure_stream",
    "load_snapshot",
    "object_name",
    "replay",
    "save_snapshot",
    "stream_name",
    "stream_subjects",
]

SEQUENCE_HEADER: Final = "Troupe-Stream-Sequence"
"""Header of a snapshot's metadata: the stream sequence of the last event it covers."""

# Seconds between the ordered consumer's idle heartbeats: a consumer lost with a restarted
# server is re-created after two missed ones.
_HEARTBEAT: Final = 1.0


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Limits of a namespace's event stream, applied when a plane creates it.

    Attributes:
        max_age: seconds an event is kept.
        max_msgs: events kept; the oldest go first.
    """

    max_age: float = 3600.0
    max_msgs: int = 1_000_000

    def __post_init__(self) -> None:
        if isinstance(self.max_age, bool) or not self.max_age > 0:
            raise ConfigError("StreamLimits.max_age", self.max_age, "a number of seconds > 0")
        if isinstance(self.max_msgs, bool) or not self.max_msgs > 0:
            raise ConfigError("StreamLimits.max_msgs", self.max_msgs, "an integer > 0")


def stream_name(namespace: str) -> str:
    """``troupe-events-{namespace}``: the stream of a namespace's events."""
    return f"troupe-events-{namespace}"


def stream_subjects(namespace: str) -> list[str]:
    """The subjects the stream of ``namespace`` captures: every event topic there."""
    return [f"namespace.{namespace}.component.*.*"]


def bucket_name(namespace: str) -> str:
    """``troupe-snapshots-{namespace}``: the object store of a namespace's snapshots."""
    return f"troupe-snapshots-{namespace}"


def object_name(scope: EventScope, name: str) -> str:
    """``{component}.{name}``: a snapshot's object in its namespace's bucket."""
    return f"{scope.component}.{validate_name('snapshot', name)}"


def _failure(exc: BaseException, where: str, what: str) -> TransportError:
    if isinstance(exc, nats.js.errors.APIError):
        return TransportError(f"NATS at {where} refused to {what}: {exc}", address=where)
    return ConnectionLost(f"cannot {what} on NATS at {where}: {exc!r}", address=where)


async def _stream_info(js: JetStreamContext, stream: str, where: str) -> api.StreamInfo | None:
    try:
        return await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return None
    except (nats.errors.Error, TimeoutError) as exc:
        raise _failure(exc, where, f"look up stream {stream}") from exc


async def ensure_stream(
    js: JetStreamContext, namespace: str, limits: StreamLimits, where: str
) -> None:
    """Create the stream of ``namespace`` unless it exists.

    Raises:
        TransportError: JetStream refused (not enabled, or another stream captures the subjects).
        ConnectionLost: NATS could not be reached.
    """
    stream = stream_name(namespace)
    if await _stream_info(js, stream, where) is not None:
        return
    config = api.StreamConfig(
        name=stream,
        subjects=stream_subjects(namespace),
        max_age=limits.max_age,
        max_msgs=limits.max_msgs,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.OLD,
        description=f"troupe event plane: the events of namespace {namespace}",
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.APIError as exc:
        # Another process may have created it a moment ago (with other limits): use theirs.
        if await _stream_info(js, stream, where) is None:
            raise _failure(exc, where, f"create stream {stream}") from exc
    except (nats.errors.Error, TimeoutError) as exc:
        raise _failure(exc, where, f"create stream {stream}") from exc


async def replay(
    js: JetStreamContext,
    stream: str,
    subject: str,
    *,
    after_sequence: int | None,
    callback: Callable[[Msg], Awaitable[None]],
    where: str,
) -> Subscription:
    """Subscribe ``callback`` to ``subject``'s events in ``stream``: stored ones first, then live.

    Args:
        js: the JetStream context.
        stream: the stream name.
        subject: one topic's subject.
        after_sequence: replay from the sequence after it; None: from the stream's start.
        callback: nats-py's message callback.
        where: the servers, for messages.

    Raises:
        ReplayUnavailable: the stream no longer holds every event after ``after_sequence``.
        ConfigError: ``after_sequence`` is negative.
    """
    if after_sequence is None:
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
    else:
        if isinstance(after_sequence, bool) or after_sequence < 0:
            raise ConfigError("after_sequence", after_sequence, "a stream sequence >= 0")
        info = await _stream_info(js, stream, where)
        first = info.state.first_seq if info is not None else 0
        last = info.state.last_seq if info is not None else 0
        if first > after_sequence + 1 or after_sequence > last:
            raise ReplayUnavailable(stream, after_sequence, first, last)
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_sequence + 1
        )
    return await js.subscribe(
        subject,
        stream=stream,
        cb=callback,
        ordered_consumer=True,
        idle_heartbeat=_HEARTBEAT,
        config=config,
    )


async def _bucket(
    js: JetStreamContext, namespace: str, *, create: bool, where: str
) -> ObjectStore | None:
    bucket = bucket_name(namespace)
    try:
        return await js.object_store(bucket)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            return None
    except (nats.errors.Error, TimeoutError) as exc:
        raise _failure(exc, where, f"open object store {bucket}") from exc
    try:
        return await js.create_object_store(
            bucket,
            storage=api.StorageType.FILE,
            description=f"troupe event plane: snapshots of namespace {namespace}",
        )
    except (nats.errors.Error, TimeoutError) as exc:
        raise _failure(exc, where, f"create object store {bucket}") from exc


async def save_snapshot(
    js: JetStreamContext, scope: EventScope, name: str, data: bytes, *, sequence: int, where: str
) -> None:
    """Store ``data`` as snapshot ``name`` of ``scope``, covering the stream up to ``sequence``.

    Raises:
        ConfigError: ``sequence`` is negative or ``name`` is malformed.
        TransportError: NATS refused or could not be reached.
    """
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        raise ConfigError("sequence", sequence, "a stream sequence >= 0")
    obj = object_name(scope, name)
    store = await _bucket(js, scope.namespace, create=True, where=where)
    assert store is not None
    meta = api.ObjectMeta(name=obj, headers={SEQUENCE_HEADER: [str(sequence)]})
    try:
        await store.put(obj, bytes(data), meta=meta)
    except (nats.errors.Error, TimeoutError) as exc:
        raise _failure(exc, where, f"save snapshot {obj}") from exc


async def load_snapshot(
    js: JetStreamContext, scope: EventScope, name: str, where: str
) -> tuple[bytes, int] | None:
    """Snapshot ``name`` of ``scope`` and the stream sequence it covers; None if there is none.

    Raises:
        TransportError: NATS refused, could not be reached, or the object is not a snapshot.
    """
    obj = object_name(scope, name)
    store = await _bucket(js, scope.namespace, create=False, where=where)
    if store is None:
        return None
    buffer = io.BytesIO()
    try:
        result = await store.get(obj, writeinto=buffer)
    except nats.js.errors.NotFoundError:  # ObjectNotFoundError, ObjectDeletedError
        return None
    except (nats.errors.Error, TimeoutError) as exc:
        raise _failure(exc, where, f"load snapshot {obj}") from exc
    headers = result.info.headers or {}
    value = headers.get(SEQUENCE_HEADER)
    text = value[0] if isinstance(value, list) and value else value
    try:
        sequence = int(str(text))
    except ValueError:
        raise TransportError(
            f"object {obj} in {bucket_name(scope.namespace)} at {where} is not a troupe "
            f"snapshot (no {SEQUENCE_HEADER} header)",
            address=where,
        ) from None
    return buffer.getvalue(), sequence
