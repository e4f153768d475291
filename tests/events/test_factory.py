"""Choosing the event plane from the configuration, and what the package exports."""

from __future__ import annotations

import pytest

import troupe.events
from troupe.config import Config, EventPlaneConfig
from troupe.discovery import MemoryStore
from troupe.errors import ConfigError
from troupe.events import EVENT_PLANE_FACTORIES, NatsEventPlane, ZmqEventPlane, open_event_plane
from troupe.messages import EVENT_PLANES


def test_the_table_has_every_plane_name() -> None:
    assert tuple(EVENT_PLANE_FACTORIES) == EVENT_PLANES == ("nats", "zmq")


def test_nats_is_the_default() -> None:
    config = Config.from_env({})
    assert (config.events.plane, config.events.durable) == ("nats", False)
    plane = open_event_plane(config)
    assert isinstance(plane, NatsEventPlane)
    assert not plane.durable


def test_environment_picks_zmq_and_durable() -> None:
    config = Config.from_env({"DYN_EVENT_PLANE": " ZMQ ", "DYN_TCP_RPC_HOST": "127.0.0.1"})
    store = MemoryStore()
    plane = open_event_plane(config, store=store, lease=7)
    assert isinstance(plane, ZmqEventPlane)
    assert (plane.store, plane.lease) == (store, 7)
    durable = Config.from_env({"DYN_DURABLE_KV_EVENTS": "yes"})
    assert durable.events.durable
    assert open_event_plane(durable).durable


def test_an_invalid_plane_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="DYN_EVENT_PLANE") as info:
        Config.from_env({"DYN_EVENT_PLANE": "kafka"})
    assert info.value.choices == ("nats", "zmq")
    assert "valid values: nats, zmq" in str(info.value)
    with pytest.raises(ConfigError, match="valid values: nats, zmq"):
        EventPlaneConfig(plane="redis")
    with pytest.raises(ConfigError, match="DYN_DURABLE_KV_EVENTS"):
        Config.from_env({"DYN_DURABLE_KV_EVENTS": "maybe"})


def test_zmq_refuses_durable_events_and_needs_a_store() -> None:
    durable_zmq = Config(events=EventPlaneConfig(plane="zmq", durable=True))
    with pytest.raises(ConfigError, match="DYN_DURABLE_KV_EVENTS"):
        open_event_plane(durable_zmq, store=MemoryStore())
    with pytest.raises(ConfigError, match="discovery store"):
        open_event_plane(Config(events=EventPlaneConfig(plane="zmq")))


def test_public_names_show_public_paths() -> None:
    for name in ("NatsEventPlane", "ZmqEventPlane", "StreamLimits", "open_event_plane"):
        assert getattr(troupe.events, name).__module__ == "troupe.events"
    assert set(troupe.events.__all__) >= {
        "EventPlane",
        "MemoryEventPlane",
        "NatsEventPlane",
        "ZmqEventPlane",
        "open_event_plane",
    }
