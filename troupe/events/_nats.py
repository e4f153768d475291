"""The ``nats`` event plane: events on NATS core subjects, optionally kept in a JetStream stream.

Subject of a topic: ``namespace.{ns}.component.{comp}.{topic}`` (:meth:`EventScope.subject`);
the message body is the envelope's bytes. One NATS connection per plane, opened like the request
plane's (:mod:`troupe._support._nats`: ``NATS_SERVER``, credentials, TLS, a bounded connect
timeout, reconnecting forever after).

- Core (default): at most once. A subscription keeps going across reconnects (nats-py
  re-subscribes), and each reconnect bumps :attr:`~troupe.events.EventSubscription.reconnects`
  of every open subscription: events published while the connection was down are lost.
- Durable (``durable=True``, ``DYN_DURABLE_KV_EVENTS``): publishers publish through JetStream
  (acknowledged, one round trip per event) into a stream per namespace, which live core
  subscribers receive as before; ``subscribe(..., from_start=True)`` or ``after_sequence=N``
  replays the stream with an ordered consumer, then goes on live. Snapshots of folded indexes
  live in an object store bucket per namespace. See :mod:`troupe.events._jetstream`.

Unreachable NATS at start: one ``ConnectionLost`` naming ``NATS_SERVER`` and saying how to turn
events off, within ``DYN_NATS_CONNECT_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from typing import Final

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from troupe._support._logging import get_logger
from troupe._support._nats import NatsClient, close_quietly, open_connection, servers_text
from troupe.config import NatsConfig
from troupe.errors import ConnectionLost, RequestTimeout, TransportClosed, TransportError
from troupe.events import _jetstream
from troupe.events._jetstream import StreamLimits
from troupe.events._metrics import TopicCounts
from troupe.events._plane import (
    Envelope,
    EventPlane,
    EventPublisher,
    EventScope,
    EventSubscription,
    encode_envelope,
)

__all__ = ["NatsEventPlane"]

_log = get_logger("troupe.events.nats")

# Envelopes a subscription holds for a reader that has not caught up; core events beyond it are
# dropped (and counted), stream events wait (the ordered consumer re-fetches what NATS drops).
_QUEUE_LIMIT: Final = 65_536

_HINT: Final = (
    "the event plane needs it (DYN_EVENT_PLANE=nats): start NATS, set DYN_EVENT_PLANE=zmq for "
    "brokerless events, or pass --no-kv-events to turn KV events off"
)


class NatsEventPlane(EventPlane):
    """The event plane over one NATS connection.

    Args:
        config: the NATS connection (``NATS_SERVER``, ``NATS_AUTH_*``, timeouts).
        durable: also keep events in a JetStream stream per namespace (replay, snapshots).
        limits: the stream's limits, when this plane creates it.
        name: the connection's name as the NATS server shows it.
    """

    name = "nats"

    def __init__(
        self,
        config: NatsConfig | None = None,
        *,
        durable: bool = False,
        limits: StreamLimits | None = None,
        name: str = "troupe-events",
    ) -> None:
        super().__init__()
        self.config = config if config is not None else NatsConfig()
        self.durable = durable
        self.limits = limits if limits is not None else StreamLimits()
        self._client_name = name
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._streams: set[str] = set()  # namespaces whose stream is known to exist
        self._publishers: set[_NatsPublisher] = set()
        self._subscriptions: set[_NatsSubscription] = set()

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (False while it reconnects)."""
        return self._nc is not None and self._nc.is_connected

    async def connect(self) -> None:
        """Connect within ``DYN_NATS_CONNECT_TIMEOUT``; idempotent.

        Raises:
            ConnectionLost: NATS did not answer; the message names ``NATS_SERVER`` and says how
                to run without it.
            TransportError: NATS refused the credentials.
            TransportClosed: the plane was closed.
        """
        async with self._lock:
            if self._closed:
                raise TransportClosed("the NATS event plane is closed")
            if self._nc is not None:
                return
            try:
                nc = await open_connection(
                    self.config,
                    self._client_name,
                    disconnected=self._on_disconnected,
                    reconnected=self._on_reconnected,
                    log=_log,
                )
            except ConnectionLost as exc:
                raise ConnectionLost(f"{exc}; {_HINT}", address=exc.address) from exc
            self._nc = nc
            self._js = nc.jetstream(timeout=self.config.request_timeout)

    def _connection(self) -> tuple[NatsClient, JetStreamContext]:
        if self._closed:
            raise TransportClosed("the NATS event plane is closed")
        if self._nc is None or self._js is None:
            raise TransportError("the NATS event plane is not connected")
        return self._nc, self._js

    async def _ensure_stream(self, namespace: str) -> str:
        """The name of ``namespace``'s stream, created if missing (durable planes)."""
        stream = _jetstream.stream_name(namespace)
        if namespace not in self._streams:
            _, js = self._connection()
            await _jetstream.ensure_stream(js, namespace, self.limits, self._where())
            self._streams.add(namespace)
        return stream

    def _where(self) -> str:
        return servers_text(self.config)

    async def publisher(self, scope: EventScope, topic: str, publisher_id: str) -> EventPublisher:
        await self.connect()
        stream = await self._ensure_stream(scope.namespace) if self.durable else None
        nc, _ = self._connection()
        try:
            # nats-server makes a new subscription visible to other connections a moment after
            # it answers the subscriber's flush: events published at once may miss it (measured
            # here: 1 in 15 with nats-server 2.15). One round trip from this connection first
            # closed that window in 1,500 of 1,500 tries. Subscribers still recover what they
            # miss (a KV follower asks the worker).
            await nc.flush(timeout=max(1, math.ceil(self.config.request_timeout)))
        except (nats.errors.Error, TimeoutError) as exc:
            raise _translate(
                exc, self._where(), "reach the server", self.config.request_timeout
            ) from exc
        publisher = _NatsPublisher(self, scope, topic, publisher_id, stream)
        self._publishers.add(publisher)
        return publisher

    async def subscribe(
        self,
        scope: EventScope,
        topic: str,
        *,
        from_start: bool = False,
        after_sequence: int | None = None,
    ) -> EventSubscription:
        self._check_replay(from_start, after_sequence)
        await self.connect()
        nc, js = self._connection()
        subscription = _NatsSubscription(self, scope, topic, self._counts(scope, topic))
        subject = scope.subject(topic)
        try:
            if from_start or after_sequence is not None:
                stream = await self._ensure_stream(scope.namespace)
                subscription.sub = await _jetstream.replay(
                    js,
                    stream,
                    subject,
                    after_sequence=after_sequence,
                    callback=subscription.on_stream,
                    where=self._where(),
                )
            else:
                subscription.sub = await nc.subscribe(subject, cb=subscription.on_core)
                # The server has the interest once this answers, though other connections may
                # see it a moment later (see publisher()).
                await nc.flush(timeout=max(1, math.ceil(self.config.request_timeout)))
        except (nats.errors.Error, TimeoutError) as exc:
            await subscription.close()
            raise _translate(
                exc, self._where(), f"subscribe to {subject}", self.config.request_timeout
            ) from exc
        except BaseException:
            await subscription.close()
            raise
        self._subscriptions.add(subscription)
        return subscription

    async def save_snapshot(
        self, scope: EventScope, name: str, data: bytes, *, sequence: int
    ) -> None:
        if not self.durable:
            raise self._not_durable()
        await self.connect()
        _, js = self._connection()
        await _jetstream.save_snapshot(
            js, scope, name, data, sequence=sequence, where=self._where()
        )

    async def load_snapshot(self, scope: EventScope, name: str) -> tuple[bytes, int] | None:
        if not self.durable:
            raise self._not_durable()
        await self.connect()
        _, js = self._connection()
        return await _jetstream.load_snapshot(js, scope, name, self._where())

    async def _on_disconnected(self) -> None:
        if not self._closed:
            _log.warning("event plane lost its NATS connection", servers=self._where())

    async def _on_reconnected(self) -> None:
        _log.info("event plane's NATS connection restored", servers=self._where())
        for subscription in self._subscriptions:
            subscription.reconnects += 1

    def _forget(self, item: _NatsPublisher | _NatsSubscription) -> None:
        if isinstance(item, _NatsPublisher):
            self._publishers.discard(item)
        else:
            self._subscriptions.discard(item)

    async def close(self) -> None:
        """Close every publisher and subscription, then the connection. Idempotent."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.close()
        for publisher in list(self._publishers):
            await publisher.close()
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            await close_quietly(nc, _log)


def _translate(exc: BaseException, where: str, what: str, timeout: float) -> TransportError:
    """A nats-py failure as troupe's error."""
    if isinstance(exc, nats.errors.TimeoutError | TimeoutError):
        return RequestTimeout(where, timeout)
    if isinstance(exc, nats.js.errors.APIError):
        return TransportError(f"NATS at {where} refused to {what}: {exc}", address=where)
    return ConnectionLost(f"cannot {what} on NATS at {where}: {exc!r}", address=where)


class _NatsPublisher(EventPublisher):
    def __init__(
        self,
        plane: NatsEventPlane,
        scope: EventScope,
        topic: str,
        publisher_id: str,
        stream: str | None,
    ) -> None:
        super().__init__(scope, topic, publisher_id, plane._counts(scope, topic))
        self._plane = plane
        self._subject = scope.subject(topic)
        self._stream = stream
        self._closed = False

    async def publish(self, event: msgspec.Struct | bytes) -> Envelope:
        if self._closed:
            raise TransportClosed(f"the event publisher of {self._subject} is closed")
        nc, js = self._plane._connection()
        envelope = self._next(event)
        data = encode_envelope(envelope)
        try:
            if self._stream is None:
                await nc.publish(self._subject, data)
            else:
                await js.publish(self._subject, data, stream=self._stream)
        except (nats.errors.Error, TimeoutError) as exc:
            where, timeout = self._plane._where(), self._plane.config.request_timeout
            raise _translate(exc, where, f"publish on {self._subject}", timeout) from exc
        return envelope

    async def close(self) -> None:
        self._closed = True
        self._plane._forget(self)


_END: Final = None


class _NatsSubscription(EventSubscription):
    """Envelopes queued by nats-py's callback (core, or a JetStream ordered consumer)."""

    def __init__(
        self, plane: NatsEventPlane, scope: EventScope, topic: str, counts: TopicCounts
    ) -> None:
        super().__init__(scope, topic, counts)
        self._plane = plane
        self._queue: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue(_QUEUE_LIMIT)
        self._closed = False
        self.sub: Subscription | None = None

    async def on_core(self, msg: Msg) -> None:
        """nats-py's callback for a core subscription: queue, or drop if the reader lags."""
        try:
            self._queue.put_nowait((msg.data, 0))
        except asyncio.QueueFull:
            self._counts.dropped += 1

    async def on_stream(self, msg: Msg) -> None:
        """nats-py's callback for a stream subscription: queue with the stream sequence, waiting
        for room (nothing stored is dropped here)."""
        try:
            sequence = msg.metadata.sequence.stream
        except (nats.errors.Error, ValueError, IndexError, AttributeError):
            sequence = 0  # not a stream message: the envelope check decides
        await self._queue.put((msg.data, sequence))

    def _iterate(self) -> AsyncIterator[Envelope]:
        return _drain(self, self._queue)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        sub, self.sub = self.sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._plane._forget(self)
        with contextlib.suppress(asyncio.QueueFull):  # a full queue has no reader waiting
            self._queue.put_nowait(_END)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed


async def _drain(
    subscription: _NatsSubscription, queue: asyncio.Queue[tuple[bytes, int] | None]
) -> AsyncIterator[Envelope]:
    accept: Callable[[bytes], Envelope | None] = subscription._accept
    while True:
        item = await queue.get()
        if item is None or subscription.closed:
            return
        data, sequence = item
        envelope = accept(data)
        if sequence:
            subscription.stream_sequence = sequence
        if envelope is not None:
            yield envelope
