"""The event plane: typed events on topics, beside the request plane (KV-cache events, router sync).

One interface (:class:`EventPlane`: publishers and subscriptions by :class:`EventScope` and topic;
every event in an :class:`Envelope`) and its backends. See docs/events.md.
"""

from troupe.events._plane import (
    Envelope,
    EventPlane,
    EventPublisher,
    EventScope,
    EventSubscription,
    MemoryEventPlane,
    decode_envelope,
    decode_payload_as,
    encode_envelope,
    encode_event,
    validate_topic,
)

__all__ = [
    "Envelope",
    "EventPlane",
    "EventPublisher",
    "EventScope",
    "EventSubscription",
    "MemoryEventPlane",
    "decode_envelope",
    "decode_payload_as",
    "encode_envelope",
    "encode_event",
    "validate_topic",
]
