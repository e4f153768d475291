"""Opening and closing a NATS connection: what every NATS user in troupe shares.

The request plane's NATS transport, and the event plane's NATS backend, each hold one connection
opened here: bounded at start-up (``DYN_NATS_CONNECT_TIMEOUT``), reconnecting forever after, with
credentials from :class:`~troupe.config.NatsConfig` and failures translated into troupe's errors.

- Broker outage: nats-py keeps reconnecting forever and restores the subscriptions itself; the
  ``disconnected`` and ``reconnected`` callbacks tell the owner.
- Unreachable server at start-up: ``ConnectionLost`` naming ``NATS_SERVER`` within
  ``DYN_NATS_CONNECT_TIMEOUT``; refused credentials: ``TransportError`` naming ``NATS_AUTH_*``.

Security, one set of options for every NATS user: user/password, token, NKey seed (value or
file), ``.creds`` file; TLS when a URL is ``tls://`` or a CA or client certificate is configured
(``NATS_TLS_*``: the server is verified against the CA, the client certificate is shown to it),
and a connection that was asked for TLS but came up without it is refused, never used. Reply
inboxes live under ``DYN_NATS_INBOX_PREFIX``, so that NATS permissions can give each user its own.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import nats.errors
from nats.aio.client import Client as NatsClient

from troupe._support._logging import TroupeLogger, get_logger
from troupe.config import NatsConfig
from troupe.errors import ConfigError, ConnectionLost, TransportError

__all__ = [
    "NatsClient",
    "close_quietly",
    "open_connection",
    "redact",
    "servers_text",
    "tls_context",
]

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


def tls_context(config: NatsConfig) -> ssl.SSLContext | None:
    """The TLS context for ``config``: ``None`` unless a URL is ``tls://`` or a ``NATS_TLS_*``
    file is set. The server is verified against ``NATS_TLS_CA_CERT_PATH`` (the system's CAs when
    unset); the client certificate, when set, is shown to it.

    Raises:
        ConfigError: a file cannot be read or is not PEM of the right kind, or only one of the
            client certificate and its key is set (names the variable).
    """
    wanted = any(server.startswith("tls://") for server in config.servers)
    ca, cert, key = config.tls_ca_file, config.tls_client_cert_file, config.tls_client_key_file
    if (cert is None) != (key is None):
        raise ConfigError(
            "NATS_TLS_CLIENT_CERT_PATH/NATS_TLS_CLIENT_KEY_PATH",
            cert or key,
            "both the client certificate and its key, or neither",
        )
    if not wanted and ca is None and cert is None:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("NATS_TLS_CA_CERT_PATH", ca, f"a readable PEM CA file ({exc})") from exc
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "NATS_TLS_CLIENT_CERT_PATH/NATS_TLS_CLIENT_KEY_PATH",
                f"{cert}, {key}",
                f"a readable PEM certificate and its private key ({exc})",
            ) from exc
    return context


def _auth_options(config: NatsConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"inbox_prefix": config.inbox_prefix}
    if config.username is not None:
        options["user"] = config.username
        options["password"] = config.password or ""
    if config.token is not None:
        options["token"] = config.token
    if config.nkey_seed is not None:
        if config.nkey_seed_file is not None:
            raise ConfigError(
                "NATS_AUTH_NKEY/NATS_AUTH_NKEY_SEED_FILE", "****", "one of the two, not both"
            )
        options["nkeys_seed_str"] = config.nkey_seed
    if config.nkey_seed_file is not None:
        options["nkeys_seed"] = config.nkey_seed_file
    if config.credentials_file is not None:
        options["user_credentials"] = config.credentials_file
    signs = config.nkey_seed, config.nkey_seed_file, config.credentials_file
    if any(value is not None for value in signs) and importlib.util.find_spec("nkeys") is None:
        # nats-py imports it only then, inside connect(), where it would surface as a bare
        # ImportError.
        variable, shown = _nkey_setting(config)
        raise ConfigError(variable, shown, "the 'nkeys' package installed (pip install nkeys)")
    context = tls_context(config)
    if context is not None:
        options["tls"] = context
    return options


def _nkey_setting(config: NatsConfig) -> tuple[str, str]:
    """The setting that needs the ``nkeys`` package, and its value as an error may show it."""
    if config.credentials_file is not None:
        return "NATS_AUTH_CREDENTIALS_FILE", config.credentials_file
    if config.nkey_seed_file is not None:
        return "NATS_AUTH_NKEY_SEED_FILE", config.nkey_seed_file
    return "NATS_AUTH_NKEY", "****"  # a secret


async def open_connection(
    config: NatsConfig,
    name: str,
    *,
    disconnected: Callback,
    reconnected: Callback,
    log: TroupeLogger | None = None,
    refused: Callable[[str], Awaitable[None]] | None = None,
) -> NatsClient:
    """Connect to ``config``'s servers within its connect timeout (reconnecting forever after).

    Args:
        config: servers, credentials and timeouts.
        name: the connection's name as the server shows it.
        disconnected: awaited when the connection drops.
        reconnected: awaited when it is back (subscriptions already restored).
        log: where connection trouble is logged (default ``troupe.nats``).
        refused: awaited with the server's text when it refuses a subscribe or publish this
            user is not granted (NATS permissions), after the warning is logged.

    Raises:
        ConnectionLost: no server answered within ``DYN_NATS_CONNECT_TIMEOUT`` (names
            ``NATS_SERVER``).
        TransportError: the server refused the credentials or the client certificate, or TLS
            was asked for and the server does not speak it.
        ConfigError: a TLS file cannot be read, or an NKey or ``.creds`` file is set and the
            ``nkeys`` package is not installed.
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
        elif "permissions violation" in str(exc).lower():
            # The server refused a subscribe or publish this user is not granted (NATS
            # permissions, DYN_NATS_INBOX_PREFIX): nothing else tells the operator.
            logger.warning("NATS refused an operation", connection=name, error=str(exc))
            if refused is not None:
                await refused(str(exc))
        else:
            logger.debug("NATS connection error", connection=name, error=repr(exc))

    options: dict[str, Any] = _auth_options(config) | {
        "servers": list(config.servers),
        "name": name,
        "connect_timeout": config.connect_timeout,
        "reconnect_time_wait": _RECONNECT_WAIT,
        "max_reconnect_attempts": -1,
        "error_cb": on_error,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
    }
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
        if isinstance(cause, ssl.SSLError):
            raise TransportError(
                f"TLS with NATS at {servers} failed (NATS_TLS_CA_CERT_PATH, "
                f"NATS_TLS_CLIENT_CERT_PATH): {text}",
                address=servers,
            ) from exc
        raise ConnectionLost(
            f"cannot connect to NATS at {servers} (NATS_SERVER) within "
            f"{config.connect_timeout:g} s (DYN_NATS_CONNECT_TIMEOUT): {text}",
            address=servers,
        ) from exc
    # nats-py upgrades to TLS only when the server's INFO asks for it: a server (or a man in the
    # middle) that does not must not get a plaintext connection we were told to encrypt.
    server_info: dict[str, Any] = getattr(nc, "_server_info", {})
    if "tls" in options and not server_info.get("tls_required"):
        await close_quietly(nc, logger)
        servers = servers_text(config)
        raise TransportError(
            f"NATS at {servers} (NATS_SERVER) does not speak TLS, which NATS_TLS_CA_CERT_PATH, "
            "NATS_TLS_CLIENT_CERT_PATH or a tls:// URL require; refusing a plaintext connection",
            address=servers,
        )
    return nc


async def close_quietly(nc: NatsClient, log: TroupeLogger | None = None) -> None:
    """Close a nats-py connection; its errors only mean it is already gone."""
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await nc.close()
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        logger = log if log is not None else _default_log
        logger.debug("closing a NATS connection failed", error=repr(exc))
