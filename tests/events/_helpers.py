"""Helpers of the event-plane tests: a reader with deadlines, and a backend harness per plane."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgspec
import nats
import zmq
import zmq.asyncio

from troupe.config import NatsConfig
from troupe.discovery import KeyValueStore, MemoryKvServer, MemoryStore
from troupe.events import (
    Envelope,
    EventPlane,
    EventPublisher,
    EventScope,
    EventSubscription,
    MemoryEventPlane,
    NatsEventPlane,
    ZmqEventPlane,
    ZmqPublisher,
    ZmqSubscription,
)
from troupe.events._memory import _MemorySubscription
from troupe.messages import EventChannel, channel_key, encode_channel, new_instance_id
from troupe.testing import eventually_async


class Tick(msgspec.Struct, frozen=True, tag=True):
    """The event the tests publish."""

    n: int


def new_scope() -> EventScope:
    """A namespace of this test's own (NATS servers and streams are shared by the session)."""
    return EventScope(f"t{uuid.uuid4().hex[:10]}", "worker")


class Reader:
    """Iterates a subscription in a background task so tests can wait with deadlines."""

    def __init__(self, subscription: EventSubscription) -> None:
        self.subscription = subscription
        self.envelopes: list[Envelope] = []
        self.ended = asyncio.Event()
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="Reader")

    async def _run(self) -> None:
        try:
            async for envelope in self.subscription:
                self.envelopes.append(envelope)
                self._changed.set()
        finally:
            self.ended.set()
            self._changed.set()

    async def wait_for(
        self, predicate: Callable[[list[Envelope]], bool], timeout: float = 10.0, what: str = ""
    ) -> list[Envelope]:
        """Wait until ``predicate(envelopes)`` holds; fail the test at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.envelopes):
            if self._task.done() and self._task.exception() is not None:
                raise self._task.exception()  # type: ignore[misc]
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(
                    f"not within {timeout:g} s: {what or predicate!r}; "
                    f"got {[(e.publisher_id, e.sequence) for e in self.envelopes]}"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        return self.envelopes

    async def count(self, n: int, timeout: float = 10.0) -> list[Envelope]:
        """Wait for ``n`` envelopes."""
        return await self.wait_for(lambda got: len(got) >= n, timeout, f"{n} envelopes")

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def by_publisher(envelopes: Sequence[Envelope]) -> dict[str, list[int]]:
    """Sequence numbers received, per publisher, in arrival order."""
    seen: dict[str, list[int]] = {}
    for envelope in envelopes:
        seen.setdefault(envelope.publisher_id, []).append(envelope.sequence)
    return seen


@dataclass
class Harness:
    """One backend for the conformance suite: planes that see each other (like processes)."""

    name: str
    make: Callable[[], Awaitable[EventPlane]]
    inject: Callable[[EventScope, str, EventSubscription, list[bytes]], Awaitable[None]]
    planes: list[EventPlane] = field(default_factory=list)
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def plane(self) -> EventPlane:
        """A new connected plane (a process of its own)."""
        plane = await self.make()
        self.planes.append(plane)
        return plane

    async def ready(
        self, publishers: Sequence[EventPublisher], subscriptions: Sequence[EventSubscription]
    ) -> None:
        """Wait until every subscription receives what the publishers publish from now on.

        Immediate on a broker or in memory; on zmq, until each publisher's socket has seen every
        subscription's connection.
        """
        for publisher in publishers:
            if isinstance(publisher, ZmqPublisher):
                await eventually_async(
                    lambda p=publisher: p.subscribers >= len(subscriptions),  # type: ignore[misc]
                    timeout=10,
                    what="every subscription connected to the zmq publisher",
                )
        for subscription in subscriptions:
            if isinstance(subscription, ZmqSubscription):
                ids = {p.publisher_id for p in publishers}
                assert ids <= set(subscription.publishers)

    async def close(self) -> None:
        for plane in reversed(self.planes):
            await plane.close()
        for cleanup in reversed(self.cleanups):
            await cleanup()


# --- the backends ------------------------------------------------------------------------------


def memory_harness() -> Harness:
    hub = MemoryEventPlane.Hub()

    async def make() -> EventPlane:
        return MemoryEventPlane(hub)

    async def inject(
        scope: EventScope, topic: str, subscription: EventSubscription, bodies: list[bytes]
    ) -> None:
        assert isinstance(subscription, _MemorySubscription)
        for body in bodies:
            subscription.deliver(body)

    return Harness("memory", make, inject)


def nats_harness(url: str, *, durable: bool) -> Harness:
    config = NatsConfig(server=url, connect_timeout=5.0)

    async def make() -> EventPlane:
        plane = NatsEventPlane(config, durable=durable)
        await plane.connect()
        return plane

    async def inject(
        scope: EventScope, topic: str, subscription: EventSubscription, bodies: list[bytes]
    ) -> None:
        raw = await nats.connect(url)
        try:
            for body in bodies:
                await raw.publish(scope.subject(topic), body)
            await raw.flush()
        finally:
            await raw.close()

    return Harness("nats-durable" if durable else "nats", make, inject)


class RawChannel:
    """A rogue publisher: a bare XPUB socket registered as a channel, sending any frames."""

    def __init__(self, store: KeyValueStore, scope: EventScope, topic: str) -> None:
        self.store = store
        self.scope = scope
        self.topic = topic
        self.publisher_id = new_instance_id()
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        port = int(self.sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.address = f"tcp://127.0.0.1:{port}"
        self.key = channel_key(scope.namespace, scope.component, topic, self.publisher_id)

    async def register(self, *, lease: int | None) -> None:
        record = EventChannel(
            address=self.address, publisher_id=self.publisher_id, topic=self.topic
        )
        await self.store.put(self.key, encode_channel(record), lease=lease)

    async def wait_subscribed(self, timeout: float = 10.0) -> None:
        """Wait for a subscriber's subscription message (it is connected from now on)."""
        message = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
        assert message[0][:1] == b"\x01", message

    async def send(self, frames: list[bytes]) -> None:
        await self.sock.send_multipart(frames)

    async def close(self) -> None:
        await self.store.delete(self.key)
        self.sock.close(linger=0)
        self.ctx.term()


def zmq_harness() -> Harness:
    server = MemoryKvServer()
    stores: list[MemoryStore] = []

    async def make() -> EventPlane:
        store = MemoryStore(server)
        await store.connect()
        stores.append(store)
        lease = await store.grant_lease(30.0)
        return ZmqEventPlane(store, lease, host="127.0.0.1")

    async def inject(
        scope: EventScope, topic: str, subscription: EventSubscription, bodies: list[bytes]
    ) -> None:
        store = MemoryStore(server)
        await store.connect()
        lease = await store.grant_lease(30.0)
        rogue = RawChannel(store, scope, topic)
        await rogue.register(lease=lease)
        await rogue.wait_subscribed()
        for body in bodies:
            await rogue.send([topic.encode(), body])
        # The rogue leaves; what it sent is already on its way (LINGER only drops on close of
        # what is still queued, so wait until the subscription has counted it all).
        await eventually_async(
            lambda: subscription.malformed + subscription.received >= len(bodies),
            timeout=10,
            what="the rogue's messages read",
        )
        await rogue.close()
        await store.close()

    async def close_stores() -> None:
        for store in stores:
            await store.close()

    harness = Harness("zmq", make, inject)
    harness.cleanups.append(close_stores)
    return harness
