"""The brokerless ``zmq`` event plane: channels in discovery, publishers joining and leaving."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import msgspec
import pytest

from troupe.config import FileKvConfig
from troupe.discovery import FileStore, MemoryKvServer, MemoryStore
from troupe.errors import ConfigError, TransportError
from troupe.events import Envelope, ZmqEventPlane, ZmqPublisher, ZmqSubscription, encode_envelope
from troupe.messages import new_instance_id
from troupe.testing import eventually_async

from ._helpers import RawChannel, Reader, Tick, new_scope

TOPIC = "kv-events"
TTL = 1.5  # short to keep the tests quick, long enough for keep-alives on a loaded 2-core box


@pytest.fixture
def server() -> MemoryKvServer:
    return MemoryKvServer()


async def _store(server: MemoryKvServer) -> MemoryStore:
    store = MemoryStore(server, reap_interval=0.02)
    await store.connect()
    return store


async def _plane(server: MemoryKvServer, ttl: float = 30.0) -> ZmqEventPlane:
    store = await _store(server)
    return ZmqEventPlane(store, await store.grant_lease(ttl), host="127.0.0.1")


async def _close(*planes: ZmqEventPlane) -> None:
    for plane in planes:
        await plane.close()
        await plane.store.close()


async def test_a_publisher_registers_its_channel_under_the_lease(server: MemoryKvServer) -> None:
    plane = await _plane(server)
    scope = new_scope()
    publisher_id = new_instance_id()
    publisher = await plane.publisher(scope, TOPIC, publisher_id)
    assert isinstance(publisher, ZmqPublisher)
    key = f"/event_channels/{scope.namespace}/worker/{TOPIC}/{publisher_id}"
    kv = await plane.store.get(key)
    assert kv is not None
    assert kv.lease == plane.lease
    assert msgspec.json.decode(kv.value) == {
        "address": publisher.address,
        "publisher_id": publisher_id,
        "topic": TOPIC,
    }
    assert publisher.address.startswith("tcp://127.0.0.1:")
    # A second publisher of the same topic and id in one process is refused.
    with pytest.raises(TransportError, match="already publishes"):
        await plane.publisher(scope, TOPIC, publisher_id)
    await publisher.close()
    assert await plane.store.get(key) is None
    await _close(plane)


async def test_a_publisher_that_joins_late_is_picked_up(server: MemoryKvServer) -> None:
    sub_plane = await _plane(server)
    scope = new_scope()
    subscription = await sub_plane.subscribe(scope, TOPIC)
    assert isinstance(subscription, ZmqSubscription)
    assert subscription.publishers == {}
    reader = Reader(subscription)
    pub_planes = []
    for round_ in range(2):  # each joins while the subscription runs
        pub_plane = await _plane(server)
        pub_planes.append(pub_plane)
        publisher = await pub_plane.publisher(scope, TOPIC, new_instance_id())
        assert isinstance(publisher, ZmqPublisher)
        await eventually_async(lambda p=publisher: p.subscribers == 1, timeout=10)  # type: ignore[misc]
        assert subscription.publishers[publisher.publisher_id] == publisher.address
        await publisher.publish(Tick(round_))
        await reader.count(round_ + 1)
    assert len(subscription.publishers) == 2
    await reader.close()
    await _close(sub_plane, *pub_planes)


async def test_a_publisher_whose_lease_ends_leaves_within_the_ttl(server: MemoryKvServer) -> None:
    sub_plane = await _plane(server)
    pub_plane = await _plane(server, ttl=TTL)  # nobody keeps this lease alive
    granted = time.monotonic()
    scope = new_scope()
    subscription = await sub_plane.subscribe(scope, TOPIC)
    assert isinstance(subscription, ZmqSubscription)
    publisher = await pub_plane.publisher(scope, TOPIC, new_instance_id())
    await eventually_async(lambda: publisher.publisher_id in subscription.publishers, timeout=1)
    await eventually_async(lambda: subscription.publishers == {}, timeout=TTL + 1.0)
    assert time.monotonic() - granted < TTL + 1.0
    await _close(sub_plane, pub_plane)


async def test_a_new_lease_re_registers_every_channel(server: MemoryKvServer) -> None:
    plane = await _plane(server)
    scope = new_scope()
    publisher = await plane.publisher(scope, TOPIC, new_instance_id())
    assert isinstance(publisher, ZmqPublisher)
    new_lease = await plane.store.grant_lease(30.0)
    await plane.set_lease(new_lease)
    kv = await plane.store.get(publisher.key)
    assert kv is not None
    assert kv.lease == new_lease
    await _close(plane)


async def test_channels_without_a_lease_are_ignored(server: MemoryKvServer) -> None:
    store = await _store(server)
    plane = ZmqEventPlane(store, None, host="127.0.0.1")
    scope = new_scope()
    before = RawChannel(store, scope, TOPIC)
    await before.register(lease=None)  # written by hand, say: nothing would ever expire it
    subscription = await plane.subscribe(scope, TOPIC)
    assert isinstance(subscription, ZmqSubscription)
    after = RawChannel(store, scope, TOPIC)
    await after.register(lease=None)
    leased = RawChannel(store, scope, TOPIC)
    await leased.register(lease=await store.grant_lease(30.0))
    await eventually_async(lambda: leased.publisher_id in subscription.publishers, timeout=5)
    assert set(subscription.publishers) == {leased.publisher_id}
    # The same key rewritten without a lease stops being followed.
    await leased.register(lease=None)
    await eventually_async(lambda: subscription.publishers == {}, timeout=5)
    # A plane without a lease subscribes, but cannot publish.
    with pytest.raises(ConfigError, match="lease"):
        await plane.publisher(scope, TOPIC, new_instance_id())
    for channel in (before, after, leased):
        await channel.close()
    await plane.close()
    await store.close()


async def test_garbage_frames_are_counted_and_dropped(server: MemoryKvServer) -> None:
    store = await _store(server)
    plane = ZmqEventPlane(store, await store.grant_lease(30.0), host="127.0.0.1")
    scope = new_scope()
    subscription = await plane.subscribe(scope, TOPIC)
    reader = Reader(subscription)
    rogue = RawChannel(store, scope, TOPIC)
    await rogue.register(lease=await store.grant_lease(30.0))
    await rogue.wait_subscribed()
    valid = encode_envelope(Envelope(rogue.publisher_id, 1, 0.0, TOPIC, b"\x80"))
    topic = TOPIC.encode()
    for frames in (
        [topic],
        [topic, valid, b"extra"],
        [b"other-topic", valid],
        [topic, b"\xc1not msgpack"],
        [b"\x00" * 5000],
    ):
        await rogue.send(frames)
    await rogue.send([topic, valid])
    got = await reader.count(1)
    assert got[0].publisher_id == rogue.publisher_id
    assert subscription.malformed == 5
    assert plane.stats()[f"{scope.namespace}.worker.{TOPIC}"]["malformed"] == 5
    await reader.close()
    await rogue.close()
    await plane.close()
    await store.close()


async def test_the_subscription_watches_again_after_losing_the_store(
    server: MemoryKvServer,
) -> None:
    sub_store = await _store(server)
    plane = ZmqEventPlane(sub_store, None, host="127.0.0.1", resync_delay=0.05)
    scope = new_scope()
    subscription = await plane.subscribe(scope, TOPIC)
    assert isinstance(subscription, ZmqSubscription)
    server.set_available(False)
    await asyncio.sleep(0.1)  # let the watch fail (nothing to wait on but the outage itself)
    server.set_available(True)
    pub_plane = await _plane(server)
    publisher = await pub_plane.publisher(scope, TOPIC, new_instance_id())
    await eventually_async(lambda: publisher.publisher_id in subscription.publishers, timeout=5)
    await _close(pub_plane)
    await plane.close()
    await sub_store.close()


# --- a publisher process killed ------------------------------------------------------------------

PUBLISHER = """
import asyncio, sys
import msgspec
from troupe.config import FileKvConfig
from troupe.discovery import FileStore
from troupe.events import EventScope, ZmqEventPlane

class Tick(msgspec.Struct, frozen=True, tag=True):
    n: int

async def main() -> None:
    where, namespace, publisher_id, ttl = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    store = FileStore(FileKvConfig(path=where), poll_interval=0.02)
    await store.connect()
    lease = await store.grant_lease(ttl)
    plane = ZmqEventPlane(store, lease, host="127.0.0.1")
    publisher = await plane.publisher(EventScope(namespace, "worker"), "kv-events", publisher_id)
    print("registered", flush=True)
    n = 0
    loop = asyncio.get_running_loop()
    renew = loop.time()
    while True:
        await publisher.publish(Tick(n))
        n += 1
        if loop.time() - renew > ttl / 3:
            await store.keep_alive(lease)
            renew = loop.time()
        await asyncio.sleep(0.02)

asyncio.run(main())
"""


@pytest.mark.slow
async def test_a_killed_publisher_leaves_within_the_ttl(tmp_path: Path) -> None:
    where = str(tmp_path / "kv")
    store = FileStore(FileKvConfig(path=where), poll_interval=0.02, reap_interval=0.05)
    await store.connect()
    plane = ZmqEventPlane(store, None, host="127.0.0.1")
    scope = new_scope()
    subscription = await plane.subscribe(scope, TOPIC)
    assert isinstance(subscription, ZmqSubscription)
    reader = Reader(subscription)
    publisher_id = new_instance_id()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PUBLISHER, where, scope.namespace, publisher_id, str(TTL),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"registered\n"
        await eventually_async(lambda: publisher_id in subscription.publishers, timeout=5)
        await reader.wait_for(
            lambda got: any(e.publisher_id == publisher_id for e in got), timeout=10
        )
    finally:
        proc.kill()
        await proc.wait()
    killed = time.monotonic()
    await eventually_async(lambda: subscription.publishers == {}, timeout=TTL + 2.0)
    assert time.monotonic() - killed < TTL + 2.0
    received = [e.sequence for e in reader.envelopes]
    assert received == sorted(received)
    await reader.close()
    await plane.close()
    await store.close()
