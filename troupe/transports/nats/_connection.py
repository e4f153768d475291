"""Opening and closing the NATS connection that each end of the NATS plane holds.

Failures, all typed:

- Broker outage: nats-py keeps reconnecting forever; a worker's subscriptions are restored by
  nats-py, so it serves again without a restart (what each end does meanwhile is in
  :mod:`~troupe.transports.nats._server` and :mod:`~troupe.transports.nats._client`).
- Unreachable server at start-up (first request, or
  :meth:`~troupe.transports.nats.NatsRpcServer.start`): ``ConnectionLost`` naming ``NATS_SERVER``
  within ``DYN_NATS_CONNECT_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import nats.errors
from nats.aio.client import Client as _Nats

from troupe.config import NatsConfig
from troupe.errors import ConnectionLost, TransportError

# Seconds between reconnect attempts to one server (nats-py's default is 2 s, too slow to notice
# a restarted broker promptly). Attempts never stop: requests fail fast meanwhile.
_RECONNECT_WAIT: Final = 0.25
_CLOSE_TIMEOUT: Final = 5.0

_log = logging.getLogger("troupe.transports.nats")


def _redact(url: str) -> str:
    """A server URL without the credentials it may embed."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return "<malformed URL>"
    if parts.username is None and parts.password is None:
        return url
    netloc = (host or "") + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _servers_text(config: NatsConfig) -> str:
    return ",".join(_redact(server) for server in config.servers)


_Callback = Callable[[], Awaitable[None]]


async def _open(
    config: NatsConfig, name: str, *, disconnected: _Callback, reconnected: _Callback
) -> _Nats:
    """Connect to ``config``'s servers within its connect timeout (reconnecting forever after).

    Raises:
        ConnectionLost: no server answered within ``DYN_NATS_CONNECT_TIMEOUT`` (names
            ``NATS_SERVER``).
        TransportError: the server refused the credentials.
    """
    nc = _Nats()
    last_error: list[BaseException] = []

    async def on_error(exc: Exception) -> None:
        if not nc.is_connected:
            last_error[:] = [exc]
        if isinstance(exc, nats.errors.SlowConsumerError):
            _log.warning("%s: NATS dropped a message for a slow subscription: %s", name, exc)
        else:
            _log.debug("%s: NATS connection error: %r", name, exc)

    options: dict[str, Any] = {
        "servers": list(config.servers),
        "name": name,
        "connect_timeout": config.connect_timeout,
        "reconnect_time_wait": _RECONNECT_WAIT,
        "max_reconnect_attempts": -1,
        "error_cb": on_error,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
    }
    if config.username is not None:
        options["user"] = config.username
        options["password"] = config.password or ""
    if config.token is not None:
        options["token"] = config.token
    if config.credentials_file is not None:
        options["user_credentials"] = config.credentials_file
    try:
        async with asyncio.timeout(config.connect_timeout):
            await nc.connect(**options)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        await _close_quietly(nc)
        cause = last_error[0] if last_error else exc
        text = f"{cause}" or type(cause).__name__
        servers = _servers_text(config)
        if isinstance(cause, nats.errors.AuthorizationError) or "authorization" in text.lower():
            raise TransportError(
                f"NATS at {servers} (NATS_SERVER) refused the credentials (NATS_AUTH_*): {text}",
                address=servers,
            ) from exc
        raise ConnectionLost(
            f"cannot connect to NATS at {servers} (NATS_SERVER) within "
            f"{config.connect_timeout:g} s (DYN_NATS_CONNECT_TIMEOUT): {text}",
            address=servers,
        ) from exc
    return nc


async def _close_quietly(nc: _Nats) -> None:
    """Close a nats-py connection; its errors only mean it is already gone."""
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await nc.close()
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        _log.debug("closing a NATS connection failed: %r", exc)
