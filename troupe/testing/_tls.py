"""Throw-away TLS files for tests: a CA with a server and a client certificate for 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from troupe.errors import TroupeError

__all__ = ["TlsFiles", "make_tls_files"]


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA with a server and a client certificate for 127.0.0.1 (PEM files)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls_files(directory: str | os.PathLike[str]) -> TlsFiles:
    """Create a test CA and certificates with the ``openssl`` command (EC P-256, 1 day).

    Raises:
        TroupeError: ``openssl`` is missing or failed.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TroupeError("openssl not found on PATH")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        result = subprocess.run(
            [openssl, *args], cwd=out, capture_output=True, check=False, timeout=30
        )
        if result.returncode != 0:
            raise TroupeError(f"openssl {args[0]} failed: {result.stderr.decode(errors='replace')}")

    key_args = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *key_args, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=troupe test CA")  # fmt: skip
    (out / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (out / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        run("req", *key_args, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=troupe test {name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
            "-extfile", f"{name}.ext")  # fmt: skip
    return TlsFiles(
        ca=str(out / "ca.crt"),
        server_cert=str(out / "server.crt"),
        server_key=str(out / "server.key"),
        client_cert=str(out / "client.crt"),
        client_key=str(out / "client.key"),
    )
