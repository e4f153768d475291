"""The ``nats`` event plane on its own: server restarts, an unreachable server, the subject."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from nats.aio.msg import Msg

from troupe.config import Config, EventPlaneConfig, NatsConfig
from troupe.errors import ConnectionLost
from troupe.events import NatsEventPlane, encode_envelope, open_event_plane
from troupe.messages import new_instance_id
from troupe.testing import NatsServer, eventually_async, free_port

from ._helpers import Reader, Tick, new_scope

TOPIC = "kv-events"


async def test_events_travel_on_the_scope_subject(nats_server: NatsServer) -> None:
    scope = new_scope()
    raw = await nats.connect(nats_server.url)
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(msg: Msg) -> None:
        got.put_nowait(msg.subject.encode() + b" " + msg.data)

    await raw.subscribe(f"namespace.{scope.namespace}.component.worker.{TOPIC}", cb=on_message)
    await raw.flush()
    async with NatsEventPlane(NatsConfig(server=nats_server.url)) as plane:
        publisher = await plane.publisher(scope, TOPIC, new_instance_id())
        envelope = await publisher.publish(Tick(1))
        subject, _, body = (await asyncio.wait_for(got.get(), 5)).partition(b" ")
        assert subject.decode() == scope.subject(TOPIC)
        assert body == encode_envelope(envelope)
    await raw.close()


@pytest.mark.slow
async def test_a_subscription_resumes_after_a_server_restart(
    fresh_nats_server: NatsServer,
) -> None:
    config = NatsConfig(server=fresh_nats_server.url, connect_timeout=2.0)
    scope = new_scope()
    async with NatsEventPlane(config) as sub_plane, NatsEventPlane(config) as pub_plane:
        subscription = await sub_plane.subscribe(scope, TOPIC)
        publisher = await pub_plane.publisher(scope, TOPIC, new_instance_id())
        reader = Reader(subscription)
        await publisher.publish(Tick(1))
        await reader.count(1)
        assert subscription.reconnects == 0

        await asyncio.to_thread(fresh_nats_server.restart)
        # Both ends come back by themselves; the subscriber is told that it reconnected.
        await eventually_async(lambda: subscription.reconnects == 1, timeout=15)
        await eventually_async(lambda: pub_plane.connected and sub_plane.connected, timeout=15)

        # Publish until one gets through: nats-py re-subscribes right after reconnecting.
        async def delivered() -> None:
            n = 2
            while len(reader.envelopes) < 2:
                await publisher.publish(Tick(n))
                n += 1
                await asyncio.sleep(0.05)

        await asyncio.wait_for(delivered(), 15)
        sequences = [e.sequence for e in reader.envelopes]
        assert sequences == sorted(sequences)
        assert subscription.reconnects == 1
        await reader.close()


async def test_an_unreachable_server_is_one_clear_error_within_the_timeout() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    config = Config(nats=NatsConfig(server=url, connect_timeout=0.5))
    plane = open_event_plane(config)
    assert isinstance(plane, NatsEventPlane)
    began = time.monotonic()
    with pytest.raises(ConnectionLost) as info:
        await plane.connect()
    assert time.monotonic() - began < 3.0
    message = str(info.value)
    assert url in message
    assert "NATS_SERVER" in message
    assert "--no-kv-events" in message
    assert "\n" not in message
    # publisher() and subscribe() connect too, and fail the same way.
    with pytest.raises(ConnectionLost, match="--no-kv-events"):
        await plane.subscribe(new_scope(), TOPIC)
    await plane.close()


async def test_durable_setting_builds_a_durable_plane(nats_server: NatsServer) -> None:
    config = Config(nats=NatsConfig(server=nats_server.url), events=EventPlaneConfig(durable=True))
    plane = open_event_plane(config)
    assert isinstance(plane, NatsEventPlane)
    assert plane.durable
    await plane.close()
