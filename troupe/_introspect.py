"""What a worker process says about itself, on its own request plane: ``troupe status``'s source.

Every runtime's request-plane server answers one built-in endpoint, :data:`STATUS_ENDPOINT`
(``troupe.status``: two parts, so it can never clash with a user's ``ns.component.endpoint``),
with a :class:`ProcessStatus`: the process (pid, host, instance id, plane and address, uptime,
its label and restart count when a supervisor started it), its admission limits and load, and for
each endpoint it serves the worker's state (serving / draining), requests in flight and the
endpoint's limit, and the requests, errors and cancellations counted so far. It reaches every
worker on every plane with no extra port (the status server, ``DYN_SYSTEM_PORT``, is off by
default); it goes through admission like any request, so a worker at its limit answers
``Overloaded``, which ``troupe status`` shows as such.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec

from troupe.messages._payload import encode_payload
from troupe.transports import RequestContext

__all__ = [
    "STATUS_ENDPOINT",
    "EndpointStatus",
    "ProcessLabel",
    "ProcessStatus",
    "decode_status",
    "process_status",
    "status_handler",
]

STATUS_ENDPOINT: Final = "troupe.status"
"""The built-in endpoint every troupe server answers with its :class:`ProcessStatus`."""


class ProcessLabel(msgspec.Struct, frozen=True):
    """How a supervisor names a worker process it started: ``worker-2``, started 3 times."""

    label: str
    restarts: int = 0


class EndpointStatus(msgspec.Struct, frozen=True):
    """One endpoint served by the process.

    Attributes:
        state: the worker's state (``starting``, ``serving``, ``draining``, ``stopped``).
        inflight: its requests being served now.
        max_inflight: its own admission limit (0: only the process-wide ones).
        requests: requests admitted so far.
        errors: of those, the ones that failed (cancellations not counted).
        cancellations: of those, the ones their caller cancelled.
    """

    state: str
    inflight: int
    max_inflight: int
    requests: int
    errors: int
    cancellations: int


class ProcessStatus(msgspec.Struct, frozen=True):
    """One worker process, as its ``troupe.status`` endpoint describes it.

    Attributes:
        pid: its process id.
        host: its host name.
        instance_id: its instance id in discovery.
        plane: its request plane (``tcp``, ``http``, ``nats``).
        address: the address its server listens on.
        started_at: when the runtime started (Unix time).
        uptime: seconds since then.
        label: the supervisor's name for it (``worker-2``), or ``None`` when started by hand.
        restarts: how many times its supervisor restarted it (0 for the first start).
        inflight: requests being served by the process now.
        max_inflight: the process-wide admission limit (``DYN_WORKER_MAX_INFLIGHT``; 0: none).
        max_inflight_per_caller: the per-caller limit (``DYN_WORKER_MAX_INFLIGHT_PER_CALLER``).
        endpoints: by endpoint path.
    """

    pid: int
    host: str
    instance_id: str
    plane: str
    address: str
    started_at: float
    uptime: float
    label: str | None
    restarts: int
    inflight: int
    max_inflight: int
    max_inflight_per_caller: int
    endpoints: dict[str, EndpointStatus]


def process_status(
    *,
    instance_id: str,
    plane: str,
    address: str,
    started_at: float,
    label: ProcessLabel | None,
    inflight: int,
    limits: tuple[int, int],
    endpoints: dict[str, EndpointStatus],
) -> ProcessStatus:
    """A :class:`ProcessStatus` of this process, now."""
    return ProcessStatus(
        pid=os.getpid(),
        host=socket.gethostname(),
        instance_id=instance_id,
        plane=plane,
        address=address,
        started_at=started_at,
        uptime=max(0.0, time.time() - started_at),
        label=None if label is None else label.label,
        restarts=0 if label is None else label.restarts,
        inflight=inflight,
        max_inflight=limits[0],
        max_inflight_per_caller=limits[1],
        endpoints=endpoints,
    )


def status_handler(
    describe: Callable[[], Awaitable[ProcessStatus]],
) -> Callable[[bytes, RequestContext], Awaitable[bytes]]:
    """The transport-level handler of :data:`STATUS_ENDPOINT`: one chunk, the status."""

    async def status(payload: bytes, ctx: RequestContext) -> bytes:
        return encode_payload(msgspec.to_builtins(await describe()))

    return status


def decode_status(value: object) -> ProcessStatus:
    """The :class:`ProcessStatus` in a decoded ``troupe.status`` chunk.

    Raises:
        msgspec.ValidationError: the chunk is not a status (a peer of another version).
    """
    return msgspec.convert(value, ProcessStatus)
