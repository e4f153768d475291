"""The errors of the request plane, routing and admission (see :mod:`troupe.errors`)."""

from __future__ import annotations

from collections.abc import Mapping

from troupe.errors._core import DiscoveryError, TroupeError

__all__ = [
    "AllWorkersBusy",
    "Cancelled",
    "ConnectTimeout",
    "ConnectionLost",
    "ConnectionRefused",
    "DeadlineExceeded",
    "IncompatibleInstances",
    "InstanceNotFound",
    "InvalidRecord",
    "InvalidRequest",
    "MessageTooLarge",
    "NoInstances",
    "Overloaded",
    "ProtocolError",
    "RemoteError",
    "ReplayUnavailable",
    "RequestTimeout",
    "StreamBroken",
    "StreamNotResumable",
    "TlsError",
    "TransportClosed",
    "TransportError",
    "UnknownEndpoint",
]

# --- request plane -----------------------------------------------------------------------------


class TransportError(TroupeError):
    """Base for request-plane failures.

    Attributes:
        address: the transport address involved, when known.
    """

    def __init__(self, message: str, *, address: str | None = None) -> None:
        self.address = address
        super().__init__(message)


class ConnectTimeout(TransportError, TimeoutError):
    """No connection to the worker could be made within the connect timeout."""

    def __init__(self, address: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(f"connect to {address} timed out after {timeout:g} s", address=address)


class RequestTimeout(TransportError, TimeoutError):
    """The worker did not answer (or did not finish) within the request timeout."""

    def __init__(self, address: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(f"request to {address} timed out after {timeout:g} s", address=address)


class DeadlineExceeded(TransportError, TimeoutError):
    """The request's deadline passed before it could be started or finished."""


class MessageTooLarge(TransportError):
    """A message exceeds the transport's size limit; it was not sent.

    Attributes:
        size: the message size in bytes.
        limit: the largest size the transport accepts.
    """

    def __init__(
        self, size: int, limit: int, *, address: str | None = None, variable: str = ""
    ) -> None:
        self.size = size
        self.limit = limit
        self.variable = variable
        msg = f"message of {size} bytes exceeds the limit of {limit} bytes"
        if variable:
            msg += f" ({variable})"
        super().__init__(msg, address=address)


class StreamBroken(TransportError):
    """The response stream ended before ``End``: the worker or the connection went away."""


class StreamNotResumable(StreamBroken):
    """A stream broke after it delivered chunks, and no instance can continue it.

    Raised by a router with ``migration_limit`` instead of re-sending the request from the start
    (which would repeat what the caller already has): no other instance serves the endpoint with
    a handler marked ``resumable``, and the router has no ``resume`` hook.

    Attributes:
        endpoint: the endpoint called.
        received: how many chunks the caller had received.
    """

    def __init__(
        self, endpoint: str, received: int, cause: str, *, address: str | None = None
    ) -> None:
        self.endpoint = endpoint
        self.received = received
        super().__init__(
            f"{cause}; not migrated after {received} chunk(s): no instance of {endpoint} can "
            "resume the stream (mark the handler with troupe.transports.resumable, or give the "
            "router a resume hook)",
            address=address,
        )


class ConnectionLost(TransportError):
    """The connection to the peer (or broker) was lost; requests fail fast until it returns."""


class ConnectionRefused(ConnectionLost):
    """The worker's address refused the connection (nothing listens there: it died or moved).

    Seen as soon as the operating system reports it, never as a connect timeout.
    """


class TransportClosed(TransportError):
    """The local client or server was closed by us; nothing more can be sent."""


class ProtocolError(TransportError):
    """Bytes on the wire could not be decoded as a troupe message."""


class TlsError(TransportError):
    """A TLS connection to a peer cannot be made: material is missing, or the handshake failed.

    The peer's certificate is not signed by the configured CA or has expired, the peer refused
    this side's client certificate (or its absence), or this side lacks the CA or certificate
    the address asks for. Not retried elsewhere: every instance would refuse the same way.

    Attributes:
        setting: the environment variable to look at, when one is to blame.
    """

    def __init__(self, message: str, *, address: str | None = None, setting: str = "") -> None:
        self.setting = setting
        super().__init__(message, address=address)


class ReplayUnavailable(TransportError):
    """A durable event subscription asked for events its stream no longer holds.

    The stream's limits (age, count) dropped them, or the stream was deleted and created again
    since the position was taken (a snapshot's sequence): start from a newer snapshot, or from
    what the stream still holds and recover the rest elsewhere.

    Attributes:
        stream: the JetStream stream.
        after_sequence: the position asked for (events after it were wanted).
        first_sequence: the oldest sequence the stream holds.
        last_sequence: the newest sequence the stream holds.
    """

    def __init__(
        self, stream: str, after_sequence: int, first_sequence: int, last_sequence: int
    ) -> None:
        self.stream = stream
        self.after_sequence = after_sequence
        self.first_sequence = first_sequence
        self.last_sequence = last_sequence
        super().__init__(
            f"stream {stream} cannot replay the events after sequence {after_sequence}: it holds "
            f"sequences {first_sequence}..{last_sequence}"
        )


class UnknownEndpoint(TransportError):
    """The worker at the address does not serve the requested endpoint."""

    def __init__(self, endpoint: str, *, address: str | None = None) -> None:
        self.endpoint = endpoint
        super().__init__(f"unknown endpoint {endpoint!r}", address=address)


class RemoteError(TransportError):
    """The worker's handler raised; carries the remote exception's type name and message.

    Reads ``handler raised ValueError: boom (ns.comp.ep at tcp://10.0.0.5:40123)``; the
    worker logs the traceback.

    Attributes:
        kind: the remote exception class name.
        remote_message: the remote exception's message.
        endpoint: the endpoint called, when known.
        remote_traceback: the handler's traceback as text when the worker logs at debug level
            (``DYN_LOG=debug``), else ``""``.
    """

    def __init__(
        self,
        kind: str,
        remote_message: str,
        *,
        address: str | None = None,
        endpoint: str = "",
        remote_traceback: str = "",
    ) -> None:
        self.kind = kind
        self.remote_message = remote_message
        self.endpoint = endpoint
        self.remote_traceback = remote_traceback
        msg = f"handler raised {kind}" + (f": {remote_message}" if remote_message else "")
        where = " at ".join(part for part in (endpoint, address) if part)
        super().__init__(msg + (f" ({where})" if where else ""), address=address)


# --- routing and admission ---------------------------------------------------------------------


class NoInstances(TroupeError):
    """No live instance serves the endpoint."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        super().__init__(f"no instances found for endpoint {endpoint}")


class InstanceNotFound(NoInstances):
    """A direct request named an instance that is not available."""

    def __init__(self, endpoint: str, instance_id: str) -> None:
        self.instance_id = instance_id
        TroupeError.__init__(self, f"instance_id={instance_id} not found for endpoint {endpoint}")
        self.endpoint = endpoint


class Overloaded(TroupeError):
    """The worker is at its admission limit; retry elsewhere or later."""

    def __init__(self, endpoint: str = "", limit: int | None = None) -> None:
        self.endpoint = endpoint
        self.limit = limit
        msg = "worker at capacity"
        if endpoint:
            msg += f" for endpoint {endpoint}"
        if limit is not None:
            msg += f" (max in-flight {limit})"
        super().__init__(msg)


class AllWorkersBusy(Overloaded):
    """Every worker of the endpoint is over the router's busy threshold; nothing was sent.

    Raised by the router before any worker is asked (the KV policy's busy filter), so a caller
    retries later rather than elsewhere.

    Attributes:
        workers: how many workers were considered.
    """

    def __init__(self, endpoint: str = "", workers: int = 0) -> None:
        super().__init__(endpoint)
        self.workers = workers
        self.args = (
            f"all {workers} workers of {endpoint or 'the endpoint'} are over the busy threshold",
        )


class Cancelled(TroupeError):
    """The request was cancelled by its caller."""


# --- discovery records (added with the discovery stores) ---------------------------------------


class InvalidRecord(DiscoveryError):
    """A discovery key or value does not follow the registration layout; watchers skip it.

    Attributes:
        key: the key involved, when known.
        reason: what is wrong with it.
    """

    def __init__(self, reason: str, *, key: str | None = None) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"invalid discovery record{f' at {key}' if key else ''}: {reason}")


# --- requests refused before they are sent (the frontend, every request plane) ----------------


class InvalidRequest(TroupeError, ValueError):
    """A request is malformed or has a field with an unusable value (frontend body, plane call).

    Attributes:
        param: the offending field as a dotted path (``"messages[0].content"``), or ``None``
            when the body as a whole is unusable (not JSON, not an object).
        detail: what is wrong, in words.
    """

    def __init__(self, detail: str, *, param: str | None = None) -> None:
        self.param = param
        self.detail = detail
        super().__init__(f"invalid request: {detail}" + (f" (field {param})" if param else ""))


# --- wire versions (added with the instance record's ``wire`` field) -----------------------------


class IncompatibleInstances(NoInstances):
    """Instances of the endpoint exist, but none speaks this troupe's wire version.

    A ``NoInstances`` (an OpenAI frontend still answers 503): nothing is sent to such instances,
    since an older peer would hang or drop frames rather than fail.

    Attributes:
        endpoint: the endpoint, ``"{namespace}.{component}.{endpoint}"``.
        versions: the wire version of each incompatible instance, by instance id.
        wire: the wire version this troupe speaks.
    """

    def __init__(self, endpoint: str, versions: Mapping[str, int], wire: int) -> None:
        self.versions = dict(versions)
        self.wire = wire
        count = len(self.versions)
        distinct = ", ".join(str(v) for v in sorted(set(self.versions.values())))
        plural = len(set(self.versions.values())) > 1
        TroupeError.__init__(
            self,
            f"{count} instance{'s' if count != 1 else ''} of {endpoint} "
            f"speak{'' if count != 1 else 's'} wire version{'s' if plural else ''} {distinct}, "
            f"this troupe speaks {wire}: upgrade them together",
        )
        self.endpoint = endpoint
