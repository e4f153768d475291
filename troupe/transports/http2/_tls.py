"""TLS on the HTTP/2 plane: the worker's and the caller's ``ssl`` contexts, and refusals in words.

A worker with ``DYN_HTTP_RPC_TLS_CERT`` and ``DYN_HTTP_RPC_TLS_KEY`` serves TLS (ALPN ``h2``,
``http/1.1`` for ``curl``) and advertises an ``https://`` address: that is how its record tells
callers that TLS is needed. With ``DYN_HTTP_RPC_TLS_CLIENT_AUTH`` it also requires a client
certificate signed by ``DYN_HTTP_RPC_TLS_CA`` (mutual TLS). A caller dials ``https://`` addresses
with TLS, verifying the worker's certificate (chain, expiry, host name) against
``DYN_HTTP_RPC_TLS_CA`` and presenting ``DYN_HTTP_RPC_TLS_CLIENT_CERT`` when set.

Files are read when the context is built (server start, first ``https://`` call), so a missing or
unreadable file is a :class:`~troupe.errors.ConfigError` naming its variable; a refused handshake
is a :class:`~troupe.errors.TlsError` naming the setting to look at.
"""

from __future__ import annotations

import os
import ssl
from typing import Final

from troupe.config import HttpConfig
from troupe.errors import ConfigError, TlsError

CA: Final = "DYN_HTTP_RPC_TLS_CA"
CLIENT_AUTH: Final = "DYN_HTTP_RPC_TLS_CLIENT_AUTH"
CLIENT_CERT: Final = "DYN_HTTP_RPC_TLS_CLIENT_CERT"
CLIENT_KEY: Final = "DYN_HTTP_RPC_TLS_CLIENT_KEY"
SERVER_CERT: Final = "DYN_HTTP_RPC_TLS_CERT"
SERVER_KEY: Final = "DYN_HTTP_RPC_TLS_KEY"

SERVER_ALPN: Final = ("h2", "http/1.1")
CLIENT_ALPN: Final = ("h2",)

# OpenSSL's words for "the peer did not accept our certificate (or its absence)".
_CLIENT_CERT_REFUSED: Final = (
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_UNKNOWN",
    "HANDSHAKE_FAILURE",
)


def server_context(http: HttpConfig) -> ssl.SSLContext | None:
    """The worker's context, or None when ``DYN_HTTP_RPC_TLS_CERT`` is unset (plain h2c).

    Raises:
        ConfigError: a file cannot be read or is not what it should be, a certificate comes
            without its key, or client authentication lacks TLS or a CA (names the variable).
    """
    _pair(http.tls_cert, SERVER_CERT, http.tls_key, SERVER_KEY)
    if http.tls_cert is None or http.tls_key is None:
        if http.tls_client_auth:  # mutual TLS asked for: never serve in the clear instead
            raise ConfigError(
                SERVER_CERT, None, f"a PEM file: {CLIENT_AUTH} needs TLS ({SERVER_KEY} too)"
            )
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 9113 §9.2
    _load_chain(context, http.tls_cert, SERVER_CERT, http.tls_key, SERVER_KEY)
    context.set_alpn_protocols(list(SERVER_ALPN))
    if http.tls_client_auth:
        if http.tls_ca is None:
            raise ConfigError(CA, None, f"a PEM file of the CA that signs client certificates "
                              f"({CLIENT_AUTH} is on)")  # fmt: skip
        _load_ca(context, http.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(http: HttpConfig) -> ssl.SSLContext:
    """The caller's context for ``https://`` workers.

    Raises:
        TlsError: ``DYN_HTTP_RPC_TLS_CA`` is unset: a worker's certificate cannot be verified.
        ConfigError: a file cannot be read or is not what it should be (names its variable).
    """
    if http.tls_ca is None:
        raise TlsError(
            f"the worker's address is https://: set {CA} to the CA certificate that signed "
            "its certificate",
            setting=CA,
        )
    _pair(http.tls_client_cert, CLIENT_CERT, http.tls_client_key, CLIENT_KEY)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(context, http.tls_ca)
    if http.tls_client_cert is not None and http.tls_client_key is not None:
        _load_chain(context, http.tls_client_cert, CLIENT_CERT, http.tls_client_key, CLIENT_KEY)
    context.set_alpn_protocols(list(CLIENT_ALPN))
    return context


def refusal(exc: ssl.SSLError, authority: str, *, has_client_cert: bool) -> TlsError:
    """A failed handshake with the worker at ``authority``, in one line naming what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or str(exc)
        return TlsError(
            f"TLS handshake with {authority} failed: its certificate was refused ({reason}); "
            f"check {CA} and the worker's DYN_HTTP_RPC_TLS_CERT",
            setting=CA,
        )
    reason = str(exc.reason or exc)
    if reason.upper().rsplit("ALERT_", 1)[-1] in _CLIENT_CERT_REFUSED:
        return _client_cert_refused(authority, has_client_cert=has_client_cert, why=reason.lower())
    return TlsError(f"TLS handshake with {authority} failed: {reason}")


def lost(exc: BaseException | None, authority: str, *, has_client_cert: bool) -> TlsError:
    """A TLS connection to ``authority`` that ended before HTTP/2 began, as a refusal."""
    if isinstance(exc, ssl.SSLError):
        return refusal(exc, authority, has_client_cert=has_client_cert)
    return dropped(authority, has_client_cert=has_client_cert)


def dropped(authority: str, *, has_client_cert: bool) -> TlsError:
    """The worker at ``authority`` closed the connection during the handshake or before HTTP/2.

    asyncio's server drops a connection whose handshake failed without sending the TLS alert,
    and with TLS 1.3 it checks the client certificate only after the caller's side of the
    handshake has ended: this is how a refused (or missing) client certificate reaches the
    caller.
    """
    return _client_cert_refused(
        authority, has_client_cert=has_client_cert, why="not signed by its CA, or expired"
    )


def _client_cert_refused(authority: str, *, has_client_cert: bool, why: str) -> TlsError:
    if has_client_cert:
        detail = f"it refused the client certificate {CLIENT_CERT} ({why})"
    else:
        detail = f"it requires a client certificate: set {CLIENT_CERT} and {CLIENT_KEY}"
    return TlsError(f"TLS handshake with {authority} failed: {detail}", setting=CLIENT_CERT)


def _pair(first: str | None, first_name: str, second: str | None, second_name: str) -> None:
    """A certificate and its key: both set or neither."""
    if (first is None) != (second is None):
        missing, given = (second_name, first_name) if second is None else (first_name, second_name)
        raise ConfigError(missing, None, f"a PEM file, set together with {given}")


def _load_chain(
    context: ssl.SSLContext, cert: str, cert_name: str, key: str, key_name: str
) -> None:
    for path, name in ((cert, cert_name), (key, key_name)):
        if not os.access(path, os.R_OK):
            raise ConfigError(name, path, "a readable PEM file")
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            cert_name, cert, f"a PEM certificate whose private key is {key_name} ({exc})"
        ) from exc


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(CA, ca, f"a readable PEM file of CA certificates ({exc})") from exc
