"""Registration layout: where an instance is registered and what its record says.

Key: ``/services/{namespace}/{component}/{endpoint}/{instance_id}`` (seed 000), where the names
match ``[a-z0-9_-]+`` and ``instance_id`` is 16 lower-case hex digits, drawn once per process.
Value: an :class:`InstanceRecord` encoded as JSON, so that ``etcdctl get --prefix /services/``
shows it readably. Decoding is strict about the layout and lenient about extra fields (a newer
writer may add some): anything unusable raises :class:`~troupe.errors.InvalidRecord`, which a
watcher catches to skip the entry with a warning.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from typing import Any

import msgspec

from troupe.errors import InvalidName, InvalidRecord
from troupe.messages._frames import WIRE_VERSION

__all__ = [
    "SERVICES_PREFIX",
    "InstanceKey",
    "InstanceRecord",
    "decode_record",
    "encode_record",
    "endpoint_prefix",
    "instance_key",
    "new_instance_id",
    "parse_key",
    "services_prefix",
    "validate_instance_id",
    "validate_name",
]

SERVICES_PREFIX = "/services"
"""Root of every registration key."""

_NAME_RE = re.compile(r"[a-z0-9_-]+")
_NAME_EXPECTED = "a name of lower-case letters, digits, '_' and '-' ([a-z0-9_-]+)"
_INSTANCE_ID_RE = re.compile(r"[0-9a-f]{16}")
_INSTANCE_ID_EXPECTED = "16 lower-case hex digits"


def new_instance_id() -> str:
    """A fresh random instance id: 16 lower-case hex digits (64 bits from ``secrets``)."""
    return secrets.token_hex(8)


def validate_name(part: str, value: str) -> str:
    """Check a namespace, component or endpoint name; return it.

    Raises:
        InvalidName: naming the part (``namespace``, ``component`` or ``endpoint``) and the value.
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidName(part, value, _NAME_EXPECTED)
    return value


def validate_instance_id(value: str) -> str:
    """Check an instance id (16 lower-case hex digits); return it.

    Raises:
        InvalidName: the id is malformed.
    """
    if not isinstance(value, str) or not _INSTANCE_ID_RE.fullmatch(value):
        raise InvalidName("instance_id", value, _INSTANCE_ID_EXPECTED)
    return value


def services_prefix(
    namespace: str | None = None, component: str | None = None, endpoint: str | None = None
) -> str:
    """The key prefix of everything registered, or of a namespace, component or endpoint.

    Parts must be given from the left: a component needs its namespace, an endpoint both.
    """
    parts = [SERVICES_PREFIX]
    missing: str | None = None
    for part, value in (("namespace", namespace), ("component", component), ("endpoint", endpoint)):
        if value is None:
            missing = missing or part
        elif missing is not None:
            raise InvalidName(missing, None, f"a {missing} name when a {part} is given")
        else:
            parts.append(validate_name(part, value))
    return "/".join(parts)


def endpoint_prefix(namespace: str, component: str, endpoint: str) -> str:
    """``/services/{namespace}/{component}/{endpoint}``: where an endpoint's instances live."""
    return services_prefix(namespace, component, endpoint)


def instance_key(namespace: str, component: str, endpoint: str, instance_id: str) -> str:
    """``/services/{namespace}/{component}/{endpoint}/{instance_id}``, validated."""
    return f"{endpoint_prefix(namespace, component, endpoint)}/{validate_instance_id(instance_id)}"


class InstanceKey(msgspec.Struct, frozen=True):
    """The parts of a registration key."""

    namespace: str
    component: str
    endpoint: str
    instance_id: str

    @property
    def key(self) -> str:
        """The key these parts spell."""
        return instance_key(self.namespace, self.component, self.endpoint, self.instance_id)


def parse_key(key: str) -> InstanceKey:
    """Split a registration key into its parts.

    Raises:
        InvalidRecord: the key does not follow ``/services/{ns}/{comp}/{ep}/{instance_id}``.
    """
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) != 6 or parts[0] != "" or "/" + parts[1] != SERVICES_PREFIX:
        raise InvalidRecord(
            "expected /services/{namespace}/{component}/{endpoint}/{instance_id}", key=str(key)
        )
    _, _, namespace, component, endpoint, instance_id = parts
    try:
        validate_name("namespace", namespace)
        validate_name("component", component)
        validate_name("endpoint", endpoint)
        validate_instance_id(instance_id)
    except InvalidName as exc:
        raise InvalidRecord(str(exc), key=key) from exc
    return InstanceKey(namespace, component, endpoint, instance_id)


class InstanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What a registered instance publishes about itself (JSON in the store).

    Attributes:
        namespace: validated name.
        component: validated name.
        endpoint: validated name.
        instance_id: 16 lower-case hex digits, stable for the life of the process.
        transport: the request-plane address by plane, e.g. ``{"tcp": "tcp://10.0.0.5:4000"}``.
        host: the host name of the worker.
        pid: the worker's process id.
        started_at: when the worker process started (Unix time, seconds).
        metadata: free-form JSON-compatible details.
        wire: the request-plane wire version the instance speaks
            (:data:`~troupe.transports.WIRE_VERSION` when it registered); records written before
            the field existed decode as 0. Routers skip instances of another version.
        resumable: the handler continues a stream another instance started (it honours
            ``ctx.received``): a router migrates a stream that already delivered chunks only to
            instances that say so (or through its own ``resume`` hook).
    """

    namespace: str
    component: str
    endpoint: str
    instance_id: str
    transport: dict[str, str]
    host: str
    pid: int
    started_at: float
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    wire: int = 0
    resumable: bool = False

    def __post_init__(self) -> None:
        validate_name("namespace", self.namespace)
        validate_name("component", self.component)
        validate_name("endpoint", self.endpoint)
        validate_instance_id(self.instance_id)

    @classmethod
    def create(
        cls,
        namespace: str,
        component: str,
        endpoint: str,
        *,
        instance_id: str,
        transport: dict[str, str],
        metadata: dict[str, Any] | None = None,
        started_at: float | None = None,
        wire: int = WIRE_VERSION,
        resumable: bool = False,
    ) -> InstanceRecord:
        """A record for this process: host name, pid, (unless given) the time now, wire version."""
        return cls(
            namespace=namespace,
            component=component,
            endpoint=endpoint,
            instance_id=instance_id,
            transport=dict(transport),
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=time.time() if started_at is None else started_at,
            metadata=dict(metadata or {}),
            wire=wire,
            resumable=resumable,
        )

    @property
    def key(self) -> str:
        """The registration key of this record."""
        return instance_key(self.namespace, self.component, self.endpoint, self.instance_id)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(InstanceRecord)


def encode_record(record: InstanceRecord) -> bytes:
    """The record as JSON bytes."""
    return _encoder.encode(record)


def decode_record(data: bytes, *, key: str | None = None) -> InstanceRecord:
    """Parse a record; with ``key``, also check that the key is the record's own.

    Raises:
        InvalidRecord: bad JSON, a missing or mistyped field, a bad name, or a key that does not
            match the record.
    """
    try:
        record = _decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included; it wraps __post_init__ errors
        raise InvalidRecord(str(exc), key=key) from exc
    if key is not None and key != record.key:
        raise InvalidRecord(f"the record belongs at {record.key}", key=key)
    return record
