"""The durable ``nats`` event plane: the stream per namespace, replay, snapshots."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest

from troupe.config import NatsConfig
from troupe.errors import ConfigError, ReplayUnavailable, TransportError
from troupe.events import NatsEventPlane, StreamLimits, decode_payload_as
from troupe.messages import new_instance_id
from troupe.testing import NatsServer, eventually_async

from ._helpers import Reader, Tick, new_scope

TOPIC = "kv-events"


@pytest.fixture
async def plane(nats_server: NatsServer) -> AsyncIterator[NatsEventPlane]:
    durable = NatsEventPlane(NatsConfig(server=nats_server.url), durable=True)
    await durable.connect()
    yield durable
    await durable.close()


async def test_the_stream_is_created_per_namespace(
    plane: NatsEventPlane, nats_server: NatsServer
) -> None:
    scope = new_scope()
    publisher = await plane.publisher(scope, TOPIC, new_instance_id())
    await publisher.publish(Tick(1))
    raw = await nats.connect(nats_server.url)
    info = await raw.jetstream().stream_info(f"troupe-events-{scope.namespace}")
    assert info.config.subjects == [f"namespace.{scope.namespace}.component.*.*"]
    assert info.config.max_age == 3600
    assert info.config.max_msgs == 1_000_000
    assert info.state.messages == 1
    await raw.close()


async def test_a_late_subscriber_replays_then_goes_on_live(plane: NatsEventPlane) -> None:
    scope = new_scope()
    publisher = await plane.publisher(scope, TOPIC, new_instance_id())
    other = await plane.publisher(scope, "load", new_instance_id())  # same stream, other topic
    for n in range(20):
        await publisher.publish(Tick(n))
        await other.publish(Tick(n))
    live_only = Reader(await plane.subscribe(scope, TOPIC))
    replaying = await plane.subscribe(scope, TOPIC, from_start=True)
    reader = Reader(replaying)
    got = await reader.count(20)
    assert [decode_payload_as(e.payload, Tick).n for e in got] == list(range(20))
    assert replaying.stream_sequence == 39  # the 20th event of this topic: 2 per round
    await publisher.publish(Tick(20))
    assert [e.sequence for e in await reader.count(21)] == list(range(1, 22))
    assert replaying.stream_sequence == 41
    # A live subscriber gets only what came after it subscribed, from the same publisher.
    assert [e.sequence for e in await live_only.count(1)] == [21]
    await reader.close()
    await live_only.close()


async def test_a_snapshot_and_what_came_after_it(plane: NatsEventPlane) -> None:
    scope = new_scope()
    publisher = await plane.publisher(scope, TOPIC, new_instance_id())
    for n in range(10):
        await publisher.publish(Tick(n))
    # A router folds the stream into an index, and stores it past its threshold ...
    folding = await plane.subscribe(scope, TOPIC, from_start=True)
    reader = Reader(folding)
    await reader.count(10)
    index = bytes(range(256)) * 1024  # larger than one object-store chunk
    await plane.save_snapshot(scope, "index", index, sequence=folding.stream_sequence)
    await reader.close()
    await folding.close()
    for n in range(10, 15):
        await publisher.publish(Tick(n))
    # ... and a router started later loads it and replays only what came after.
    loaded = await plane.load_snapshot(scope, "index")
    assert loaded is not None
    data, sequence = loaded
    assert data == index
    assert sequence == 10
    resumed = await plane.subscribe(scope, TOPIC, after_sequence=sequence)
    reader = Reader(resumed)
    got = await reader.count(5)
    assert [decode_payload_as(e.payload, Tick).n for e in got] == list(range(10, 15))
    await reader.close()
    # A later save replaces the snapshot; other names and scopes stay apart.
    await plane.save_snapshot(scope, "index", b"newer", sequence=15)
    assert await plane.load_snapshot(scope, "index") == (b"newer", 15)
    assert await plane.load_snapshot(scope, "other") is None
    assert await plane.load_snapshot(new_scope(), "index") is None


async def test_replay_after_the_last_sequence_waits_for_new_events(plane: NatsEventPlane) -> None:
    scope = new_scope()
    publisher = await plane.publisher(scope, TOPIC, new_instance_id())
    for n in range(3):
        await publisher.publish(Tick(n))
    reader = Reader(await plane.subscribe(scope, TOPIC, after_sequence=3))
    await publisher.publish(Tick(3))
    got = await reader.count(1)
    assert [e.sequence for e in got] == [4]
    await reader.close()


async def test_events_the_stream_dropped_cannot_be_replayed(nats_server: NatsServer) -> None:
    limits = StreamLimits(max_age=60, max_msgs=5)
    async with NatsEventPlane(
        NatsConfig(server=nats_server.url), durable=True, limits=limits
    ) as plane:
        scope = new_scope()
        publisher = await plane.publisher(scope, TOPIC, new_instance_id())
        for n in range(10):
            await publisher.publish(Tick(n))
        with pytest.raises(ReplayUnavailable, match=r"holds sequences 6\.\.10") as info:
            await plane.subscribe(scope, TOPIC, after_sequence=2)
        assert (info.value.first_sequence, info.value.last_sequence) == (6, 10)
        # A position beyond the stream: it was deleted and made again since.
        with pytest.raises(ReplayUnavailable):
            await plane.subscribe(scope, TOPIC, after_sequence=50)
        # From the start is what the stream still holds.
        reader = Reader(await plane.subscribe(scope, TOPIC, from_start=True))
        assert [e.sequence for e in await reader.count(5)] == [6, 7, 8, 9, 10]
        await reader.close()


async def test_bad_snapshot_arguments_are_refused(plane: NatsEventPlane) -> None:
    with pytest.raises(ConfigError, match="sequence"):
        await plane.save_snapshot(new_scope(), "index", b"", sequence=-1)
    with pytest.raises(ConfigError, match="snapshot"):
        await plane.save_snapshot(new_scope(), "no/slash", b"", sequence=1)
    with pytest.raises(ConfigError, match="after_sequence"):
        await plane.subscribe(new_scope(), TOPIC, after_sequence=-1)
    with pytest.raises(ConfigError):
        StreamLimits(max_msgs=0)


async def test_an_empty_snapshot_round_trips(plane: NatsEventPlane) -> None:
    scope = new_scope()
    await plane.save_snapshot(scope, "index", b"", sequence=0)
    assert await plane.load_snapshot(scope, "index") == (b"", 0)


@pytest.mark.slow
async def test_a_replaying_subscription_resumes_after_a_server_restart(
    fresh_nats_server: NatsServer,
) -> None:
    config = NatsConfig(server=fresh_nats_server.url, connect_timeout=2.0)
    scope = new_scope()
    async with NatsEventPlane(config, durable=True) as plane:
        publisher = await plane.publisher(scope, TOPIC, new_instance_id())
        for n in range(3):
            await publisher.publish(Tick(n))
        subscription = await plane.subscribe(scope, TOPIC, from_start=True)
        reader = Reader(subscription)
        await reader.count(3)
        await asyncio.to_thread(fresh_nats_server.restart)
        await eventually_async(lambda: plane.connected, timeout=15)

        async def published() -> None:
            while True:
                try:
                    await publisher.publish(Tick(3))
                    return
                except TransportError:
                    await asyncio.sleep(0.1)  # JetStream is still starting up

        await asyncio.wait_for(published(), 15)
        # The ordered consumer starts again after what it delivered: nothing lost, nothing twice.
        # (A publish that timed out during the restart may still have been stored: then both.)
        sequences = [e.sequence for e in await reader.count(4, timeout=15)]
        assert sequences[:3] == [1, 2, 3]
        assert sequences == sorted(set(sequences))
        assert subscription.reconnects == 1
        await reader.close()
