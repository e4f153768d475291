"""The kubernetes store against the fake API server, through the real client (kr8s).

What only this backend has: the per-pod resource and its owner reference, visibility gated by
EndpointSlice readiness, the pod as the lease, and the list/watch protocol's failure modes (a
dropped stream resumes from its resourceVersion; 410 Gone relists and reports only the
difference; a lost API server ends the watch with DiscoveryUnavailable). The KeyValueStore
contract itself is checked by ``test_store_conformance.py``.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from troupe import Config, Runtime
from troupe.actors import Backoff
from troupe.actors._lease import LeaseActor, Register, Status
from troupe.actors._watcher import Joined, Left, Subscribe, WatcherActor
from troupe.config import DiscoveryConfig, KubernetesConfig, NatsConfig, PodInfo
from troupe.discovery import (
    Delete,
    InstanceRecord,
    KubernetesStore,
    Put,
    Snapshot,
    Watch,
    encode_record,
    open_store,
)
from troupe.errors import ConfigError, DiscoveryError, DiscoveryUnavailable, KeyExists, LeaseLost
from troupe.testing import make_tls_files
from troupe.testing._wait import eventually
from troupe.testing.fake_kubernetes import DWM_PLURAL, ES_PLURAL, FakeKubernetes

from ._helpers import WatchReader, is_delete, is_put

Readers = Callable[[Watch], WatchReader]
PREFIX = "/services/ns/comp/ep"


@pytest.fixture
def namespace() -> str:
    return f"k{uuid.uuid4().hex[:10]}"


class Pods:
    """Makes connected stores, one pod each, on one fake API server (closed at teardown)."""

    def __init__(self, fake: FakeKubernetes, namespace: str) -> None:
        self.fake = fake
        self.namespace = namespace
        self.opened: list[KubernetesStore] = []

    async def store(self, pod: str | None = None, *, ready: bool | None = None) -> KubernetesStore:
        if pod is not None and ready is not None:
            self.fake.set_pod_ready(self.namespace, pod, ready)
        identity = PodInfo(pod, self.namespace, f"uid-{pod}" if pod else None)
        store = KubernetesStore(KubernetesConfig(kubeconfig=str(self.fake.kubeconfig)), identity)
        await store.connect()
        self.opened.append(store)
        return store

    async def close(self) -> None:
        for store in self.opened:
            await store.close()


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


def record(instance_id: str = "00000000000000aa") -> tuple[str, bytes]:
    rec = InstanceRecord.create(
        "ns", "comp", "ep", instance_id=instance_id, transport={"tcp": "tcp://127.0.0.1:1"}
    )
    return rec.key, encode_record(rec)


# --- the resource ------------------------------------------------------------------------------


async def test_a_worker_writes_a_pod_owned_resource_holding_its_records(pods: Pods) -> None:
    store = await pods.store("worker-0", ready=True)
    key, value = record()
    lease = await store.grant_lease(10.0)
    revision = await store.put(key, value, lease=lease)
    await store.put("/plain/text", b"hello")
    await store.put("/plain/bytes", b"\xff\x00")

    obj = pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0")
    assert obj is not None
    assert obj["kind"] == "DynamoWorkerMetadata"
    assert obj["apiVersion"] == "nvidia.com/v1alpha1"
    assert obj["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "worker-0",
            "uid": "uid-worker-0",
            "controller": False,
            "blockOwnerDeletion": False,
        }
    ]
    instances = obj["spec"]["instances"]
    assert instances[key]["record"]["instance_id"] == "00000000000000aa"  # readable JSON
    assert instances[key]["lease"] == lease
    assert instances[key]["revision"] == revision
    assert instances["/plain/text"]["text"] == "hello"
    assert "data" in instances["/plain/bytes"]

    reader = await pods.store()  # a frontend: only the namespace
    kv = await reader.get(key)
    assert kv is not None
    assert (kv.value, kv.revision, kv.lease) == (value, revision, lease)  # byte-exact
    assert (await reader.get("/plain/bytes")) is not None
    assert (await reader.get("/plain/bytes")).value == b"\xff\x00"  # type: ignore[union-attr]


async def test_create_sees_keys_of_other_pods(pods: Pods) -> None:
    first = await pods.store("p1", ready=True)
    second = await pods.store("p2", ready=False)
    await first.create(f"{PREFIX}/k", b"1")
    with pytest.raises(KeyExists):
        await second.create(f"{PREFIX}/k", b"2")
    assert await second.delete(f"{PREFIX}/k") is True  # another pod's key can be deleted too
    await second.create(f"{PREFIX}/k", b"2")


async def test_a_new_process_in_the_pod_drops_the_previous_ones_leased_keys(pods: Pods) -> None:
    old = await pods.store("worker-0", ready=True)
    await old.put(f"{PREFIX}/old", b"o", lease=await old.grant_lease(10.0))
    await old.put("/config/static", b"s")  # no lease: kept
    await old.close()  # crashed: nothing revoked; the container restarts in the same pod

    new = await pods.store("worker-0")
    await new.put(f"{PREFIX}/new", b"n", lease=await new.grant_lease(10.0))
    items, _ = await new.list("")
    assert [kv.key for kv in items] == ["/config/static", f"{PREFIX}/new"]


async def test_a_worker_without_its_pod_identity_gets_a_config_error(pods: Pods) -> None:
    frontend = await pods.store()  # POD_NAMESPACE only: enough to watch and list
    assert (await frontend.list(""))[0] == []
    with pytest.raises(ConfigError) as info:
        await frontend.put(f"{PREFIX}/k", b"v")
    assert info.value.variable == "POD_NAME"


def test_open_store_selects_the_kubernetes_backend(fake_kubernetes: FakeKubernetes) -> None:
    config = DiscoveryConfig(
        backend="kubernetes",
        kubernetes=KubernetesConfig(kubeconfig=str(fake_kubernetes.kubeconfig)),
        pod=PodInfo("p", "ns", "u"),
    )
    store = open_store(config, NatsConfig())
    assert isinstance(store, KubernetesStore)
    assert store.name == "kubernetes"


async def test_in_cluster_service_account_over_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, namespace: str
) -> None:
    tls = make_tls_files(tmp_path / "tls")
    account = tmp_path / "serviceaccount"  # what the kubelet mounts into every pod
    account.mkdir()
    (account / "token").write_text("service-account-token")
    shutil.copy(tls.ca, account / "ca.crt")
    (account / "namespace").write_text(namespace)
    fake = FakeKubernetes(tls=tls, token="service-account-token")
    with fake:
        monkeypatch.delenv("KUBECONFIG", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.kube/config either
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(fake.port))
        fake.set_pod_ready(namespace, "worker-0")
        store = KubernetesStore(
            KubernetesConfig(serviceaccount=str(account)), PodInfo("worker-0", namespace, "u")
        )
        await store.connect()
        try:
            assert store.endpoints == (f"https://127.0.0.1:{fake.port}",)
            revision = await store.put(f"{PREFIX}/k", b"v")
            kv = await store.get(f"{PREFIX}/k")
            assert kv is not None
            assert (kv.value, kv.revision) == (b"v", revision)
        finally:
            await store.close()
    fake.close()


async def test_a_wrong_token_is_an_rbac_error_not_an_outage(
    fake_kubernetes: FakeKubernetes, tmp_path: Path
) -> None:
    assert fake_kubernetes.kubeconfig is not None
    text = fake_kubernetes.kubeconfig.read_text().replace(fake_kubernetes.token, "wrong")
    (tmp_path / "kubeconfig").write_text(text)
    store = KubernetesStore(KubernetesConfig(kubeconfig=str(tmp_path / "kubeconfig")))
    with pytest.raises(DiscoveryError) as info:
        await store.connect()
    assert not isinstance(info.value, DiscoveryUnavailable)
    assert "401" in str(info.value)
    assert "RBAC" in str(info.value)
    await store.close()


# --- visibility: the resource and the pod's readiness ------------------------------------------


async def test_pod_ready_joins_and_not_ready_leaves(pods: Pods, readers: Readers) -> None:
    worker = await pods.store("worker-0", ready=False)
    key, value = record()
    await worker.put(key, value)
    observer = await pods.store()
    watch = readers(observer.watch(PREFIX))
    assert (await watch.snapshot()).items == ()  # written, but the pod is not ready
    assert await observer.get(key) is None

    pods.fake.set_pod_ready(pods.namespace, "worker-0", True)
    joined = await watch.next()
    assert isinstance(joined, Put)
    assert (joined.key, joined.kv.value) == (key, value)
    assert (await observer.get(key)) is not None

    pods.fake.set_pod_ready(pods.namespace, "worker-0", False)
    left = await watch.next()
    assert isinstance(left, Delete)
    assert (left.key, left.expired) == (key, True)
    assert (await observer.list(PREFIX))[0] == []

    # Per Kubernetes, an endpoint without a "ready" condition is ready.
    pods.fake.put_resource(
        pods.namespace,
        ES_PLURAL,
        {
            "metadata": {"name": "other-slice"},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.9"], "targetRef": {"kind": "Pod", "name": "worker-0"}}
            ],
        },
    )
    assert isinstance(await watch.next(), Put)


async def test_resource_deleted_leaves_and_loses_the_lease(pods: Pods, readers: Readers) -> None:
    worker = await pods.store("worker-0", ready=True)
    observer = await pods.store()
    watch = readers(observer.watch(PREFIX))
    await watch.snapshot()
    lease = await worker.grant_lease(10.0)
    key, value = record()
    await worker.put(key, value, lease=lease)
    await watch.until(is_put(key))
    await worker.keep_alive(lease)

    assert pods.fake.delete_resource(pods.namespace, DWM_PLURAL, "worker-0")
    left = await watch.until(is_delete(key))
    assert isinstance(left, Delete)
    assert left.expired is True
    with pytest.raises(LeaseLost):
        await worker.keep_alive(lease)
    with pytest.raises(LeaseLost):
        await worker.put(key, value, lease=lease)

    again = await worker.grant_lease(10.0)  # what the LeaseActor does next
    await worker.put(key, value, lease=again)
    await watch.until(is_put(key))
    assert pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0") is not None


async def test_pod_removed_garbage_collects_its_resource(pods: Pods, readers: Readers) -> None:
    worker = await pods.store("worker-0", ready=True)
    observer = await pods.store()
    key, value = record()
    await worker.put(key, value)
    watch = readers(observer.watch(PREFIX))
    assert len((await watch.snapshot()).items) == 1
    pods.fake.remove_pod(pods.namespace, "worker-0")
    assert isinstance(await watch.until(is_delete(key)), Delete)
    assert pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0") is None


async def test_revoke_removes_the_resource_when_nothing_else_is_left(pods: Pods) -> None:
    worker = await pods.store("worker-0", ready=True)
    lease = await worker.grant_lease(10.0)
    await worker.put(f"{PREFIX}/a", b"a", lease=lease)
    await worker.put("/static", b"s")
    await worker.revoke_lease(lease)
    obj = pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0")
    assert obj is not None
    assert list(obj["spec"]["instances"]) == ["/static"]
    other = await worker.grant_lease(10.0)
    assert await worker.delete("/static")
    await worker.put(f"{PREFIX}/b", b"b", lease=other)
    await worker.revoke_lease(other)
    assert pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0") is None


# --- the watch protocol ------------------------------------------------------------------------


async def test_a_dropped_watch_resumes_and_reports_only_what_changed(
    fresh_pods: Pods, readers: Readers
) -> None:
    fake = fresh_pods.fake
    worker = await fresh_pods.store("worker-0", ready=True)
    observer = await fresh_pods.store()
    await worker.put(f"{PREFIX}/a", b"a")
    watch = readers(observer.watch(PREFIX))
    assert [kv.key for kv in (await watch.snapshot()).items] == [f"{PREFIX}/a"]
    await asyncio.to_thread(fake.wait_for_watches, 2)
    lists = fake.calls("list", DWM_PLURAL)
    seen_rv = fake.resource_version

    fake.hold_watches()
    assert fake.drop_watches() == 2
    await worker.put(f"{PREFIX}/b", b"b")  # while no stream is open
    fake.hold_watches(False)

    event = await watch.next()
    assert isinstance(event, Put)
    assert (event.key, event.kv.value) == (f"{PREFIX}/b", b"b")
    await worker.put(f"{PREFIX}/c", b"c")
    assert (await watch.next()).key == f"{PREFIX}/c"  # type: ignore[union-attr]
    assert fake.calls("list", DWM_PLURAL) == lists  # resumed, not relisted
    assert fake.watch_resource_versions(DWM_PLURAL)[-1] == str(seen_rv)
    assert not any(isinstance(e, Snapshot) for e in watch.events[1:])


@pytest.mark.parametrize("gone_as_http_status", [False, True], ids=["in-stream", "http-410"])
async def test_410_gone_relists_and_reports_only_the_difference(
    fresh_fake_kubernetes: FakeKubernetes,
    namespace: str,
    readers: Readers,
    gone_as_http_status: bool,
) -> None:
    fake = fresh_fake_kubernetes
    fake.gone_as_http_status = gone_as_http_status
    pods = Pods(fake, namespace)
    try:
        worker = await pods.store("worker-0", ready=True)
        observer = await pods.store()
        for name in ("keep", "change", "drop"):
            await worker.put(f"{PREFIX}/{name}", b"1")
        watch = readers(observer.watch(PREFIX))
        assert len((await watch.snapshot()).items) == 3
        await asyncio.to_thread(fake.wait_for_watches, 2)
        lists = fake.calls("list", DWM_PLURAL)

        fake.hold_watches()
        fake.drop_watches()
        await worker.put(f"{PREFIX}/change", b"2")
        await worker.delete(f"{PREFIX}/drop")
        await worker.put(f"{PREFIX}/new", b"1")
        fake.compact()  # the watch's resourceVersion is now too old
        fake.hold_watches(False)

        events = [await watch.next() for _ in range(3)]
        assert sorted((type(e).__name__, e.key) for e in events) == [  # type: ignore[union-attr]
            ("Delete", f"{PREFIX}/drop"),
            ("Put", f"{PREFIX}/change"),
            ("Put", f"{PREFIX}/new"),
        ]
        assert fake.calls("list", DWM_PLURAL) == lists + 1  # one relist
        await worker.put(f"{PREFIX}/after", b"1")  # and the watch goes on after it
        assert (await watch.next()).key == f"{PREFIX}/after"  # type: ignore[union-attr]
        assert all(not (isinstance(e, Put) and e.key == f"{PREFIX}/keep") for e in watch.events)
    finally:
        await pods.close()


async def test_losing_the_api_server_ends_the_watch_with_discovery_unavailable(
    fresh_pods: Pods, readers: Readers
) -> None:
    fake = fresh_pods.fake
    observer = await fresh_pods.store()
    watch = readers(observer.watch(PREFIX))
    await watch.snapshot()
    await asyncio.to_thread(fake.wait_for_watches, 2)
    await asyncio.to_thread(fake.stop)
    await asyncio.wait_for(watch.ended.wait(), 10.0)
    assert isinstance(watch.error, DiscoveryUnavailable)
    assert watch.error.backend == "kubernetes"
    with pytest.raises(DiscoveryUnavailable):
        await observer.list(PREFIX)

    await asyncio.to_thread(fake.start)  # back on the same port: a new watch works
    again = readers(observer.watch(PREFIX))
    assert (await again.snapshot()).items == ()


async def test_closing_the_store_ends_open_watches(pods: Pods) -> None:
    observer = await pods.store()
    watch = observer.watch(PREFIX)
    assert isinstance(await anext(watch), Snapshot)
    pending = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0.05)
    await observer.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 5.0)
    await watch.aclose()


# --- through the actors: the same Joined/Left as every backend ---------------------------------


@pytest.fixture
def rt() -> Iterator[Runtime]:
    with Runtime(Config(), handle_signals=False) as runtime:
        yield runtime


def test_watcher_actor_turns_readiness_and_deletion_into_joined_and_left(
    rt: Runtime, fake_kubernetes: FakeKubernetes, namespace: str
) -> None:
    from troupe.actors import Actor  # noqa: PLC0415 - only this test uses actors directly

    class Collector(Actor[Joined | Left]):
        def __init__(self, seen: list[Joined | Left]) -> None:
            super().__init__()
            self.seen = seen

        def receive(self, message: Joined | Left) -> None:
            self.seen.append(message)

    config = KubernetesConfig(kubeconfig=str(fake_kubernetes.kubeconfig))
    worker = KubernetesStore(config, PodInfo("worker-0", namespace, "uid-0"))
    frontend = KubernetesStore(config, PodInfo(None, namespace, None))
    rt.io.run(worker.connect(), timeout=5)
    rt.io.run(frontend.connect(), timeout=5)
    try:
        seen: list[Joined | Left] = []
        decode: Callable[[str, bytes], tuple[str, Any]] = lambda key, value: (  # noqa: E731
            key.rsplit("/", 1)[-1],
            value.decode(),
        )
        watcher = rt.spawn(lambda: WatcherActor(frontend, PREFIX, decode))
        watcher.ask(Subscribe(rt.spawn(lambda: Collector(seen))))
        lease = rt.spawn(lambda: LeaseActor(worker, ttl=0.6, backoff=Backoff(min=0.02, max=0.2)))
        lease.ask(Register(f"{PREFIX}/aaaa", b"a"), timeout=5)

        fake_kubernetes.set_pod_ready(namespace, "worker-0", True)
        eventually(lambda: seen == [Joined(f"{PREFIX}/aaaa", "aaaa", "a")])
        fake_kubernetes.set_pod_ready(namespace, "worker-0", False)
        eventually(lambda: seen[-1:] == [Left(f"{PREFIX}/aaaa", "aaaa", "expired")])
        fake_kubernetes.set_pod_ready(namespace, "worker-0", True)
        eventually(lambda: len(seen) == 3 and isinstance(seen[2], Joined))

        # The resource vanishes: Left, then the LeaseActor notices (keep-alive) and registers
        # again under the same key: Joined.
        fake_kubernetes.delete_resource(namespace, DWM_PLURAL, "worker-0")
        eventually(lambda: len(seen) >= 5, timeout=10)
        assert seen[3] == Left(f"{PREFIX}/aaaa", "aaaa", "expired")
        assert seen[4] == Joined(f"{PREFIX}/aaaa", "aaaa", "a")
        assert lease.ask(Status()).grants == 2

        lease.stop()  # a clean stop revokes: the resource goes, watchers see Left at once
        eventually(lambda: len(seen) == 6)
        assert seen[5] == Left(f"{PREFIX}/aaaa", "aaaa", "expired")
    finally:
        rt.system.shutdown()
        rt.io.run(worker.close(), timeout=5)
        rt.io.run(frontend.close(), timeout=5)
