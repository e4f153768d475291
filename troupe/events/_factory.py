"""Choosing the event plane: ``DYN_EVENT_PLANE`` looked up in one table."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from troupe.config import Config
from troupe.discovery import KeyValueStore
from troupe.errors import ConfigError
from troupe.events._jetstream import StreamLimits
from troupe.events._nats import NatsEventPlane
from troupe.events._plane import EventPlane
from troupe.events._zmq import ChannelRegistrar, ZmqEventPlane

__all__ = ["EVENT_PLANE_FACTORIES", "open_event_plane"]


class _Given(NamedTuple):
    store: KeyValueStore | None
    lease: int | None
    limits: StreamLimits | None
    registrar: ChannelRegistrar | None


_Factory = Callable[[Config, _Given], EventPlane]


def _nats(config: Config, given: _Given) -> EventPlane:
    return NatsEventPlane(config.nats, durable=config.events.durable, limits=given.limits)


def _zmq(config: Config, given: _Given) -> EventPlane:
    if config.events.durable:
        raise ConfigError(
            "DYN_DURABLE_KV_EVENTS",
            True,
            "false with DYN_EVENT_PLANE=zmq: only NATS (JetStream) keeps events to replay",
        )
    if given.store is None:
        raise ConfigError(
            "DYN_EVENT_PLANE", "zmq", "nats, or zmq with the runtime's discovery store"
        )
    return ZmqEventPlane(
        given.store, given.lease, host=config.request_plane.tcp.host, registrar=given.registrar
    )


EVENT_PLANE_FACTORIES: Mapping[str, _Factory] = {"nats": _nats, "zmq": _zmq}
"""Event plane constructors by ``DYN_EVENT_PLANE`` value."""


def open_event_plane(
    config: Config,
    *,
    store: KeyValueStore | None = None,
    lease: int | None = None,
    limits: StreamLimits | None = None,
    registrar: ChannelRegistrar | None = None,
) -> EventPlane:
    """Build (not connect) the event plane that ``config.events`` names.

    Connect it with ``await plane.connect()`` (or ``async with plane``): with ``nats`` that is
    when an unreachable server is reported, within ``DYN_NATS_CONNECT_TIMEOUT``.

    Args:
        config: ``config.events`` picks the plane (``DYN_EVENT_PLANE``,
            ``DYN_DURABLE_KV_EVENTS``); ``config.nats`` is the NATS connection;
            ``config.request_plane.tcp.host`` (``DYN_TCP_RPC_HOST``) the address zmq publishers
            bind and advertise.
        store: the runtime's discovery store (``zmq``: channels are registered and found there).
        lease: the runtime's lease (``zmq``: publishers' channels are bound to it).
        limits: the JetStream stream's limits when a durable ``nats`` plane creates it.
        registrar: writes ``zmq`` channels instead of ``store`` and ``lease`` (a runtime's
            lease keeper; ``lease`` may then be None).

    Raises:
        ConfigError: the plane is unknown (the error lists the valid ones), durable events were
            asked of ``zmq``, or ``zmq`` was given no store.
    """
    factory = EVENT_PLANE_FACTORIES.get(config.events.plane)
    if factory is None:
        raise ConfigError(
            "DYN_EVENT_PLANE", config.events.plane, choices=tuple(EVENT_PLANE_FACTORIES)
        )
    return factory(config, _Given(store, lease, limits, registrar))
