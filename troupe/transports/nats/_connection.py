"""Opening and closing the NATS connection that each end of the NATS plane holds.

The connection helper itself lives below the wings, in :mod:`troupe._support._nats` (the event
plane's NATS backend opens its connection the same way); this module binds it to the plane's
logger. Failures, all typed:

- Broker outage: nats-py keeps reconnecting forever; a worker's subscriptions are restored by
  nats-py, so it serves again without a restart (what each end does meanwhile is in
  :mod:`~troupe.transports.nats._server` and :mod:`~troupe.transports.nats._client`).
- Unreachable server at start-up (first request, or
  :meth:`~troupe.transports.nats.NatsRpcServer.start`): ``ConnectionLost`` naming ``NATS_SERVER``
  within ``DYN_NATS_CONNECT_TIMEOUT``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from troupe._support._logging import get_logger
from troupe._support._nats import Callback as _Callback
from troupe._support._nats import NatsClient as _Nats
from troupe._support._nats import close_quietly, open_connection
from troupe._support._nats import redact as _redact
from troupe._support._nats import servers_text as _servers_text
from troupe.config import NatsConfig

__all__ = ["_close_quietly", "_open", "_redact", "_servers_text"]

_log = get_logger("troupe.transports.nats")


async def _open(
    config: NatsConfig,
    name: str,
    *,
    disconnected: _Callback,
    reconnected: _Callback,
    refused: Callable[[str], Awaitable[None]] | None = None,
) -> _Nats:
    """Connect to ``config``'s servers within its connect timeout (reconnecting forever after).

    Raises:
        ConnectionLost: no server answered within ``DYN_NATS_CONNECT_TIMEOUT`` (names
            ``NATS_SERVER``).
        TransportError: the server refused the credentials.
    """
    return await open_connection(
        config, name, disconnected=disconnected, reconnected=reconnected, log=_log, refused=refused
    )


async def _close_quietly(nc: _Nats) -> None:
    """Close a nats-py connection; its errors only mean it is already gone."""
    await close_quietly(nc, _log)
