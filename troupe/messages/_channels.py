"""Event-channel layout: where a brokerless (ZeroMQ) event publisher registers, and what it says.

Key: ``/event_channels/{namespace}/{component}/{topic}/{publisher_id}``, bound to the publishing
runtime's lease, so the channel vanishes with the process. Value: an :class:`EventChannel` as
JSON (``{"address": "tcp://host:port", "publisher_id": ..., "topic": ...}``), readable with
``etcdctl get --prefix /event_channels/``. Subscribers watch the prefix of a topic
(:func:`channel_prefix`) and connect to every address found there.
"""

from __future__ import annotations

import msgspec

from troupe.errors import InvalidName, InvalidRecord
from troupe.messages._records import validate_name

__all__ = [
    "EVENT_CHANNELS_PREFIX",
    "EventChannel",
    "channel_key",
    "channel_prefix",
    "decode_channel",
    "encode_channel",
]

EVENT_CHANNELS_PREFIX = "/event_channels"
"""Root of every event-channel key."""


def channel_prefix(namespace: str, component: str, topic: str) -> str:
    """``/event_channels/{namespace}/{component}/{topic}``: the channels of one topic."""
    return "/".join(
        (
            EVENT_CHANNELS_PREFIX,
            validate_name("namespace", namespace),
            validate_name("component", component),
            validate_name("topic", topic),
        )
    )


def channel_key(namespace: str, component: str, topic: str, publisher_id: str) -> str:
    """``/event_channels/{namespace}/{component}/{topic}/{publisher_id}``, validated."""
    prefix = channel_prefix(namespace, component, topic)
    return f"{prefix}/{validate_name('publisher_id', publisher_id)}"


class EventChannel(msgspec.Struct, frozen=True, kw_only=True):
    """One publisher's event channel: where to connect to receive its events of one topic.

    Attributes:
        address: ``tcp://host:port`` of the publisher's PUB socket.
        publisher_id: the publisher's id (its runtime's instance id), the last part of the key.
        topic: the topic published there.
    """

    address: str
    publisher_id: str
    topic: str

    def __post_init__(self) -> None:
        validate_name("publisher_id", self.publisher_id)
        validate_name("topic", self.topic)
        if not self.address.startswith("tcp://"):
            raise InvalidName("address", self.address, "a tcp://host:port address")


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(EventChannel)


def encode_channel(channel: EventChannel) -> bytes:
    """The channel as JSON bytes."""
    return _encoder.encode(channel)


def decode_channel(data: bytes, *, key: str | None = None) -> EventChannel:
    """Parse a channel record; with ``key``, also check that the key names its publisher and topic.

    Raises:
        InvalidRecord: bad JSON, a missing or mistyped field, or a key that does not match.
    """
    try:
        channel = _decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included; it wraps __post_init__ errors
        raise InvalidRecord(str(exc), key=key) from exc
    if key is not None:
        parts = key.split("/")
        if len(parts) != 6 or parts[-1] != channel.publisher_id or parts[-2] != channel.topic:
            raise InvalidRecord(
                f"the channel of {channel.publisher_id} on {channel.topic} does not belong here",
                key=key,
            )
    return channel
