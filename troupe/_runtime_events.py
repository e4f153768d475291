"""The runtime's event plane: opened from the configuration on first use, closed with it.

``DYN_EVENT_PLANE`` picks the plane (``nats``: connects to ``NATS_SERVER``; ``zmq``: brokerless,
its publishers' channels registered in discovery through the runtime's lease keeper, which
writes them again when the lease is lost and re-taken). Nothing is opened until something asks
for ``rt.event_plane``: a frontend run with ``--no-kv-events`` never connects to NATS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from troupe.actors._lease import Register, Unregister
from troupe.events import EventPlane
from troupe.events._factory import open_event_plane

if TYPE_CHECKING:
    from troupe.actors import ActorRef
    from troupe.runtime import Runtime

__all__ = ["open_runtime_event_plane"]

_REGISTER_TIMEOUT = 10.0


class _LeaseRegistrar:
    """Event channels written through the runtime's LeaseActor, like instance records."""

    def __init__(self, lease: ActorRef[Any]) -> None:
        self._lease = lease

    async def register(self, key: str, value: bytes) -> None:
        await self._lease.ask_async(Register(key, value), timeout=_REGISTER_TIMEOUT)

    async def unregister(self, key: str) -> None:
        if self._lease.is_alive():
            await self._lease.ask_async(Unregister(key), timeout=_REGISTER_TIMEOUT)


def open_runtime_event_plane(rt: Runtime, lease: ActorRef[Any] | None) -> EventPlane:
    """Build and connect the event plane ``rt.config`` names (blocking; not on the I/O loop).

    ``lease``: the runtime's LeaseActor (for ``zmq``; None for a plane that needs no discovery).

    Raises:
        ConfigError: ``DYN_EVENT_PLANE`` or ``DYN_DURABLE_KV_EVENTS`` is unusable.
        ConnectionLost: NATS cannot be reached (the error says ``--no-kv-events`` turns events
            off).
    """
    config = rt.config
    if config.events.plane == "zmq" and lease is not None:
        plane = open_event_plane(config, store=rt.store, registrar=_LeaseRegistrar(lease))
    else:
        plane = open_event_plane(config)
    try:
        rt.io.run(plane.connect(), timeout=config.nats.connect_timeout + 5.0)
    except BaseException:
        rt.io.run(plane.close(), timeout=5.0)
        raise
    return plane
