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
discovery) and ``memory`` (one process, for tests).
"""

from __future__ import annotations

import asyncio
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Self, TypeVar

import msgspec

from troupe.errors import InvalidName, ProtocolError

__all__ = [
    "Envelope",
    "EventPlane",
    "EventPublisher",
    "EventScope",
    "EventSubscription",
    "MemoryEventPlane",
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

    def __init__(self, scope: EventScope, topic: str, publisher_id: str) -> None:
        self.scope = scope
        self.topic = validate_topic(topic)
        self.publisher_id = publisher_id
        self._sequence = 0

    def _next(self, event: msgspec.Struct | bytes) -> Envelope:
        self._sequence += 1
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
    are counted (:attr:`malformed`) and dropped; iteration goes on.
    """

    def __init__(self, scope: EventScope, topic: str) -> None:
        self.scope = scope
        self.topic = validate_topic(topic)
        self.malformed = 0
        self.received = 0

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
    """One process's access to the event plane: publishers and subscriptions by scope and topic."""

    name: str = ""

    @abstractmethod
    async def publisher(self, scope: EventScope, topic: str, publisher_id: str) -> EventPublisher:
        """A publisher of ``topic`` in ``scope``, identified as ``publisher_id``.

        Raises:
            TransportError: the plane cannot be reached.
        """

    @abstractmethod
    async def subscribe(self, scope: EventScope, topic: str) -> EventSubscription:
        """Subscribe to ``topic`` in ``scope``; events published from now on are received.

        Raises:
            TransportError: the plane cannot be reached.
        """

    @abstractmethod
    async def close(self) -> None:
        """Close every publisher and subscription of this plane."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class MemoryEventPlane(EventPlane):
    """An event plane inside one process: every plane built on the same hub sees the others.

    For tests and single-process programs. Delivery is immediate and lossless; a slow subscriber
    keeps what it has not read (unbounded), so use it where publishers are bounded.
    """

    name = "memory"

    class Hub:
        """What the memory planes of one process share."""

        def __init__(self) -> None:
            self.subscribers: dict[tuple[EventScope, str], set[_MemorySubscription]] = {}

    def __init__(self, hub: MemoryEventPlane.Hub | None = None) -> None:
        self.hub = hub if hub is not None else MemoryEventPlane.Hub()
        self._subscriptions: set[_MemorySubscription] = set()

    async def publisher(self, scope: EventScope, topic: str, publisher_id: str) -> EventPublisher:
        return _MemoryPublisher(self.hub, scope, topic, publisher_id)

    async def subscribe(self, scope: EventScope, topic: str) -> EventSubscription:
        subscription = _MemorySubscription(self.hub, scope, topic)
        self.hub.subscribers.setdefault((scope, subscription.topic), set()).add(subscription)
        self._subscriptions.add(subscription)
        return subscription

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.close()
        self._subscriptions.clear()


class _MemoryPublisher(EventPublisher):
    def __init__(
        self, hub: MemoryEventPlane.Hub, scope: EventScope, topic: str, publisher_id: str
    ) -> None:
        super().__init__(scope, topic, publisher_id)
        self._hub = hub
        self._closed = False

    async def publish(self, event: msgspec.Struct | bytes) -> Envelope:
        if self._closed:
            raise ProtocolError("publish on a closed event publisher")
        envelope = self._next(event)
        data = encode_envelope(envelope)
        for subscription in self._hub.subscribers.get((self.scope, self.topic), ()):
            subscription.deliver(data)
        return envelope

    async def close(self) -> None:
        self._closed = True


_CLOSED = object()


class _MemorySubscription(EventSubscription):
    def __init__(self, hub: MemoryEventPlane.Hub, scope: EventScope, topic: str) -> None:
        super().__init__(scope, topic)
        self._hub = hub
        self._queue: asyncio.Queue[bytes | object] = asyncio.Queue()
        self._closed = False

    def deliver(self, data: bytes) -> None:
        """Queue raw bytes as a publisher (or a test sending garbage) would."""
        if not self._closed:
            self._queue.put_nowait(data)

    async def _iterate(self) -> AsyncIterator[Envelope]:
        while True:
            item = await self._queue.get()
            if item is _CLOSED:
                return
            assert isinstance(item, bytes)
            try:
                envelope = decode_envelope(item)
            except ProtocolError:
                self.malformed += 1
                continue
            self.received += 1
            yield envelope

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.subscribers.get((self.scope, self.topic), set()).discard(self)
        self._queue.put_nowait(_CLOSED)
