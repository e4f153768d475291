"""TLS of the ``etcd`` store: channel credentials from the ``ETCD_AUTH_*`` files, and failed
handshakes told in words that name the setting to fix.

The files are read again at every (re)connect, so a rotated certificate is picked up by the next
fail-over. A missing or unreadable file, a client certificate without its key, and a client
certificate that has expired or is not valid yet are refused before anything is sent; what the
server refuses (our certificate) and what we refuse (its certificate) is read from the handshake
error gRPC reports. Each is a :class:`DiscoveryError`, not ``DiscoveryUnavailable``: trying again
will not help.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import ssl
import time
from typing import Any

import grpc

from troupe.config import EtcdConfig
from troupe.errors import DiscoveryError

__all__ = ["channel_credentials", "handshake_failure"]

# Alerts a server sends when it refuses the client certificate (BoringSSL's names).
_CLIENT_CERT_REFUSED = (
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_UNKNOWN_CA",
    "ALERT_ACCESS_DENIED",
    "CERTIFICATE_REQUIRED",
)
_NOT_TLS = ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST")
_SSL_REASON = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)")


def channel_credentials(config: EtcdConfig, *, tls: bool) -> grpc.ChannelCredentials | None:
    """The credentials of a secure channel, or None for plaintext (no ``https://`` endpoint
    and no TLS file set).

    Raises:
        DiscoveryError: a file cannot be read, is not PEM, or the client certificate is
            expired, not valid yet or lacks its key; the message names the setting.
    """
    if not (tls or config.ca or config.client_cert or config.client_key):
        return None
    if config.client_cert and not config.client_key:
        raise DiscoveryError(
            "etcd TLS: ETCD_AUTH_CLIENT_CERT is set but ETCD_AUTH_CLIENT_KEY is not"
        )
    if config.client_key and not config.client_cert:
        raise DiscoveryError(
            "etcd TLS: ETCD_AUTH_CLIENT_KEY is set but ETCD_AUTH_CLIENT_CERT is not"
        )
    ca = _read("ETCD_AUTH_CA", config.ca, b"-----BEGIN CERTIFICATE")
    cert = _read("ETCD_AUTH_CLIENT_CERT", config.client_cert, b"-----BEGIN CERTIFICATE")
    key = _read("ETCD_AUTH_CLIENT_KEY", config.client_key, b"PRIVATE KEY-----")
    if config.client_cert is not None:
        _check_validity("ETCD_AUTH_CLIENT_CERT", config.client_cert)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def handshake_failure(exc: BaseException, config: EtcdConfig, url: str) -> str | None:
    """What a failed TLS handshake with ``url`` means, naming the setting to fix; None when
    ``exc`` is no handshake failure."""
    text = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
    text = text or ""
    if "handshake failed" not in text.lower():
        return None
    upper = text.upper()
    match = _SSL_REASON.search(text)
    reason = f" ({match.group(1)})" if match else ""
    if any(alert in upper for alert in _CLIENT_CERT_REFUSED):
        if not config.client_cert:
            return (
                f"{url} asks for a client certificate: set ETCD_AUTH_CLIENT_CERT and "
                f"ETCD_AUTH_CLIENT_KEY{reason}"
            )
        return (
            f"{url} refused the client certificate ETCD_AUTH_CLIENT_CERT={config.client_cert} "
            f"(not signed by a CA the server trusts, expired or revoked){reason}"
        )
    if any(marker in upper for marker in _NOT_TLS):
        return f"{url} does not speak TLS: use http:// in ETCD_ENDPOINTS, or serve TLS{reason}"
    trust = f"ETCD_AUTH_CA={config.ca}" if config.ca else "the system CAs (ETCD_AUTH_CA is unset)"
    return f"cannot verify the certificate of {url} against {trust}{reason}"


def _read(setting: str, path: str | None, marker: bytes) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DiscoveryError(
            f"etcd TLS: cannot read {setting}={path}: {exc.strerror or exc}"
        ) from None
    if marker not in data:
        raise DiscoveryError(f"etcd TLS: {setting}={path} is not a PEM file")
    return data


def _check_validity(setting: str, path: str) -> None:
    """Refuse a certificate outside its validity period (or unreadable as one), by its dates.

    The standard library decodes certificates only through a private helper of ``_ssl``; where
    it is missing the server's refusal still names the setting, without the date.
    """
    decode: Any = getattr(importlib.import_module("_ssl"), "_test_decode_cert", None)
    if decode is None:
        return
    try:
        info = decode(path)
    except (ssl.SSLError, OSError):
        raise DiscoveryError(f"etcd TLS: {setting}={path} is not a PEM certificate") from None
    with contextlib.suppress(KeyError, ValueError):
        now = time.time()
        if ssl.cert_time_to_seconds(info["notAfter"]) < now:
            raise DiscoveryError(f"etcd TLS: {setting}={path} expired on {info['notAfter']}")
        if ssl.cert_time_to_seconds(info["notBefore"]) > now:
            raise DiscoveryError(
                f"etcd TLS: {setting}={path} is not valid before {info['notBefore']}"
            )
