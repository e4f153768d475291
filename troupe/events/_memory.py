"""The ``memory`` event plane: every plane built on one hub sees the others, in one process.

For tests and single-process programs (several runtimes in one process, each on its own I/O
loop, may share a hub): no wire, no loss, no replay. The interface it implements is in
:mod:`troupe.events._plane`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import msgspec

from troupe.errors import ProtocolError
from troupe.events._metrics import TopicCounts
from troupe.events._plane import (
    Envelope,
    EventPlane,
    EventPublisher,
    EventScope,
    EventSubscription,
    encode_envelope,
)

__all__ = ["MemoryEventPlane"]


class MemoryEventPlane(EventPlane):
    """An event plane inside one process: every plane built on the same hub sees the others.

    For tests and single-process programs. Delivery is immediate and lossless; a slow subscriber
    keeps what it has not read (unbounded), so use it where publishers are bounded. Planes on
    different event loops may share a hub (several runtimes in one process, each with its own
    I/O loop): each envelope is handed to the subscriber's own loop.
    """

    name = "memory"

    class Hub:
        """What the memory planes of one process share: the subscriptions of every topic.

        Planes on several threads' event loops (several runtimes in one process) share a hub,
        so the table is guarded by a lock and a publisher delivers to a copy of it.
        """

        def __init__(self) -> None:
            self._lock = threading.Lock()
            self._subscribers: dict[tuple[EventScope, str], set[_MemorySubscription]] = {}

        def add(self, subscription: _MemorySubscription) -> None:
            """Deliver ``subscription``'s topic to it from now on."""
            key = (subscription.scope, subscription.topic)
            with self._lock:
                self._subscribers.setdefault(key, set()).add(subscription)

        def discard(self, subscription: _MemorySubscription) -> None:
            """Deliver nothing more to ``subscription``."""
            key = (subscription.scope, subscription.topic)
            with self._lock:
                subscribers = self._subscribers.get(key)
                if subscribers is not None:
                    subscribers.discard(subscription)
                    if not subscribers:
                        del self._subscribers[key]

        def subscribers(self, scope: EventScope, topic: str) -> list[_MemorySubscription]:
            """The subscriptions of ``topic`` in ``scope`` now."""
            with self._lock:
                return list(self._subscribers.get((scope, topic), ()))

    def __init__(self, hub: MemoryEventPlane.Hub | None = None) -> None:
        super().__init__()
        self.hub = hub if hub is not None else MemoryEventPlane.Hub()
        self._subscriptions: set[_MemorySubscription] = set()

    async def publisher(self, scope: EventScope, topic: str, publisher_id: str) -> EventPublisher:
        counts = self._counts(scope, topic)
        return _MemoryPublisher(self.hub, scope, topic, publisher_id, counts)

    async def subscribe(
        self,
        scope: EventScope,
        topic: str,
        *,
        from_start: bool = False,
        after_sequence: int | None = None,
    ) -> EventSubscription:
        self._check_replay(from_start, after_sequence)
        subscription = _MemorySubscription(self.hub, scope, topic, self._counts(scope, topic))
        self.hub.add(subscription)
        self._subscriptions.add(subscription)
        return subscription

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.close()
        self._subscriptions.clear()


class _MemoryPublisher(EventPublisher):
    def __init__(
        self,
        hub: MemoryEventPlane.Hub,
        scope: EventScope,
        topic: str,
        publisher_id: str,
        counts: TopicCounts,
    ) -> None:
        super().__init__(scope, topic, publisher_id, counts)
        self._hub = hub
        self._closed = False

    async def publish(self, event: msgspec.Struct | bytes) -> Envelope:
        if self._closed:
            raise ProtocolError("publish on a closed event publisher")
        envelope = self._next(event)
        data = encode_envelope(envelope)
        for subscription in self._hub.subscribers(self.scope, self.topic):
            subscription.deliver(data)
        return envelope

    async def close(self) -> None:
        self._closed = True


_CLOSED = object()


class _MemorySubscription(EventSubscription):
    """A queue on the event loop that subscribed; deliveries from other loops hop onto it."""

    def __init__(
        self, hub: MemoryEventPlane.Hub, scope: EventScope, topic: str, counts: TopicCounts
    ) -> None:
        super().__init__(scope, topic, counts)
        self._hub = hub
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes | object] = asyncio.Queue()
        self._closed = False

    def deliver(self, data: bytes) -> None:
        """Queue raw bytes as a publisher (or a test sending garbage) would, from any thread.

        On the subscriber's own loop the bytes are queued at once; from anywhere else they are
        handed to that loop (``call_soon_threadsafe``: an asyncio queue is not thread-safe), in
        the order given. Nothing is queued once the subscription or its loop is closed.
        """
        if self._closed:
            return
        if _running_loop() is self._loop:
            self._queue.put_nowait(data)
            return
        try:
            self._loop.call_soon_threadsafe(self._put, data)
        except RuntimeError:
            pass  # the subscriber's loop is closed: nobody is left to read

    def _put(self, data: bytes) -> None:
        if not self._closed:
            self._queue.put_nowait(data)

    async def _iterate(self) -> AsyncIterator[Envelope]:
        while True:
            item = await self._queue.get()
            if item is _CLOSED:
                return
            assert isinstance(item, bytes)
            envelope = self._accept(item)
            if envelope is not None:
                yield envelope

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.discard(self)
        if _running_loop() is self._loop:
            self._queue.put_nowait(_CLOSED)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, _CLOSED)
        except RuntimeError:
            pass  # the subscriber's loop is closed: its iteration ended with it


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
