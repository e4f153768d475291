"""The ``nats-server`` test server (JetStream on by default), built on :class:`_ServerProcess`."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from troupe.testing._server_process import _LOOPBACK, _ServerProcess, free_port
from troupe.testing._tls import TlsFiles

__all__ = ["NatsServer", "NatsUser"]

_RPC: str = "troupe.rpc"  # troupe.transports.nats.SUBJECT_PREFIX (testing imports no wing)


@dataclass(frozen=True)
class NatsUser:
    """A user of the test server and the subjects it may publish and subscribe to.

    ``None`` allows every subject; a tuple allows only those (NATS wildcards ``*`` and ``>``).
    :meth:`worker` and :meth:`caller` give the permissions docs/request-planes.md recommends.
    """

    name: str
    password: str
    publish: tuple[str, ...] | None = None
    subscribe: tuple[str, ...] | None = None
    nkey: str | None = None
    """An NKey user's public key (``U...``): it signs in with the seed instead of a password."""

    @classmethod
    def worker(cls, name: str, password: str, *, inboxes: str = "_INBOX") -> NatsUser:
        """A worker: subscribes to worker subjects, publishes only to callers' inboxes."""
        return cls(name, password, publish=(f"{inboxes}.>",), subscribe=(f"{_RPC}.>",))

    @classmethod
    def caller(cls, name: str, password: str, *, inbox_prefix: str) -> NatsUser:
        """A caller whose ``DYN_NATS_INBOX_PREFIX`` is ``inbox_prefix``: publishes requests and
        cancels (and probes) to workers, subscribes to its own inboxes only."""
        return cls(
            name,
            password,
            publish=(f"{_RPC}.*", f"{_RPC}.*.ctl"),
            subscribe=(f"{inbox_prefix}.>",),
        )

    def _config(self) -> str:
        rules = {
            verb: {"allow": list(subjects)}
            for verb, subjects in (("publish", self.publish), ("subscribe", self.subscribe))
            if subjects is not None
        }
        fields = (
            {"nkey": self.nkey}
            if self.nkey is not None
            else {"user": self.name, "password": self.password}
        )
        if rules:
            return json.dumps({**fields, "permissions": rules})
        return json.dumps(fields)


class NatsServer(_ServerProcess):
    """A ``nats-server`` on 127.0.0.1 (JetStream on by default, its store in the temp dir).

    Args:
        port: fixed client port (default: a free one).
        max_payload: the server's ``max_payload`` in bytes (default: the server's 1 MiB).
        jetstream: enable JetStream.
        user: with ``password``, require this user.
        password: the user's password.
        token: require this token instead.
        users: require one of these users, each with its permissions (instead of ``user``).
        tls: serve TLS only, with these files' server certificate; with ``verify``, also
            require a client certificate signed by their CA.
        verify: require client certificates (needs ``tls``).
        monitor: also serve the HTTP monitoring endpoints (``/connz``) on a free port, for
            :meth:`connections`.
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
        users: Sequence[NatsUser] = (),
        tls: TlsFiles | None = None,
        verify: bool = False,
        monitor: bool = False,
        binary: str | None = None,
    ) -> None:
        super().__init__(binary, "nats-server", port)
        self.monitor_port = free_port() if monitor else None
        self.max_payload = max_payload
        self.jetstream = jetstream
        self.user = user
        self.password = password
        self.token = token
        self.users = tuple(users)
        self.tls = tls
        self.verify = verify

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
        if self.monitor_port is not None:
            lines.append(f"http: {json.dumps(f'{_LOOPBACK}:{self.monitor_port}')}")
        if self.jetstream:
            lines.append(f"jetstream {{ store_dir: {json.dumps(str(self.dir / 'jetstream'))} }}")
        if self.tls is not None:
            tls: dict[str, object] = {
                "cert_file": self.tls.server_cert,
                "key_file": self.tls.server_key,
            }
            if self.verify:
                tls |= {"ca_file": self.tls.ca, "verify": True}
            lines.append(f"tls: {json.dumps(tls)}")
        if self.users:
            users = ", ".join(user._config() for user in self.users)
            lines.append(f"authorization {{ users: [{users}] }}")
        elif self.user is not None:
            lines.append(
                f"authorization {{ user: {json.dumps(self.user)}, "
                f"password: {json.dumps(self.password or '')} }}"
            )
        elif self.token is not None:
            lines.append(f"authorization {{ token: {json.dumps(self.token)} }}")
        return "\n".join(lines) + "\n"

    def connections(self) -> int:
        """Clients connected now (needs ``monitor=True``)."""
        if self.monitor_port is None:
            raise RuntimeError("NatsServer(monitor=True) is needed to count connections")
        url = f"http://{_LOOPBACK}:{self.monitor_port}/connz"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return int(json.load(answer)["num_connections"])

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
