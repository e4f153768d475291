"""The message catalogue: what every wing of troupe may import, and what crosses process lines.

- wire frames of the request exchange (:class:`Request`, :class:`Chunk`, :class:`End`,
  :class:`Error`, :class:`Cancel`) with their sans-IO codec and :data:`WIRE_VERSION`;
- the instance record a worker registers and the discovery key layout (``/services/...``);
- endpoint names (``namespace.component.endpoint``) and their validation;
- the payload codec (msgpack) for request and chunk bodies;
- the names of the planes and stores (:data:`PLANES`, :data:`KV_STORES`, ...);
- the event-channel record and key layout (``/event_channels/...``) of brokerless event publishers.

It imports nothing of troupe but :mod:`troupe.errors`, so the transports and the discovery
backends share it without importing each other.
"""

from troupe.messages._channels import (
    EVENT_CHANNELS_PREFIX,
    EventChannel,
    channel_key,
    channel_prefix,
    decode_channel,
    encode_channel,
)
from troupe.messages._endpoint import Component, Endpoint, Namespace, parse_endpoint
from troupe.messages._frames import (
    WIRE_VERSION,
    Cancel,
    Chunk,
    End,
    Error,
    Frame,
    FrameBuffer,
    Reply,
    Request,
    RequestId,
    decode,
    encode,
    encode_framed,
)
from troupe.messages._payload import decode_payload, encode_payload
from troupe.messages._planes import DISCOVERY_BACKENDS, EVENT_PLANES, KV_STORES, PLANES
from troupe.messages._records import (
    SERVICES_PREFIX,
    InstanceKey,
    InstanceRecord,
    decode_record,
    encode_record,
    endpoint_prefix,
    instance_key,
    new_instance_id,
    parse_key,
    services_prefix,
    validate_instance_id,
    validate_name,
)

__all__ = [
    "DISCOVERY_BACKENDS",
    "EVENT_CHANNELS_PREFIX",
    "EVENT_PLANES",
    "KV_STORES",
    "PLANES",
    "SERVICES_PREFIX",
    "WIRE_VERSION",
    "Cancel",
    "Chunk",
    "Component",
    "End",
    "Endpoint",
    "Error",
    "EventChannel",
    "Frame",
    "FrameBuffer",
    "InstanceKey",
    "InstanceRecord",
    "Namespace",
    "Reply",
    "Request",
    "RequestId",
    "channel_key",
    "channel_prefix",
    "decode",
    "decode_channel",
    "decode_payload",
    "decode_record",
    "encode",
    "encode_channel",
    "encode_framed",
    "encode_payload",
    "encode_record",
    "endpoint_prefix",
    "instance_key",
    "new_instance_id",
    "parse_endpoint",
    "parse_key",
    "services_prefix",
    "validate_instance_id",
    "validate_name",
]
