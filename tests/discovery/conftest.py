"""Fixtures of the discovery tests: each backend as the store conformance kit's subject, a unique
key root, watch readers, and pods of the kubernetes backend on the fake API server."""

from __future__ import annotations

import itertools
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from troupe.config import EtcdConfig, FileKvConfig, KubernetesConfig, NatsConfig, PodInfo
from troupe.discovery import (
    EtcdStore,
    FileStore,
    KeyValueStore,
    KubernetesStore,
    MemoryKvServer,
    MemoryStore,
    NatsStore,
    Watch,
)
from troupe.testing.conformance import StoreUnderTest, UnreachableStore
from troupe.testing.fake_kubernetes import FakeKubernetes

from ._helpers import WatchReader
from ._kubernetes_helpers import Pods

BACKENDS = ("memory", "file", "etcd", "nats", "kubernetes")
"""Every store the conformance suite runs against."""

KV_BACKENDS = ("memory", "file", "etcd", "nats")
"""The stores with one key space and TTL leases. Not ``kubernetes``: its keys live in one
resource per pod (so ``create`` is atomic only within a pod) and its only lease is the pod's
life (nothing expires by TTL). Tests of those two properties are parametrized over these."""

BACKEND_LACKS: dict[str, frozenset[str]] = {
    "kubernetes": frozenset({"atomic_create", "ttl_leases", "shared_revisions"}),
}
"""What each backend lacks of the store conformance kit's optional properties (the
``StoreUnderTest`` flags): a watch of the kubernetes store numbers its own events, too."""


@pytest.fixture
def root() -> str:
    """A key prefix of this test's own (servers are shared by the session)."""
    return f"/t{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when this returns: nothing listens


def _unreachable(backend: str, tmp_path: Path) -> UnreachableStore:
    """A store of ``backend`` whose server does not answer (or whose directory cannot be)."""
    if backend == "etcd":
        url = f"http://127.0.0.1:{_closed_port()}"
        return UnreachableStore(EtcdStore(EtcdConfig(endpoints=(url,), connect_timeout=1.0)), url)
    if backend == "nats":
        url = f"nats://127.0.0.1:{_closed_port()}"
        return UnreachableStore(NatsStore(NatsConfig(server=url, connect_timeout=1.0)), url)
    if backend == "kubernetes":
        url = f"http://127.0.0.1:{_closed_port()}"
        kubeconfig = tmp_path / "unreachable-kubeconfig"
        kubeconfig.write_text(
            '{"apiVersion": "v1", "kind": "Config", "current-context": "c",'
            f' "clusters": [{{"name": "c", "cluster": {{"server": "{url}"}}}}],'
            ' "users": [{"name": "u", "user": {"token": "t"}}],'
            ' "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}'
        )
        config = KubernetesConfig(kubeconfig=str(kubeconfig), connect_timeout=1.0)
        return UnreachableStore(KubernetesStore(config), url)
    if backend == "file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        path = str(blocker / "kv")
        return UnreachableStore(FileStore(FileKvConfig(path=path)), path)
    server = MemoryKvServer(name="memory://unreachable")
    server.set_available(False)
    return UnreachableStore(MemoryStore(server), "memory://unreachable")


@pytest.fixture
def store_under_test(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> StoreUnderTest:
    """The store conformance kit's subject for ``backend``: stores that see each other."""
    make: Callable[[], KeyValueStore]
    if backend == "memory":
        server = MemoryKvServer()
        make = lambda: MemoryStore(server)  # noqa: E731
    elif backend == "file":
        config = FileKvConfig(path=str(tmp_path / "kv"))
        make = lambda: FileStore(config, poll_interval=0.02, reap_interval=0.1)  # noqa: E731
    elif backend == "kubernetes":
        # Each store is a pod of its own, ready in an EndpointSlice, in a namespace of this test.
        fake = request.getfixturevalue("fake_kubernetes")
        namespace = f"t{uuid.uuid4().hex[:10]}"
        kube_config = KubernetesConfig(kubeconfig=str(fake.kubeconfig))
        pods = itertools.count()

        def make() -> KubernetesStore:
            pod = f"pod-{next(pods)}"
            fake.set_pod_ready(namespace, pod)
            return KubernetesStore(kube_config, PodInfo(pod, namespace, f"uid-{pod}"))

    elif backend == "etcd":
        etcd = request.getfixturevalue("etcd_server")
        etcd_config = EtcdConfig(endpoints=(etcd.url,))
        make = lambda: EtcdStore(etcd_config)  # noqa: E731
    else:
        nats = request.getfixturevalue("nats_server")
        nats_config = NatsConfig(server=nats.url)
        make = lambda: NatsStore(nats_config, bucket="conformance")  # noqa: E731
    lacks = BACKEND_LACKS.get(backend, frozenset())
    return StoreUnderTest(
        store=make,
        backend=backend,
        ttl_leases="ttl_leases" not in lacks,
        atomic_create="atomic_create" not in lacks,
        shared_revisions="shared_revisions" not in lacks,
        unreachable=lambda: _unreachable(backend, tmp_path),
    )


@pytest.fixture
async def readers() -> AsyncIterator[Callable[[Watch], WatchReader]]:
    """Start :class:`WatchReader` objects that are closed at teardown."""
    started: list[WatchReader] = []

    def start(watch: Watch) -> WatchReader:
        reader = WatchReader(watch)
        started.append(reader)
        return reader

    yield start
    for reader in started:
        await reader.close()


@pytest.fixture
def namespace() -> str:
    """A Kubernetes namespace of this test's own (the fake API server is shared)."""
    return f"k{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def pods(fake_kubernetes: FakeKubernetes, namespace: str) -> AsyncIterator[Pods]:
    made = Pods(fake_kubernetes, namespace)
    yield made
    await made.close()


@pytest.fixture
async def fresh_pods(fresh_fake_kubernetes: FakeKubernetes, namespace: str) -> AsyncIterator[Pods]:
    made = Pods(fresh_fake_kubernetes, namespace)
    yield made
    await made.close()
