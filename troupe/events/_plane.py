"""The event plane's seam: typed events published on a topic, received as an async iterator.

An event plane carries small, frequent, loss-tolerant messages beside the request plane: KV-cache
events from workers to routers, routing decisions between router replicas. Every event travels
in an :class:`Envelope` (publisher instance id, per-publisher sequence number, publish time,
topic, payload); the payload is msgpack of a tagged msgspec struct, decoded by the subscriber
with the union it expects (:func:`decode_payload_as`).

Topics are scoped by namespace and component (:class:`EventScope`), as endpoints are. A
publisher's ``sequence`` starts at 1 and grows by one per event on a topic, so a subscriber can
tell a lost event from a late one; the plane itself promises no delivery (NATS core and ZeroMQ
drop under pressure or on a reconnect). What sits on top recovers (see ``troupe.kv``).

Backends implement :class:`EventPlane`: ``nats`` (NATS core subjects, optionally JetStream for a
durable, replayable stream), ``zmq`` (brokerless: a PUB socket per publisher, registered in
discovery) and ``memory`` (one process, for tests). Only a durable plane
(:attr:`EventPlane.durable`) replays (``subscribe(..., from_start=True)`` or
``after_sequence=N``) and keeps snapshots (:meth:`EventPlane.save_snapshot`); the others refuse
with a ``ConfigError``.

Every plane counts, per topic, what it published, received, and dropped as malformed
(:meth:`EventPlane.stats`); a subscription also counts the reconnects of its connection
(:attr:`EventSubscription.reconnects`: events published meanwhile may be lost).
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Self, TypeVar

import msgspec

from troupe.errors import ConfigError, InvalidName, ProtocolError
from troupe.events._metrics import EventMetrics, TopicCounts

__all__ = [
    "Envelope",
    "EventPlane",
    "EventPublisher",
    "EventScope",
    "EventSubscription",
    "decode_envelope",
    "decode_payload_as",
    "encode_envelope",
    "encode_event",
    "validate_topic",
]

_TOPIC_RE = re.compile(r"[a-z0-9_-]+")

T = TypeVar("T")


def validate_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid topic name (``[a-z0-9_-]+``).

    Raises:
        InvalidName: it is not.
    """
    if not isinstance(topic, str) or not _TOPIC_RE.fullmatch(topic):
        raise InvalidName("topic", str(topic), "a name of lower-case letters, digits, '_' and '-'")
    return topic


class EventScope(msgspec.Struct, frozen=True):
    """Where a topic lives: a namespace and a component, as for endpoints."""

    namespace: str
    component: str

    def subject(self, topic: str) -> str:
        """The NATS subject of ``topic`` in this scope."""
        return f"namespace.{self.namespace}.component.{self.component}.{validate_topic(topic)}"


class Envelope(msgspec.Struct, frozen=True, array_like=True):
    """One event as it travels: who sent it, its place in the sender's sequence, its payload."""

    publisher_id: str
    """The publishing runtime's instance id (16 hex digits)."""
    sequence: int
    """1, 2, 3, ... per publisher and topic: a gap means lost events."""
    published_at: float
    """Unix time of publication, in seconds."""
    topic: str
    payload: bytes
    """msgpack of a tagged msgspec struct; see :func:`decode_payload_as`."""


_envelope_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_payload_encoder = msgspec.msgpack.Encoder()


def encode_event(event: msgspec.Struct) -> bytes:
    """The payload bytes of a typed event (msgpack)."""
    return _payload_encoder.encode(event)


def encode_envelope(envelope: Envelope) -> bytes:
    """The wire bytes of an envelope."""
    return _envelope_encoder.encode(envelope)


def decode_envelope(data: bytes) -> Envelope:
    """Decode wire bytes into an :class:`Envelope`.

    Raises:
        ProtocolError: the bytes are not an envelope.
    """
    try:
        return _envelope_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed event envelope: {exc}") from None


_payload_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def decode_payload_as(payload: bytes, kind: type[T]) -> T:
    """Decode an envelope's payload as ``kind`` (a struct or a union of tagged structs).

    Raises:
        ProtocolError: the payload is not a ``kind``.
    """
    decoder = _payload_decoders.get(kind)
    if decoder is None:
        decoder = _payload_decoders.setdefault(kind, msgspec.msgpack.Decoder(kind))
    try:
        return decoder.decode(payload)  # type: ignore[no-any-return]
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed event payload: {exc}") from None


class EventPublisher(ABC):
    """Publishes events on one topic of one scope, numbering them 1, 2, 3, ..."""

    def __init__(
        self, scope: EventScope, topic: str, publisher_id: str, counts: TopicCounts | None = None
    ) -> None:
        self.scope = scope
        self.topic = validate_topic(topic)
        self.publisher_id = publisher_id
        self._sequence = 0
        self._counts = counts if counts is not None else TopicCounts()

    def _next(self, event: msgspec.Struct | bytes) -> Envelope:
        self._sequence += 1
        self._counts.published += 1
        payload = event if isinstance(event, bytes) else encode_event(event)
        return Envelope(self.publisher_id, self._sequence, time.time(), self.topic, payload)

    @property
    def sequence(self) -> int:
        """The sequence number of the last event published (0: none yet)."""
        return self._sequence

    @abstractmethod
    async def publish(self, event: msgspec.Struct | bytes) -> Envelope:
        """Publish one event (a struct, or payload bytes already encoded); return its envelope.

        Returns once the event is handed to the plane, not when anyone has received it.

        Raises:
            TransportError: the plane is closed or its connection is gone.
        """

    @abstractmethod
    async def close(self) -> None:
        """Stop publishing; a zmq publisher unregisters its channel."""


class EventSubscription(ABC):
    """Envelopes of one topic of one scope, from every publisher, as an async iterator.

    Iteration ends when the subscription or its plane is closed. Bytes that are not an envelope
    of this topic are counted (:attr:`malformed`) and dropped; iteration goes on.

    Attributes:
        received: envelopes delivered so far.
        malformed: messages dropped because they were not an envelope of this topic.
        reconnects: how many times the plane's connection came back after a loss (NATS) while
            this subscription was open. Events published during the gap may be lost: a reader
            that keeps state from the events compares it before and after each event (per-
            publisher sequence gaps catch the rest). Brokerless ``zmq`` and ``memory`` leave it 0.
        stream_sequence: durable subscriptions only: the stream sequence of the last envelope
            delivered (0 before the first); save it with a snapshot of what was folded so far,
            and subscribe with ``after_sequence`` to resume after it.
    """

    def __init__(self, scope: EventScope, topic: str, counts: TopicCounts | None = None) -> None:
        self.scope = scope
        self.topic = validate_topic(topic)
        self.malformed = 0
        self.received = 0
        self.reconnects = 0
        self.stream_sequence = 0
        self._counts = counts if counts is not None else TopicCounts()

    def _accept(self, data: bytes) -> Envelope | None:
        """Decode and count one message: its envelope, or None (counted malformed) if it is not
        an envelope of this topic."""
        try:
            envelope = decode_envelope(data)
        except ProtocolError:
            envelope = None
        if envelope is None or envelope.topic != self.topic:
            self.malformed += 1
            self._counts.malformed += 1
            return None
        self.received += 1
        self._counts.received += 1
        return envelope

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._iterate()

    @abstractmethod
    def _iterate(self) -> AsyncIterator[Envelope]: ...

    @abstractmethod
    async def close(self) -> None:
        """Stop receiving; iteration ends."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class EventPlane(ABC):
    """One process's access to the event plane: publishers and subscriptions by scope and topic.

    ``async with plane:`` connects it (:meth:`connect`) and closes it; :meth:`publisher` and
    :meth:`subscribe` connect it too when needed.
    """

    name: str = ""

    durable: bool = False
    """Whether the plane keeps events in a stream: replay and snapshots (``nats`` with
    ``DYN_DURABLE_KV_EVENTS``)."""

    def __init__(self) -> None:
        self.metrics = EventMetrics()

    def _counts(self, scope: EventScope, topic: str) -> TopicCounts:
        return self.metrics.topic(scope.namespace, scope.component, validate_topic(topic))

    def stats(self) -> dict[str, dict[str, int]]:
        """Per topic (``"namespace.component.topic"``): events ``published``, ``received``,
        ``malformed`` and ``dropped`` by this plane's publishers and subscriptions, so far."""
        return self.metrics.stats()

    async def connect(self) -> None:  # noqa: B027 - a plane without a connection has nothing to do
        """Open the plane's connection, within its connect timeout; idempotent.

        Raises:
            TransportError: the plane cannot be reached (the message says how to turn events off).
        """

    @abstractmethod
    async def publisher(self, scope: EventScope, topic: str, publisher_id: str) -> EventPublisher:
        """A publisher of ``topic`` in ``scope``, identified as ``publisher_id``.

        Raises:
            TransportError: the plane cannot be reached.
        """

    @abstractmethod
    async def subscribe(
        self,
        scope: EventScope,
        topic: str,
        *,
        from_start: bool = False,
        after_sequence: int | None = None,
    ) -> EventSubscription:
        """Subscribe to ``topic`` in ``scope``; events published from now on are received.

        Args:
            scope: the topic's namespace and component.
            topic: the topic.
            from_start: durable planes only: first replay every event the stream still holds.
            after_sequence: durable planes only: first replay the events after this stream
                sequence (a snapshot's, see :meth:`load_snapshot`).

        Raises:
            TransportError: the plane cannot be reached.
            ConfigError: replay was asked of a plane that keeps no stream.
            ReplayUnavailable: the stream no longer holds the events after ``after_sequence``.
        """

    async def save_snapshot(
        self, scope: EventScope, name: str, data: bytes, *, sequence: int
    ) -> None:
        """Store ``data`` (an index folded from the stream) as snapshot ``name`` of ``scope``.

        Args:
            scope: the namespace (and component) the snapshot belongs to.
            name: the snapshot's name (``[a-z0-9_-]+``); a later save replaces it.
            data: the snapshot's bytes.
            sequence: the stream sequence of the last event folded into ``data``
                (:attr:`EventSubscription.stream_sequence`).

        Raises:
            ConfigError: the plane keeps no stream (only durable planes keep snapshots).
            TransportError: the plane cannot be reached.
        """
        raise self._not_durable()

    async def load_snapshot(self, scope: EventScope, name: str) -> tuple[bytes, int] | None:
        """Snapshot ``name`` of ``scope`` and the stream sequence it covers, or None if absent.

        Raises:
            ConfigError: the plane keeps no stream (only durable planes keep snapshots).
            TransportError: the plane cannot be reached.
        """
        raise self._not_durable()

    def _not_durable(self) -> ConfigError:
        return ConfigError(
            "DYN_DURABLE_KV_EVENTS",
            False,
            f"true with DYN_EVENT_PLANE=nats: the {self.name or 'this'} event plane keeps no "
            "stream to replay or snapshot",
        )

    def _check_replay(self, from_start: bool, after_sequence: int | None) -> None:
        """Refuse replay on a plane that keeps no stream."""
        if (from_start or after_sequence is not None) and not self.durable:
            raise self._not_durable()

    @abstractmethod
    async def close(self) -> None:
        """Close every publisher and subscription of this plane."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
