"""The ``zmq`` event plane: brokerless. Each publisher binds a socket; discovery says where.

A publisher binds an XPUB socket (a PUB that also sees its subscribers come and go) on an
OS-assigned port of the host troupe advertises, and registers its **event channel** in the
discovery store under the runtime's lease: key
``/event_channels/{namespace}/{component}/{topic}/{publisher_id}``, JSON value
``{"address": "tcp://host:port", "publisher_id": ..., "topic": ...}``
(:mod:`troupe.messages._channels`). The channel vanishes with the lease: a publisher that dies
leaves the subscribers' sets within the lease TTL. Each message is two frames,
``[topic, envelope]``.

A subscription is one SUB socket, connected to every channel of its topic: it watches the
channel prefix in the store (a snapshot, then puts and deletes) and connects or disconnects as
publishers join and leave (:mod:`troupe.events._zmq_subscription`). Channels written without a
lease are ignored, as routers ignore such instance records.

Delivery: at most once, no server. ZeroMQ drops events a slow subscriber cannot take (its
high-water mark) and those sent before a new subscriber's connection is up; the envelopes'
per-publisher sequence numbers show the gaps.

Layering: the event plane sits above discovery (it uses the :class:`~troupe.discovery.
KeyValueStore` interface and nothing else of it) and below the actors. Every socket is touched
only by the event loop that created the plane (the runtime's I/O loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from typing import Final, Protocol

import msgspec
import zmq
import zmq.asyncio

from troupe._support._logging import get_logger
from troupe._support._net import WILDCARD_HOSTS, advertised_host, detect_host, format_hostport
from troupe.discovery import KeyValueStore
from troupe.errors import ConfigError, DiscoveryError, TransportClosed, TransportError
from troupe.events._plane import (
    Envelope,
    EventPlane,
    EventPublisher,
    EventScope,
    EventSubscription,
    encode_envelope,
)
from troupe.events._zmq_subscription import ZmqSubscription, stop_task
from troupe.messages._channels import EventChannel, channel_key, encode_channel

__all__ = ["ChannelRegistrar", "ZmqEventPlane"]


class ChannelRegistrar(Protocol):
    """Writes and removes event-channel records for a plane instead of its own ``store`` and
    ``lease``: a runtime passes its lease keeper, which rewrites them when the lease is re-taken."""

    async def register(self, key: str, value: bytes) -> None:
        """Write ``value`` at ``key``, bound to the process's lease; return once written."""
        ...

    async def unregister(self, key: str) -> None:
        """Remove ``key``."""
        ...


_log = get_logger("troupe.events.zmq")

# Events queued per subscriber connection before ZeroMQ drops new ones for it.
_SEND_HWM: Final = 10_000
_SUBSCRIBE: Final = 1  # first byte of an XPUB subscription message; 0 is an unsubscription


def _bind_host(host: str) -> str:
    """An IP literal libzmq can bind (it binds interfaces and addresses, not host names)."""
    if host in WILDCARD_HOSTS:
        return "::" if host == "::" else "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            return socket.gethostbyname(host)
        except OSError as exc:
            raise ConfigError("host", host, f"a host name this machine resolves ({exc})") from exc
    return host


class ZmqEventPlane(EventPlane):
    """The brokerless event plane: sockets between processes, found through discovery.

    Args:
        store: the runtime's discovery store (connected); channels are registered and watched
            there.
        lease: the runtime's lease; publishers' channels are bound to it. A plane without one
            can subscribe but not publish.
        host: the address publishers bind and advertise (default: this machine's routable
            address, as the tcp request plane picks it).
        resync_delay: seconds before a subscription watches again after losing the store.
        registrar: writes the channel records instead of ``store`` and ``lease`` (``lease`` may
            then be None): a runtime's lease keeper, which re-registers them after a lost lease.
    """

    name = "zmq"

    def __init__(
        self,
        store: KeyValueStore,
        lease: int | None,
        *,
        host: str | None = None,
        resync_delay: float = 0.5,
        registrar: ChannelRegistrar | None = None,
    ) -> None:
        super().__init__()
        self.store = store
        self._lease = lease
        self._registrar = registrar
        self._host = host
        self._resync_delay = resync_delay
        self._ctx: zmq.asyncio.Context | None = None
        self._closed = False
        self._publishers: dict[str, ZmqPublisher] = {}  # by channel key
        self._subscriptions: set[ZmqSubscription] = set()

    @property
    def lease(self) -> int | None:
        """The lease the publishers' channels are bound to."""
        return self._lease

    async def set_lease(self, lease: int) -> None:
        """Bind every publisher's channel to a new lease (after the old one was lost).

        Raises:
            DiscoveryError: the store refused the writes.
        """
        self._lease = lease
        for publisher in list(self._publishers.values()):
            await publisher.register(lease)

    def _context(self) -> zmq.asyncio.Context:
        if self._closed:
            raise TransportClosed("the zmq event plane is closed")
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        return self._ctx

    async def publisher(self, scope: EventScope, topic: str, publisher_id: str) -> EventPublisher:
        """Bind a socket for ``topic`` and register its channel under the lease.

        Raises:
            ConfigError: the plane has no lease, or the host cannot be bound.
            TransportError: this plane already has a publisher of ``topic`` as ``publisher_id``.
            DiscoveryError: the store refused the channel.
        """
        if self._lease is None and self._registrar is None:
            raise ConfigError(
                "lease", None, "the runtime's discovery lease: subscribers ignore channels without"
            )
        key = channel_key(scope.namespace, scope.component, topic, publisher_id)
        if key in self._publishers:
            raise TransportError(f"this process already publishes {topic} as {publisher_id}")
        wanted = self._host if self._host is not None else detect_host()
        publisher = ZmqPublisher(self, scope, topic, publisher_id, key)
        publisher.bind(self._context(), wanted)
        self._publishers[key] = publisher
        try:
            await publisher.register(self._lease)  # type: ignore[arg-type]  # or the registrar's
        except BaseException:
            await publisher.close()
            raise
        return publisher

    async def subscribe(
        self,
        scope: EventScope,
        topic: str,
        *,
        from_start: bool = False,
        after_sequence: int | None = None,
    ) -> EventSubscription:
        """Open a SUB socket and follow the channels of ``topic`` in the store.

        Returns once the current channels are connected (the first snapshot is applied).
        """
        self._check_replay(from_start, after_sequence)
        subscription = ZmqSubscription(
            self._context(),
            self.store,
            scope,
            topic,
            self._counts(scope, topic),
            resync_delay=self._resync_delay,
            on_close=self._subscriptions.discard,
        )
        self._subscriptions.add(subscription)
        try:
            await subscription.start()
        except BaseException:
            await subscription.close()
            raise
        return subscription

    def _forget(self, key: str) -> None:
        self._publishers.pop(key, None)

    async def close(self) -> None:
        """Close every subscription and publisher (unregistering its channel). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.close()
        for publisher in list(self._publishers.values()):
            await publisher.close()
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.term()


class ZmqPublisher(EventPublisher):
    """One topic's XPUB socket and its channel in discovery.

    Attributes:
        address: ``tcp://host:port`` it advertises.
        subscribers: subscriptions connected now, as the socket sees them.
    """

    def __init__(
        self, plane: ZmqEventPlane, scope: EventScope, topic: str, publisher_id: str, key: str
    ) -> None:
        super().__init__(scope, topic, publisher_id, plane._counts(scope, topic))
        self._plane = plane
        self.key = key
        self.address = ""
        self.subscribers = 0
        self._topic = self.topic.encode()
        self._sock: zmq.asyncio.Socket | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False

    def bind(self, ctx: zmq.asyncio.Context, wanted: str) -> None:
        """Bind the socket on an OS-assigned port of ``wanted`` and start counting subscribers.

        Raises:
            ConfigError: the host cannot be bound.
        """
        host = _bind_host(wanted)
        sock = ctx.socket(zmq.XPUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, _SEND_HWM)
            sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscription, to count subscribers
            ipv6 = ":" in host
            if ipv6:
                sock.setsockopt(zmq.IPV6, 1)
            sock.bind(f"tcp://{f'[{host}]' if ipv6 else host}:*")
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError("host", wanted, f"an address this machine can bind ({exc})") from exc
        port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.address = f"tcp://{format_hostport(advertised_host(host), port)}"
        self._sock = sock
        self._watcher = asyncio.get_running_loop().create_task(
            self._count_subscribers(sock), name=f"ZmqPublisher-{self.topic}-subscribers"
        )

    async def register(self, lease: int) -> None:
        """Write the channel record under ``lease``."""
        channel = EventChannel(
            address=self.address, publisher_id=self.publisher_id, topic=self.topic
        )
        registrar = self._plane._registrar
        if registrar is not None:
            await registrar.register(self.key, encode_channel(channel))
        else:
            await self._plane.store.put(self.key, encode_channel(channel), lease=lease)
        _log.debug("event channel registered", key=self.key, address=self.address)

    async def _count_subscribers(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            message = frames[0] if frames else b""
            if message[:1] == bytes((_SUBSCRIBE,)):
                self.subscribers += 1
            elif message[:1] == b"\x00":
                self.subscribers = max(0, self.subscribers - 1)

    async def publish(self, event: msgspec.Struct | bytes) -> Envelope:
        sock = self._sock
        if self._closed or sock is None:
            raise TransportClosed(f"the event publisher of {self.topic} is closed")
        envelope = self._next(event)
        try:
            await sock.send_multipart((self._topic, encode_envelope(envelope)))
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot publish on {self.address}: {exc}") from exc
        return envelope

    async def close(self) -> None:
        """Unregister the channel and close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._plane._forget(self.key)
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await stop_task(watcher)
        registrar = self._plane._registrar
        with contextlib.suppress(DiscoveryError):
            if registrar is not None:
                await registrar.unregister(self.key)
            else:
                await self._plane.store.delete(self.key)
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=0)
