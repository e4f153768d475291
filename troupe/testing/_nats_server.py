"""The ``nats-server`` test server (JetStream on by default), built on :class:`_ServerProcess`."""

from __future__ import annotations

import json
import socket
import urllib.request

from troupe.testing._server_process import _LOOPBACK, _ServerProcess, free_port

__all__ = ["NatsServer"]


class NatsServer(_ServerProcess):
    """A ``nats-server`` on 127.0.0.1 (JetStream on by default, its store in the temp dir).

    Args:
        port: fixed client port (default: a free one).
        max_payload: the server's ``max_payload`` in bytes (default: the server's 1 MiB).
        jetstream: enable JetStream.
        user: with ``password``, require this user.
        password: the user's password.
        token: require this token instead.
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
        if self.user is not None:
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
