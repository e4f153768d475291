"""Public test helpers: real etcd/NATS servers, waiting with deadlines, and (soon) a virtual clock.

Users of troupe test their own workers with these, as troupe's own suite does. The pytest
fixtures (``nats_server``, ``etcd_server``, ``fresh_*``) live in
:mod:`troupe.testing.pytest_plugin`; the conformance kits that prove a transport or a store
behaves like troupe's own, in :mod:`troupe.testing.conformance`.
"""

# Sections: waiting and clocks first, then the real servers (etcd, NATS) for tests.
from troupe._support._clock import VirtualClock
from troupe.testing._wait import eventually, eventually_async
from troupe.testing.servers import (
    EtcdServer,
    NatsServer,
    TlsFiles,
    find_binary,
    free_port,
    issue_client_cert,
    make_tls_files,
)

__all__ = [
    "EtcdServer",
    "NatsServer",
    "TlsFiles",
    "VirtualClock",
    "eventually",
    "eventually_async",
    "find_binary",
    "free_port",
    "issue_client_cert",
    "make_tls_files",
]
