"""The event-plane conformance suite: the same behaviour from every backend.

Runs against memory, NATS core, NATS durable (JetStream) and brokerless zmq (over a memory
discovery store), each plane standing for a process of its own.
"""

from __future__ import annotations

import asyncio

import pytest

from troupe.errors import ConfigError, TransportError
from troupe.events import Envelope, decode_payload_as, encode_envelope
from troupe.messages import new_instance_id
from troupe.testing import eventually_async

from ._helpers import Harness, Reader, Tick, by_publisher, new_scope

TOPIC = "kv-events"


async def test_one_publisher_arrives_in_order(harness: Harness) -> None:
    scope = new_scope()
    pub_plane, sub_plane = await harness.plane(), await harness.plane()
    subscription = await sub_plane.subscribe(scope, TOPIC)
    publisher = await pub_plane.publisher(scope, TOPIC, new_instance_id())
    await harness.ready([publisher], [subscription])
    reader = Reader(subscription)
    sent = [await publisher.publish(Tick(n)) for n in range(200)]
    got = await reader.count(200)
    assert [e.sequence for e in got] == list(range(1, 201))
    assert [decode_payload_as(e.payload, Tick).n for e in got] == list(range(200))
    assert got == sent
    assert {e.publisher_id for e in got} == {publisher.publisher_id}
    assert all(e.topic == TOPIC for e in got)
    assert publisher.sequence == 200
    await reader.close()


async def test_several_publishers_keep_their_own_order(harness: Harness) -> None:
    scope = new_scope()
    sub_plane = await harness.plane()
    subscription = await sub_plane.subscribe(scope, TOPIC)
    publishers = [
        await (await harness.plane()).publisher(scope, TOPIC, new_instance_id()) for _ in range(3)
    ]
    await harness.ready(publishers, [subscription])
    reader = Reader(subscription)

    async def burst(index: int) -> None:
        for n in range(50):
            await publishers[index].publish(Tick(n))

    await asyncio.gather(*(burst(i) for i in range(3)))
    got = await reader.count(150)
    assert by_publisher(got) == {p.publisher_id: list(range(1, 51)) for p in publishers}
    await reader.close()


async def test_every_subscription_receives_every_event(harness: Harness) -> None:
    scope = new_scope()
    subscriptions = [await (await harness.plane()).subscribe(scope, TOPIC) for _ in range(2)]
    subscriptions.append(await harness.planes[0].subscribe(scope, TOPIC))  # two in one plane
    publisher = await (await harness.plane()).publisher(scope, TOPIC, new_instance_id())
    await harness.ready([publisher], subscriptions)
    readers = [Reader(s) for s in subscriptions]
    for n in range(20):
        await publisher.publish(Tick(n))
    for reader in readers:
        assert [e.sequence for e in await reader.count(20)] == list(range(1, 21))
        await reader.close()


async def test_topics_and_scopes_are_kept_apart(harness: Harness) -> None:
    scope = new_scope()
    other_component = type(scope)(scope.namespace, "other")
    plane = await harness.plane()
    subscription = await plane.subscribe(scope, TOPIC)
    wanted = await plane.publisher(scope, TOPIC, new_instance_id())
    other_topic = await plane.publisher(scope, "load", new_instance_id())
    elsewhere = await plane.publisher(other_component, TOPIC, new_instance_id())
    await harness.ready([wanted], [subscription])
    reader = Reader(subscription)
    for n in range(5):
        await other_topic.publish(Tick(n))
        await elsewhere.publish(Tick(n))
        await wanted.publish(Tick(n))
    got = await reader.count(5)
    await asyncio.sleep(0)  # nothing else is queued behind them
    assert {e.publisher_id for e in got} == {wanted.publisher_id}
    assert subscription.malformed == 0
    await reader.close()


async def test_malformed_messages_are_counted_and_dropped(harness: Harness) -> None:
    scope = new_scope()
    pub_plane, sub_plane = await harness.plane(), await harness.plane()
    subscription = await sub_plane.subscribe(scope, TOPIC)
    reader = Reader(subscription)
    wrong_topic = encode_envelope(Envelope(new_instance_id(), 1, 0.0, "load", b"\x80"))
    garbage = [b"", b"\x00garbage", b"\x95\x01", b"\xff" * 300, wrong_topic]
    await harness.inject(scope, TOPIC, subscription, garbage)
    await eventually_async(lambda: subscription.malformed == len(garbage), timeout=10)
    publisher = await pub_plane.publisher(scope, TOPIC, new_instance_id())
    await harness.ready([publisher], [subscription])
    await publisher.publish(Tick(7))
    got = await reader.count(1)
    assert decode_payload_as(got[0].payload, Tick) == Tick(7)
    assert subscription.malformed == len(garbage)
    assert subscription.received == 1
    stats = sub_plane.stats()[f"{scope.namespace}.{scope.component}.{TOPIC}"]
    assert stats["malformed"] == len(garbage)
    assert stats["received"] == 1
    await reader.close()


async def test_stats_count_per_topic(harness: Harness) -> None:
    scope = new_scope()
    pub_plane, sub_plane = await harness.plane(), await harness.plane()
    subscription = await sub_plane.subscribe(scope, TOPIC)
    publisher = await pub_plane.publisher(scope, TOPIC, new_instance_id())
    await harness.ready([publisher], [subscription])
    reader = Reader(subscription)
    for n in range(3):
        await publisher.publish(Tick(n))
    await reader.count(3)
    name = f"{scope.namespace}.{scope.component}.{TOPIC}"
    assert pub_plane.stats()[name] == {"published": 3, "received": 0, "malformed": 0, "dropped": 0}
    assert sub_plane.stats()[name] == {"published": 0, "received": 3, "malformed": 0, "dropped": 0}
    await reader.close()


async def test_closing_a_subscription_ends_its_iteration(harness: Harness) -> None:
    scope = new_scope()
    plane = await harness.plane()
    subscription = await plane.subscribe(scope, TOPIC)
    publisher = await plane.publisher(scope, TOPIC, new_instance_id())
    await harness.ready([publisher], [subscription])
    reader = Reader(subscription)
    await publisher.publish(Tick(1))
    await reader.count(1)
    await subscription.close()
    await asyncio.wait_for(reader.ended.wait(), 5)
    await publisher.publish(Tick(2))  # the publisher goes on; nobody listens
    await subscription.close()  # idempotent
    assert len(reader.envelopes) == 1


async def test_closing_the_plane_ends_iteration_and_publishing(harness: Harness) -> None:
    scope = new_scope()
    plane = await harness.plane()
    subscription = await plane.subscribe(scope, TOPIC)
    publisher = await plane.publisher(scope, TOPIC, new_instance_id())
    reader = Reader(subscription)
    await plane.close()
    await asyncio.wait_for(reader.ended.wait(), 5)
    if harness.name != "memory":  # a memory publisher needs no plane to publish into
        with pytest.raises(TransportError):
            await publisher.publish(Tick(1))
    await plane.close()  # idempotent


async def test_a_closed_publisher_refuses_to_publish(harness: Harness) -> None:
    publisher = await (await harness.plane()).publisher(new_scope(), TOPIC, new_instance_id())
    await publisher.publish(Tick(1))
    await publisher.close()
    with pytest.raises(TransportError):
        await publisher.publish(Tick(2))


async def test_bad_topic_names_are_refused(harness: Harness) -> None:
    plane = await harness.plane()
    with pytest.raises(ConfigError, match="topic"):
        await plane.subscribe(new_scope(), "Bad.Topic")
    with pytest.raises(ConfigError, match="topic"):
        await plane.publisher(new_scope(), "a b", new_instance_id())


async def test_replay_only_where_the_plane_keeps_a_stream(harness: Harness) -> None:
    plane = await harness.plane()
    scope = new_scope()
    if plane.durable:
        subscription = await plane.subscribe(scope, TOPIC, from_start=True)
        await subscription.close()
        assert await plane.load_snapshot(scope, "index") is None
        return
    with pytest.raises(ConfigError, match="DYN_DURABLE_KV_EVENTS"):
        await plane.subscribe(scope, TOPIC, from_start=True)
    with pytest.raises(ConfigError, match="DYN_DURABLE_KV_EVENTS"):
        await plane.subscribe(scope, TOPIC, after_sequence=3)
    with pytest.raises(ConfigError, match="DYN_DURABLE_KV_EVENTS"):
        await plane.save_snapshot(scope, "index", b"x", sequence=1)
    with pytest.raises(ConfigError, match="DYN_DURABLE_KV_EVENTS"):
        await plane.load_snapshot(scope, "index")
