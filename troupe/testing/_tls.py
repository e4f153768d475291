"""Throw-away TLS files for tests: a CA with a server and a client certificate for 127.0.0.1.

Generated with the ``cryptography`` package (EC P-256), so no ``openssl`` command is needed.
:func:`issue_client_cert` signs more client certificates with the same CA, expired ones included;
a second :func:`make_tls_files` in another directory is a CA the first one's peers do not trust.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["TlsFiles", "issue_client_cert", "make_tls_files"]


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA with a server and a client certificate for 127.0.0.1 (PEM files)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    ca_key: str = ""
    """The CA's private key (:func:`issue_client_cert` signs with it)."""


def make_tls_files(directory: str | os.PathLike[str], *, days: float = 1) -> TlsFiles:
    """Create a test CA, a server certificate (127.0.0.1, localhost) and a client certificate.

    Every certificate is valid from an hour ago for ``days``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("troupe test CA")
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        _builder(ca_name, ca_name, ca_key, now - _HOUR, now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / "ca.crt", ca_cert, out / "ca.key", ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        _builder(
            _name("troupe test server"),
            ca_name,
            server_key,
            now - _HOUR,
            now + datetime.timedelta(days=days),
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        # clientAuth too: etcd's JSON gateway dials its own gRPC port with the server
        # certificate, which --client-cert-auth then checks as a client certificate.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / "server.crt", server_cert, out / "server.key", server_key)
    files = TlsFiles(
        ca=str(out / "ca.crt"),
        server_cert=str(out / "server.crt"),
        server_key=str(out / "server.key"),
        client_cert=str(out / "client.crt"),
        client_key=str(out / "client.key"),
        ca_key=str(out / "ca.key"),
    )
    issue_client_cert(files, out, "client", days=days)
    return files


def issue_client_cert(
    files: TlsFiles,
    directory: str | os.PathLike[str],
    name: str,
    *,
    days: float = 1,
    expired: bool = False,
    common_name: str | None = None,
) -> tuple[str, str]:
    """Sign a client certificate ``NAME.crt`` with the CA of ``files``; return the paths of the
    certificate and its key (``NAME.key``).

    Args:
        expired: valid for ``days`` until an hour ago instead of from an hour ago.
        common_name: the subject's CN (default ``troupe test NAME``); etcd with client
            certificate auth takes it as the user name of a client that sends no password.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ca_cert = x509.load_pem_x509_certificate(Path(files.ca).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(files.ca_key).read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{files.ca_key} is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    span = datetime.timedelta(days=days)
    start, end = (now - _HOUR - span, now - _HOUR) if expired else (now - _HOUR, now + span)
    cert = (
        _builder(_name(common_name or f"troupe test {name}"), ca_cert.subject, key, start, end)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    _write(cert_path, cert, key_path, key)
    return str(cert_path), str(key_path)


_HOUR = datetime.timedelta(hours=1)
_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    start: datetime.datetime,
    end: datetime.datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _write(
    cert_path: Path, cert: x509.Certificate, key_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
