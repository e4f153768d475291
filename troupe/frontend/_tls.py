"""HTTPS for the frontend: :class:`FrontendTls` names the PEM files and builds the server context.

The context is built when the frontend starts, before it binds: a missing or unreadable file, a
key that does not match its certificate, or a CA file with no certificate is a
:class:`~troupe.errors.ConfigError` naming the option (and its ``DYN_TLS_*`` variable), never a
server that starts and then fails every handshake. With a client CA every client must present a
certificate that CA signed; the handshake of one that does not fails, and only its connection.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Final

from troupe.errors import ConfigError

__all__ = ["FrontendTls"]

# Both protocols the frontend speaks, offered in ALPN (hypercorn picks HTTP/2 when it is chosen).
_ALPN: Final = ["h2", "http/1.1"]

_CERT: Final = "--tls-cert-path"
_KEY: Final = "--tls-key-path"
_CLIENT_CA: Final = "--tls-client-ca-cert-path"
_VARIABLES: Final = {
    _CERT: "DYN_TLS_CERT_PATH",
    _KEY: "DYN_TLS_KEY_PATH",
    _CLIENT_CA: "DYN_TLS_CLIENT_CA_CERT_PATH",
}


@dataclass(frozen=True, slots=True)
class FrontendTls:
    """The frontend's HTTPS files (PEM): its certificate and key, and optionally a client CA.

    Attributes:
        cert_path: the server certificate, followed by its intermediates if any
            (``--tls-cert-path``, ``DYN_TLS_CERT_PATH``).
        key_path: the certificate's private key, unencrypted (``--tls-key-path``,
            ``DYN_TLS_KEY_PATH``).
        client_ca_cert_path: CA certificates that sign client certificates
            (``--tls-client-ca-cert-path``, ``DYN_TLS_CLIENT_CA_CERT_PATH``); set, a client
            without such a certificate cannot connect (mutual TLS). ``None``: any client.
    """

    cert_path: str
    key_path: str
    client_ca_cert_path: str | None = None

    def __post_init__(self) -> None:
        for option, value in (
            (_CERT, self.cert_path),
            (_KEY, self.key_path),
            (_CLIENT_CA, self.client_ca_cert_path),
        ):
            if value is None and option == _CLIENT_CA:
                continue
            if not isinstance(value, str) or not value:
                raise ConfigError(option, value, f"a PEM file path ({_VARIABLES[option]})")

    @classmethod
    def from_paths(
        cls, cert_path: str | None, key_path: str | None, client_ca_cert_path: str | None
    ) -> FrontendTls | None:
        """The settings of these paths as given by options or variables: ``None`` when none is
        set (plain HTTP).

        Raises:
            ConfigError: the certificate is given without its key, or the reverse, or a client
                CA without them.
        """
        if cert_path is None and key_path is None:
            if client_ca_cert_path is not None:
                raise ConfigError(
                    _CLIENT_CA,
                    client_ca_cert_path,
                    f"to be set with {_CERT} and {_KEY} (client certificates need HTTPS)",
                )
            return None
        if cert_path is None or key_path is None:
            missing, given = (_CERT, _KEY) if cert_path is None else (_KEY, _CERT)
            raise ConfigError(
                missing,
                None,
                f"a PEM file path ({_VARIABLES[missing]}): {given} is set and HTTPS needs both",
            )
        return cls(cert_path, key_path, client_ca_cert_path)

    def server_context(self) -> ssl.SSLContext:
        """The server's TLS context: TLS 1.2 or later, HTTP/2 and HTTP/1.1 offered in ALPN.

        Raises:
            ConfigError: a file is missing or unreadable, is not PEM, or the key does not match
                the certificate; the error names the option.
        """
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_COMPRESSION
        context.set_alpn_protocols(_ALPN)
        for option, path in ((_CERT, self.cert_path), (_KEY, self.key_path)):
            _check_readable(option, path)
        try:
            context.load_cert_chain(self.cert_path, self.key_path)
        except ssl.SSLError as exc:
            raise ConfigError(
                _CERT,
                self.cert_path,
                f"a PEM certificate whose private key is in {_KEY} ({_reason(exc)})",
            ) from None
        if self.client_ca_cert_path is not None:
            _check_readable(_CLIENT_CA, self.client_ca_cert_path)
            try:
                context.load_verify_locations(cafile=self.client_ca_cert_path)
            except ssl.SSLError as exc:
                raise ConfigError(
                    _CLIENT_CA,
                    self.client_ca_cert_path,
                    f"a file of PEM CA certificates ({_reason(exc)})",
                ) from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def _check_readable(option: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            option, path, f"a readable PEM file ({_VARIABLES[option]}): {reason}"
        ) from None


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc)
