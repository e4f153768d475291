"""The ``etcd`` test server: one member, optional TLS and auth, built on :class:`_ServerProcess`."""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from troupe.errors import TroupeError
from troupe.testing._server_process import _LOOPBACK, _ServerProcess, find_binary, free_port
from troupe.testing._tls import TlsFiles

__all__ = ["EtcdServer"]


class EtcdServer(_ServerProcess):
    """A single-member etcd on 127.0.0.1, its data in the temp dir.

    Tuned for tests: short raft ticks (so 1-second leases are honoured), no fsync.

    Args:
        port: fixed client port (default: a free one).
        peer_port: fixed peer port (default: a free one).
        tls: serve TLS with these files (:func:`~troupe.testing.make_tls_files`).
        client_cert_auth: with ``tls``, refuse clients without a certificate signed by
            ``tls.ca`` (``--client-cert-auth``). With auth enabled too, a client that sends no
            password is the user named by its certificate's common name.
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
        client_cert_auth: bool = True,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        super().__init__(binary, "etcd", port)
        self.peer_port = peer_port if peer_port is not None else free_port()
        self.tls = tls
        self.client_cert_auth = client_cert_auth
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
            ]
            if self.client_cert_auth:
                argv.append("--client-cert-auth")
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
    # not every etcd package ships; with TLS it runs etcdctl all the same, because the gateway
    # refuses the requests of a client with a certificate once --client-cert-auth and auth are on.

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
        if self.tls is not None:
            self.etcdctl("user", "add", "root", f"--new-user-password={root_password}")
            self.etcdctl("role", "add", "root")
            self.etcdctl("user", "grant-role", "root", "root")
            self.etcdctl("auth", "enable")
            self._root_password = root_password
            return
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
        if self.tls is not None:
            self.etcdctl("role", "add", role)
            for prefix in prefixes:
                scope = "--prefix" if prefix else "--from-key"
                self.etcdctl("role", "grant-permission", role, permission, prefix or "\x01", scope)
            return
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
        if self.tls is not None:
            self.etcdctl("user", "add", name, f"--new-user-password={password}")
            for role in roles:
                self.etcdctl("user", "grant-role", name, role)
            return
        self._gateway("/v3/auth/user/add", {"name": name, "password": password})
        for role in roles:
            self._gateway("/v3/auth/user/grant", {"user": name, "role": role})


def _prefix_end(key: bytes) -> bytes:
    """etcd's range end of a prefix: the key with its last byte below 0xff incremented."""
    for i in range(len(key) - 1, -1, -1):
        if key[i] < 0xFF:
            return key[:i] + bytes([key[i] + 1])
    return b"\0"
