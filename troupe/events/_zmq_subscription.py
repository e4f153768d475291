"""The subscriber side of the ``zmq`` event plane: one SUB socket following a topic's channels.

:class:`ZmqSubscription` watches ``/event_channels/{namespace}/{component}/{topic}/`` in the
discovery store: the first snapshot is applied before :meth:`~ZmqSubscription.start` returns,
then every put connects the SUB socket to a channel's address and every delete (an unregistered
or expired channel) disconnects it. Channels without a lease, and records that do not decode,
are ignored. When the store is lost the subscription keeps its connections, watches again after
a short delay, and applies the difference from the new snapshot.

Two tasks, both owned by the subscription and stopped by :meth:`~ZmqSubscription.close`: the
watcher, and the reader, which takes ``[topic, envelope]`` messages off the socket, counts and
drops anything else, and queues envelopes for the iterator. Both run on the loop that created
the socket, the only one that touches it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Final

import zmq
import zmq.asyncio

from troupe._support._logging import get_logger
from troupe.discovery import Delete, KeyValue, KeyValueStore, Put, Snapshot, Watch, WatchEvent
from troupe.errors import DiscoveryError, InvalidRecord
from troupe.events._metrics import TopicCounts
from troupe.events._plane import Envelope, EventScope, EventSubscription
from troupe.messages._channels import EventChannel, channel_prefix, decode_channel

__all__ = ["ZmqSubscription", "stop_task"]

_log = get_logger("troupe.events.zmq")

_QUEUE_LIMIT: Final = 65_536  # envelopes held for a reader; beyond, the socket's own buffer fills
_RECV_HWM: Final = 10_000
_MAX_MESSAGE: Final = 32 * 1024 * 1024  # a larger message drops its sender's connection
_HEARTBEAT_IVL_MS: Final = 1_000  # a silent dead peer is dropped after the timeout
_HEARTBEAT_TIMEOUT_MS: Final = 3_000
_RECONNECT_IVL_MS: Final = 100  # to a publisher that went away, until its channel is deleted
_RECONNECT_IVL_MAX_MS: Final = 2_000


async def stop_task(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end; a failure it ended with is logged, not raised."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and task.exception() is not None:
        _log.warning("event plane task failed", task=task.get_name(), error=repr(task.exception()))


class ZmqSubscription(EventSubscription):
    """Envelopes of one topic from every publisher registered in discovery."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        store: KeyValueStore,
        scope: EventScope,
        topic: str,
        counts: TopicCounts,
        *,
        resync_delay: float,
        on_close: Callable[[ZmqSubscription], None],
    ) -> None:
        super().__init__(scope, topic, counts)
        self._store = store
        self._prefix = channel_prefix(scope.namespace, scope.component, self.topic)
        self._resync_delay = resync_delay
        self._on_close = on_close
        self._queue: asyncio.Queue[Envelope | None] = asyncio.Queue(_QUEUE_LIMIT)
        self._channels: dict[str, EventChannel] = {}  # connected channels, by key
        self._addresses: dict[str, int] = {}  # connected addresses, with their channel count
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, _RECV_HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_MESSAGE)
        sock.setsockopt(zmq.IPV6, 1)  # reach IPv4 and IPv6 channels alike
        sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_IVL_MAX_MS)
        # Everything: a message of another topic, or garbage, is counted malformed, not filtered.
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock: zmq.asyncio.Socket | None = sock

    @property
    def publishers(self) -> dict[str, str]:
        """The channels followed now: address by publisher id."""
        return {channel.publisher_id: channel.address for channel in self._channels.values()}

    async def start(self) -> None:
        """Start reading, and connect to the channels registered now.

        Raises:
            DiscoveryError: the store could not be watched.
        """
        loop = asyncio.get_running_loop()
        name = f"ZmqSubscription-{self.scope.namespace}.{self.scope.component}.{self.topic}"
        self._reader = loop.create_task(self._read(), name=f"{name}-reader")
        watch = self._store.watch(self._prefix)
        try:
            first = await anext(watch)
        except BaseException:
            await watch.aclose()
            raise
        self._apply(first)
        self._watcher = loop.create_task(self._follow(watch), name=f"{name}-watcher")

    # --- discovery -------------------------------------------------------------------------------

    async def _follow(self, watch: Watch) -> None:
        while True:
            try:
                async with watch:
                    async for event in watch:
                        self._apply(event)
                return  # the store was closed by its owner
            except DiscoveryError as exc:
                _log.warning(
                    "lost the event channels' watch; watching again",
                    prefix=self._prefix,
                    error=str(exc),
                )
            await asyncio.sleep(self._resync_delay)
            watch = self._store.watch(self._prefix)

    def _apply(self, event: WatchEvent) -> None:
        if isinstance(event, Snapshot):
            wanted: dict[str, EventChannel] = {}
            for kv in event.items:
                channel = self._channel(kv)
                if channel is not None:
                    wanted[kv.key] = channel
            for key in [key for key in self._channels if key not in wanted]:
                self._disconnect(key)
            for key, channel in wanted.items():
                self._connect(key, channel)
        elif isinstance(event, Put):
            channel = self._channel(event.kv)
            if channel is None:
                self._disconnect(event.key)
            else:
                self._connect(event.key, channel)
        elif isinstance(event, Delete):
            self._disconnect(event.key)

    def _channel(self, kv: KeyValue) -> EventChannel | None:
        if kv.lease is None:
            _log.debug("ignoring an event channel without a lease", key=kv.key)
            return None
        try:
            channel = decode_channel(kv.value, key=kv.key)
        except InvalidRecord as exc:
            _log.warning("ignoring a malformed event channel", key=kv.key, error=str(exc))
            return None
        return channel

    def _connect(self, key: str, channel: EventChannel) -> None:
        old = self._channels.get(key)
        if old == channel or self._sock is None:
            return
        if old is not None:
            self._disconnect(key)
        if channel.address not in self._addresses:
            try:
                self._sock.connect(channel.address)
            except zmq.ZMQError as exc:
                _log.warning("cannot connect to an event channel", key=key, error=str(exc))
                return
        self._addresses[channel.address] = self._addresses.get(channel.address, 0) + 1
        self._channels[key] = channel
        _log.debug("following an event channel", key=key, address=channel.address)

    def _disconnect(self, key: str) -> None:
        channel = self._channels.pop(key, None)
        if channel is None:
            return
        left = self._addresses.get(channel.address, 1) - 1
        if left > 0:
            self._addresses[channel.address] = left
            return
        self._addresses.pop(channel.address, None)
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):  # never connected, or already gone
                self._sock.disconnect(channel.address)
        _log.debug("stopped following an event channel", key=key, address=channel.address)

    # --- messages --------------------------------------------------------------------------------

    async def _read(self) -> None:
        sock = self._sock
        assert sock is not None
        topic = self.topic.encode()
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 2 or frames[0] != topic:
                self.malformed += 1
                self._counts.malformed += 1
                continue
            envelope = self._accept(frames[1])
            if envelope is not None:
                await self._queue.put(envelope)

    async def _iterate(self) -> AsyncIterator[Envelope]:
        while True:
            envelope = await self._queue.get()
            if envelope is None or self._closed:
                return
            yield envelope

    async def close(self) -> None:
        """Stop following and reading, and close the socket; iteration ends. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in (self._watcher, self._reader):
            if task is not None:
                await stop_task(task)
        self._watcher = self._reader = None
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close(linger=0)
        self._channels.clear()
        self._addresses.clear()
        self._on_close(self)
        with contextlib.suppress(asyncio.QueueFull):  # a full queue has no reader waiting
            self._queue.put_nowait(None)
