"""Fixtures of the discovery tests: stores of each backend, a unique key root, watch readers,
and pods of the kubernetes backend on the fake API server."""

from __future__ import annotations

import itertools
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
from troupe.testing.fake_kubernetes import FakeKubernetes

from ._helpers import StoreFactory, WatchReader
from ._kubernetes_helpers import Pods

BACKENDS = ("memory", "file", "etcd", "nats", "kubernetes")
"""Every store the conformance suite runs against."""

KV_BACKENDS = ("memory", "file", "etcd", "nats")
"""The stores with one key space and TTL leases. Not ``kubernetes``: its keys live in one
resource per pod (so ``create`` is atomic only within a pod) and its only lease is the pod's
life (nothing expires by TTL). Tests of those two properties are parametrized over these."""


@pytest.fixture
def root() -> str:
    """A key prefix of this test's own (servers are shared by the session)."""
    return f"/t{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def stores(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """A factory of connected stores of one backend that see each other (closed at teardown)."""
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
    opened: list[KeyValueStore] = []

    async def factory() -> KeyValueStore:
        store = make()
        await store.connect()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


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
