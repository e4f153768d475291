"""Opening and closing a NATS connection: what every NATS user in troupe shares.

The request plane's NATS transport, and the event plane's NATS backend, each hold one connection
opened here: bounded at start-up (``DYN_NATS_CONNECT_TIMEOUT``), reconnecting forever after, with
credentials from :class:`~troupe.config.NatsConfig` and failures translated into troupe's errors.

- Broker outage: nats-py keeps reconnecting forever and restores the subscriptions itself; the
  ``disconnected`` and ``reconnected`` callbacks tell the owner.
- Unreachable server at start-up: ``ConnectionLost`` naming ``NATS_SERVER`` within
  ``DYN_NATS_CONNECT_TIMEOUT``; refused credentials: ``TransportError`` naming ``NATS_AUTH_*``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import nats.errors
from nats.aio.client import Client as NatsClient

from troupe._support._logging import TroupeLogger, get_logger
from troupe.config import NatsConfig
from troupe.errors import ConnectionLost, TransportError

__all__ = ["NatsClient", "close_quietly", "open_connection", "redact", "servers_text"]

# Seconds between reconnect attempts to one server (nats-py's default is 2 s, too slow to notice
# a restarted broker promptly). Attempts never stop: requests fail fast meanwhile.
_RECONNECT_WAIT: Final = 0.25
_CLOSE_TIMEOUT: Final = 5.0

_default_log = get_logger("troupe.nats")


def redact(url: str) -> str:
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


def servers_text(config: NatsConfig) -> str:
    """``NATS_SERVER`` for messages: the URLs, comma-separated, credentials removed."""
    return ",".join(redact(server) for server in config.servers)


Callback = Callable[[], Awaitable[None]]


async def open_connection(
    config: NatsConfig,
    name: str,
    *,
    disconnected: Callback,
    reconnected: Callback,
    log: TroupeLogger | None = None,
) -> NatsClient:
    """Connect to ``config``'s servers within its connect timeout (reconnecting forever after).

    Args:
        config: servers, credentials and timeouts.
        name: the connection's name as the server shows it.
        disconnected: awaited when the connection drops.
        reconnected: awaited when it is back (subscriptions already restored).
        log: where connection trouble is logged (default ``troupe.nats``).

    Raises:
        ConnectionLost: no server answered within ``DYN_NATS_CONNECT_TIMEOUT`` (names
            ``NATS_SERVER``).
        TransportError: the server refused the credentials.
    """
    logger = log if log is not None else _default_log
    nc = NatsClient()
    last_error: list[BaseException] = []

    async def on_error(exc: Exception) -> None:
        if not nc.is_connected:
            last_error[:] = [exc]
        if isinstance(exc, nats.errors.SlowConsumerError):
            logger.warning(
                "NATS dropped a message for a slow subscription", connection=name, error=str(exc)
            )
        else:
            logger.debug("NATS connection error", connection=name, error=repr(exc))

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
        await close_quietly(nc, logger)
        cause = last_error[0] if last_error else exc
        text = f"{cause}" or type(cause).__name__
        servers = servers_text(config)
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


async def close_quietly(nc: NatsClient, log: TroupeLogger | None = None) -> None:
    """Close a nats-py connection; its errors only mean it is already gone."""
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await nc.close()
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        logger = log if log is not None else _default_log
        logger.debug("closing a NATS connection failed", error=repr(exc))
