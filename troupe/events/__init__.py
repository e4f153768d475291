"""The event plane: typed events on topics, beside the request plane (KV-cache events, router sync).

One interface (:class:`EventPlane`: publishers and subscriptions by :class:`EventScope` and topic;
every event in an :class:`Envelope`) and its backends, one module each:

- ``_plane``: the interface and the envelope codec.
- ``_memory``: :class:`MemoryEventPlane` (one process; its planes may be on several loops).
- ``_nats``: :class:`NatsEventPlane`, NATS core subjects; with ``durable=True`` also a JetStream
  stream per namespace, replay and snapshots (``_jetstream``).
- ``_zmq``: :class:`ZmqEventPlane`, brokerless: a socket per publisher, registered in discovery;
  its subscriber side is ``_zmq_subscription``.
- ``_factory``: :func:`open_event_plane`, the plane ``DYN_EVENT_PLANE`` names.
- ``_metrics``: the per-topic counters behind :meth:`EventPlane.stats`.

Layering: events sits above discovery (the zmq plane uses the :mod:`troupe.discovery` interface,
nothing else of it) and below the actors. See docs/events.md.
"""

from troupe.events._factory import EVENT_PLANE_FACTORIES, open_event_plane
from troupe.events._jetstream import StreamLimits
from troupe.events._memory import MemoryEventPlane
from troupe.events._nats import NatsEventPlane
from troupe.events._plane import (
    Envelope,
    EventPlane,
    EventPublisher,
    EventScope,
    EventSubscription,
    decode_envelope,
    decode_payload_as,
    encode_envelope,
    encode_event,
    validate_topic,
)
from troupe.events._zmq import ZmqEventPlane, ZmqPublisher
from troupe.events._zmq_subscription import ZmqSubscription

__all__ = [
    "EVENT_PLANE_FACTORIES",
    "Envelope",
    "EventPlane",
    "EventPublisher",
    "EventScope",
    "EventSubscription",
    "MemoryEventPlane",
    "NatsEventPlane",
    "StreamLimits",
    "ZmqEventPlane",
    "ZmqPublisher",
    "ZmqSubscription",
    "decode_envelope",
    "decode_payload_as",
    "encode_envelope",
    "encode_event",
    "open_event_plane",
    "validate_topic",
]

# Reprs and tracebacks show the public path (troupe.events.NatsEventPlane).
for _public in (
    NatsEventPlane,
    StreamLimits,
    ZmqEventPlane,
    ZmqPublisher,
    ZmqSubscription,
    open_event_plane,
):
    _public.__module__ = __name__
del _public
