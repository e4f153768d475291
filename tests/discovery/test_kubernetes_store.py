"""The kubernetes store against the fake API server, through the real client (kr8s).

What only this backend has: the per-pod resource and its owner reference, visibility gated by
EndpointSlice readiness, the pod as the lease, and the list/watch protocol's failure modes (a
dropped stream resumes from its resourceVersion; 410 Gone relists and reports only the
difference; a lost API server ends the watch with DiscoveryUnavailable). The KeyValueStore
contract itself is checked by ``test_store_conformance.py``.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
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
from troupe.discovery._kubernetes import _View
from troupe.errors import ConfigError, DiscoveryError, DiscoveryUnavailable, KeyExists, LeaseLost
from troupe.testing import make_tls_files
from troupe.testing._wait import eventually, eventually_async
from troupe.testing.fake_kubernetes import DWM_PLURAL, ES_PLURAL, FakeKubernetes, json_patch

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

    async def store(
        self,
        pod: str | None = None,
        *,
        ready: bool | None = None,
        uid: str | None = None,
        **options: Any,
    ) -> KubernetesStore:
        """A connected store in ``pod`` (uid ``uid-<pod>`` unless given; ``options``:
        KubernetesStore's keyword arguments)."""
        if pod is not None and ready is not None:
            self.fake.set_pod_ready(self.namespace, pod, ready)
        identity = PodInfo(pod, self.namespace, uid or (f"uid-{pod}" if pod else None))
        config = KubernetesConfig(kubeconfig=str(self.fake.kubeconfig))
        store = KubernetesStore(config, identity, **options)
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


async def test_put_replaces_an_entry_whole(pods: Pods) -> None:
    store = await pods.store("worker-0", ready=True)
    lease = await store.grant_lease(10.0)
    overwrites = {
        f"{PREFIX}/smaller": (b'{"a":1,"b":2}', b'{"a":1}'),
        f"{PREFIX}/nested": (b'{"x":{"y":1,"z":2}}', b'{"x":{"y":1}}'),
        f"{PREFIX}/to-text": (b'{"x":1}', b"plain text"),
        f"{PREFIX}/to-bytes": (b'{"x":1}', b"\xff\x00"),
        f"{PREFIX}/to-record": (b"text", b'{"x":1}'),
        f"{PREFIX}/null": (b'{"x":1}', b'{"x":null}'),
    }
    for key, (first, _) in overwrites.items():
        await store.put(key, first, lease=lease)
    for key, (_, second) in overwrites.items():
        await store.put(key, second)  # no lease now
    for key, (_, second) in overwrites.items():
        kv = await store.get(key)
        assert kv is not None
        assert (kv.value, kv.lease) == (second, None), key
    spec = pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0")["spec"]  # type: ignore[index]
    assert spec["instances"][f"{PREFIX}/to-text"] == {
        "revision": spec["revision"] - 3,
        "text": "plain text",
    }
    assert "lease" not in spec["instances"][f"{PREFIX}/smaller"]


async def test_a_new_process_in_the_pod_drops_stale_leased_keys(pods: Pods) -> None:
    # An earlier incarnation of the container: its lease was last renewed an hour ago.
    old = await pods.store("worker-0", ready=True, clock=lambda: time.time() - 3600)
    old_lease = await old.grant_lease(10.0)
    await old.put(f"{PREFIX}/old", b"o", lease=old_lease)
    await old.put("/config/static", b"s")  # no lease: kept
    await old.close()  # crashed: nothing revoked; the container restarts in the same pod

    new = await pods.store("worker-0")
    lease = await new.grant_lease(10.0)
    await new.put(f"{PREFIX}/new", b"n", lease=lease)
    items, _ = await new.list("")
    assert [kv.key for kv in items] == ["/config/static", f"{PREFIX}/new"]
    spec = pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0")["spec"]  # type: ignore[index]
    assert list(spec["leases"]) == [str(lease)]  # the stale record went too


async def test_several_processes_in_one_pod_keep_each_others_keys(pods: Pods) -> None:
    # troupe worker --workers 2: two runtimes, one pod, one resource.
    first = await pods.store("worker-0", ready=True)
    second = await pods.store("worker-0")
    lease_1 = await first.grant_lease(10.0)
    await first.put(f"{PREFIX}/aaaa", b"a", lease=lease_1)
    lease_2 = await second.grant_lease(10.0)
    await second.put(f"{PREFIX}/bbbb", b"b", lease=lease_2)  # its first write keeps aaaa
    assert [kv.key for kv in (await first.list(PREFIX))[0]] == [f"{PREFIX}/aaaa", f"{PREFIX}/bbbb"]
    await first.put(f"{PREFIX}/aaaa", b"a2", lease=lease_1)
    await first.keep_alive(lease_1)
    await second.keep_alive(lease_2)

    await first.revoke_lease(lease_1)  # a clean stop of one: the other's key stays
    assert [kv.key for kv in (await second.list(PREFIX))[0]] == [f"{PREFIX}/bbbb"]
    await second.keep_alive(lease_2)
    await second.revoke_lease(lease_2)  # the last one: the resource goes
    assert pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0") is None


async def test_keep_alive_loses_the_lease_when_its_keys_are_gone(pods: Pods) -> None:
    worker = await pods.store("worker-0", ready=True)
    other_pod = await pods.store("worker-1", ready=True)
    lease = await worker.grant_lease(10.0)
    await worker.put(f"{PREFIX}/a", b"a", lease=lease)
    await worker.put(f"{PREFIX}/b", b"b", lease=lease)
    await worker.keep_alive(lease)
    assert await other_pod.delete(f"{PREFIX}/a") is True  # somebody removes one of its keys
    with pytest.raises(LeaseLost):
        await worker.keep_alive(lease)

    again = await worker.grant_lease(10.0)  # the LeaseActor registers everything again
    await worker.put(f"{PREFIX}/a", b"a", lease=again)
    await worker.put(f"{PREFIX}/b", b"b", lease=again)
    await worker.keep_alive(again)
    spec = pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0")["spec"]  # type: ignore[index]
    assert list(spec["leases"]) == [str(again)]  # the lost lease's record was removed
    assert {entry["lease"] for entry in spec["instances"].values()} == {again}


async def test_a_process_that_stopped_renewing_is_dropped_and_loses_its_lease(pods: Pods) -> None:
    now = time.time()
    frozen = await pods.store("worker-0", ready=True, clock=lambda: now)
    lease = await frozen.grant_lease(1.0)
    await frozen.put(f"{PREFIX}/frozen", b"f", lease=lease)
    # A new process of the pod starts more than three TTLs after the last renewal.
    later = await pods.store("worker-0", clock=lambda: now + 3.5)
    await later.put(f"{PREFIX}/later", b"l", lease=await later.grant_lease(1.0))
    assert [kv.key for kv in (await later.list(PREFIX))[0]] == [f"{PREFIX}/later"]
    with pytest.raises(LeaseLost):
        await frozen.keep_alive(lease)


async def test_keep_alive_renews_at_most_once_per_ttl(pods: Pods) -> None:
    clock = [1_000_000.0]  # wall and monotonic clocks advance together here
    worker = await pods.store(
        "worker-0", ready=True, clock=lambda: clock[0], monotonic=lambda: clock[0] - 999_000
    )
    lease = await worker.grant_lease(6.0)
    await worker.put(f"{PREFIX}/a", b"a", lease=lease)

    def renew_time() -> str:
        obj = pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0")
        assert obj is not None
        return str(obj["spec"]["leases"][str(lease)]["renewTime"])

    written = renew_time()
    assert written == "1970-01-12T13:46:40.000000Z"
    patches = pods.fake.calls("patch")
    for _ in range(3):  # every TTL/3, as the LeaseActor calls it
        clock[0] += 1.9
        await worker.keep_alive(lease)
    assert pods.fake.calls("patch") == patches  # checked, not written
    assert renew_time() == written
    clock[0] += 1.9  # now more than one TTL since the last renewal
    await worker.keep_alive(lease)
    assert pods.fake.calls("patch") == patches + 1
    assert renew_time() == "1970-01-12T13:46:47.600000Z"


async def test_renewals_are_spaced_by_the_monotonic_clock_not_the_wall_clock(
    pods: Pods,
) -> None:
    wall, steady = [1_000_000.0], [50.0]
    worker = await pods.store(
        "worker-0", ready=True, clock=lambda: wall[0], monotonic=lambda: steady[0]
    )
    lease = await worker.grant_lease(6.0)
    await worker.put(f"{PREFIX}/a", b"a", lease=lease)
    patches = pods.fake.calls("patch")
    wall[0] -= 3600.0  # the wall clock steps back an hour (NTP): renewals go on regardless
    steady[0] += 6.5
    await worker.keep_alive(lease)
    assert pods.fake.calls("patch") == patches + 1
    obj = pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0")
    assert obj is not None
    assert obj["spec"]["leases"][str(lease)]["renewTime"] == "1970-01-12T12:46:40.000000Z"
    wall[0] += 7200.0  # and forward: no extra renewal before a TTL of monotonic time
    steady[0] += 1.0
    await worker.keep_alive(lease)
    assert pods.fake.calls("patch") == patches + 1


async def test_a_resource_left_by_an_earlier_pod_of_the_name_is_replaced(pods: Pods) -> None:
    # A StatefulSet re-creates worker-0: same name, new uid. The old pod crashed, so its
    # resource (owned by the old uid, with renewals less than three TTLs old) is still there.
    old = await pods.store("worker-0", ready=True, uid="uid-old")
    old_lease = await old.grant_lease(10.0)
    await old.put(f"{PREFIX}/old", b"o", lease=old_lease)
    await old.put("/config/static", b"s")  # even keys without a lease were the old pod's
    before = pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0")
    assert before is not None
    await old.close()

    new = await pods.store("worker-0", uid="uid-new")
    lease = await new.grant_lease(10.0)
    assert await new.put(f"{PREFIX}/new", b"n", lease=lease) == 1  # a fresh resource
    obj = pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0")
    assert obj is not None
    assert obj["metadata"]["uid"] != before["metadata"]["uid"]
    assert [ref["uid"] for ref in obj["metadata"]["ownerReferences"]] == ["uid-new"]
    assert list(obj["spec"]["instances"]) == [f"{PREFIX}/new"]
    assert list(obj["spec"]["leases"]) == [str(lease)]
    # The garbage collector, which deletes what the old uid owned, leaves it alone.
    assert pods.fake.collect_garbage(pods.namespace, {"worker-0": "uid-new"}) == []
    await new.keep_alive(lease)
    assert [kv.key for kv in (await new.list(""))[0]] == [f"{PREFIX}/new"]


async def test_the_fake_garbage_collects_by_owner_uid(pods: Pods) -> None:
    old = await pods.store("worker-0", uid="uid-old")
    await old.put("/k", b"v")
    assert pods.fake.collect_garbage(pods.namespace, {"worker-0": "uid-old"}) == []
    deleted = pods.fake.collect_garbage(pods.namespace, {"worker-0": "uid-new"})
    assert deleted == [f"{DWM_PLURAL}/worker-0"]
    assert pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0") is None


def conflict_before_patches(
    fake: FakeKubernetes, namespace: str, pod: str, times: int
) -> list[int]:
    """Make the next ``times`` patches of ``pod``'s resource meet 409 Conflict (another writer
    changes the resource just before each); return the list counting them."""
    done: list[int] = []

    def bump() -> None:
        obj = fake.get_resource(namespace, DWM_PLURAL, pod)
        assert obj is not None
        obj["metadata"].setdefault("labels", {})["bumped"] = str(len(done))
        fake.put_resource(namespace, DWM_PLURAL, obj)
        done.append(1)
        if len(done) < times:
            fake.before_next("patch", DWM_PLURAL, bump)

    fake.before_next("patch", DWM_PLURAL, bump)
    return done


async def test_conflicting_writes_back_off_and_succeed(pods: Pods) -> None:
    worker = await pods.store("worker-0", ready=True)
    worker._jitter = random.Random(0)  # its 10 delays add up to over 0.6 s
    await worker.put(f"{PREFIX}/a", b"a")
    # More conflicts in a row than the old 8 immediate tries could take.
    bumps = conflict_before_patches(pods.fake, pods.namespace, "worker-0", 10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await worker.put(f"{PREFIX}/b", b"b")
    assert len(bumps) == 10
    assert loop.time() - started >= 0.6  # it waited between tries
    assert [kv.key for kv in (await worker.list(PREFIX))[0]] == [f"{PREFIX}/a", f"{PREFIX}/b"]


async def test_a_write_that_keeps_conflicting_is_unavailable_after_its_patience(
    pods: Pods,
) -> None:
    worker = await pods.store("worker-0", ready=True, write_patience=0.2)
    await worker.put(f"{PREFIX}/a", b"a")
    bumps = conflict_before_patches(pods.fake, pods.namespace, "worker-0", 1000)
    with pytest.raises(DiscoveryUnavailable, match="kept changing"):
        await asyncio.wait_for(worker.put(f"{PREFIX}/b", b"b"), timeout=5)
    assert 1 <= len(bumps) <= 16


async def test_many_processes_of_one_pod_register_together(pods: Pods) -> None:
    # troupe worker --workers 12: every process writes the one resource at the same time.
    stores = [await pods.store("worker-0", ready=True) for _ in range(12)]
    leases = [await store.grant_lease(10.0) for store in stores]
    await asyncio.gather(
        *(
            store.put(f"{PREFIX}/{i:016x}", b"v", lease=lease)
            for i, (store, lease) in enumerate(zip(stores, leases, strict=True))
        )
    )
    assert len((await stores[0].list(PREFIX))[0]) == 12
    await asyncio.gather(
        *(store.keep_alive(lease) for store, lease in zip(stores, leases, strict=True))
    )


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
        # POD_NAMESPACE unset: the service account's namespace file names it (not "default").
        store = KubernetesStore(
            KubernetesConfig(serviceaccount=str(account)), PodInfo("worker-0", None, "u")
        )
        await store.connect()
        try:
            assert store.endpoints == (f"https://127.0.0.1:{fake.port}",)
            assert store.namespace == namespace
            revision = await store.put(f"{PREFIX}/k", b"v")
            kv = await store.get(f"{PREFIX}/k")
            assert kv is not None
            assert (kv.value, kv.revision) == (b"v", revision)
            assert fake.get_resource(namespace, DWM_PLURAL, "worker-0") is not None
        finally:
            await store.close()


async def test_in_cluster_without_a_namespace_anywhere_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("service-account-token")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "1")  # never reached: the namespace is first
    store = KubernetesStore(KubernetesConfig(serviceaccount=str(account)), PodInfo())
    with pytest.raises(ConfigError) as info:
        await store.connect()
    assert info.value.variable == "POD_NAMESPACE"
    assert "namespace" in str(info.value)
    await store.close()


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


async def test_a_renewal_gives_no_event_and_no_recompute_of_the_visible_set(
    pods: Pods, readers: Readers, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1_000_000.0]
    worker = await pods.store(
        "worker-0", ready=True, clock=lambda: clock[0], monotonic=lambda: clock[0]
    )
    lease = await worker.grant_lease(6.0)
    await worker.put(f"{PREFIX}/a", b"a", lease=lease)
    observer = await pods.store()

    computed: list[str] = []
    renewal_applied = asyncio.Event()
    renewal_changed: list[bool] = []
    visible, apply = _View.visible, _View.apply

    def counting_visible(view: _View, prefix: str) -> dict[str, Any]:
        computed.append(prefix)
        return visible(view, prefix)

    def spying_apply(view: _View, plural: str, kind: str, obj: dict[str, Any]) -> bool:
        changed = apply(view, plural, kind, obj)
        leases = (obj.get("spec") or {}).get("leases") or {}
        renewed = (leases.get(str(lease)) or {}).get("renewTime", "")
        if renewed.startswith("1970-01-12T13:46:47") and not renewal_applied.is_set():
            renewal_changed.append(changed)
            renewal_applied.set()
        return changed

    monkeypatch.setattr(_View, "visible", counting_visible)
    monkeypatch.setattr(_View, "apply", spying_apply)
    watch = readers(observer.watch(PREFIX))
    assert len((await watch.snapshot()).items) == 1
    before = len(computed)

    clock[0] += 7.0  # more than a TTL: keep_alive writes the renewal (one MODIFIED event)
    patches = pods.fake.calls("patch")
    await worker.keep_alive(lease)
    assert pods.fake.calls("patch") == patches + 1
    await asyncio.wait_for(renewal_applied.wait(), timeout=5)
    assert renewal_changed == [False]
    assert len(computed) == before  # nothing recomputed, nothing sorted
    assert watch.events[1:] == []

    await worker.put(f"{PREFIX}/b", b"b", lease=lease)  # a real change is computed and sent
    put = await watch.next()
    assert isinstance(put, Put)
    assert put.key == f"{PREFIX}/b"
    assert len(computed) == before + 1


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


async def test_revoke_that_races_another_process_of_the_pod_keeps_its_key(pods: Pods) -> None:
    worker = await pods.store("worker-0", ready=True)
    lease = await worker.grant_lease(10.0)
    await worker.put(f"{PREFIX}/mine", b"m", lease=lease)

    def another_process_writes() -> None:  # between revoke's read and its delete
        obj = pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0")
        assert obj is not None
        obj["spec"]["instances"][f"{PREFIX}/theirs"] = {"revision": 9, "text": "t"}
        pods.fake.put_resource(pods.namespace, DWM_PLURAL, obj)

    pods.fake.before_next("delete", DWM_PLURAL, another_process_writes)
    deletes = pods.fake.calls("delete")
    await worker.revoke_lease(lease)
    assert pods.fake.calls("delete") == deletes + 1  # tried, refused by its precondition (409)
    obj = pods.fake.get_resource(pods.namespace, DWM_PLURAL, "worker-0")
    assert obj is not None
    assert list(obj["spec"]["instances"]) == [f"{PREFIX}/theirs"]


def test_the_fake_refuses_a_delete_whose_preconditions_fail(
    fake_kubernetes: FakeKubernetes, namespace: str
) -> None:
    fake = fake_kubernetes
    obj = fake.put_resource(namespace, DWM_PLURAL, {"metadata": {"name": "p"}, "spec": {}})
    base = f"{fake.url}/apis/nvidia.com/v1alpha1/namespaces/{namespace}/{DWM_PLURAL}/p"
    headers = {"authorization": f"Bearer {fake.token}"}
    with httpx.Client(headers=headers) as client:
        for preconditions in ({"uid": "other"}, {"resourceVersion": "1"}):
            body = {"kind": "DeleteOptions", "preconditions": preconditions}
            answer = client.request("DELETE", base, json=body)
            assert answer.status_code == 409, answer.text
        meta = obj["metadata"]
        body = {"preconditions": {"uid": meta["uid"], "resourceVersion": meta["resourceVersion"]}}
        assert client.request("DELETE", base, json=body).status_code == 200
    assert fake.get_resource(namespace, DWM_PLURAL, "p") is None


def test_the_fake_applies_json_patches_as_rfc_6902_says() -> None:
    doc = {"a": {"b": 1, "c": [1, 2]}, "x/y": 0, "t~": True}
    ops = [
        {"op": "add", "path": "/a/b", "value": {"new": None}},  # replaces the member whole
        {"op": "add", "path": "/a/c/1", "value": 9},
        {"op": "add", "path": "/a/c/-", "value": 3},
        {"op": "remove", "path": "/x~1y"},
        {"op": "replace", "path": "/t~0", "value": False},
        {"op": "copy", "from": "/a/c", "path": "/d"},
        {"op": "move", "from": "/d/0", "path": "/e"},
        {"op": "test", "path": "/e", "value": 1},
    ]
    assert json_patch(doc, ops) == {
        "a": {"b": {"new": None}, "c": [1, 9, 2, 3]},
        "t~": False,
        "d": [9, 2, 3],
        "e": 1,
    }
    assert doc["x/y"] == 0  # the input is not changed
    for failing in (
        [{"op": "test", "path": "/t~0", "value": 1}],  # true is not 1
        [{"op": "remove", "path": "/missing"}],
        [{"op": "replace", "path": "/missing", "value": 1}],
        [{"op": "add", "path": "/no/parent", "value": 1}],
        [{"op": "add", "path": "/a/c/5", "value": 1}],
        [{"op": "frobnicate", "path": "/a"}],
    ):
        with pytest.raises(Exception, match="JSON patch") as info:
            json_patch(doc, failing)
        assert getattr(info.value, "code", None) == 422


def test_leaving_the_fake_removes_its_kubeconfig() -> None:
    with FakeKubernetes() as fake:
        assert fake.kubeconfig is not None
        directory = fake.kubeconfig.parent
        assert directory.is_dir()
    assert not directory.exists()


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


async def test_watches_ask_for_a_server_timeout_and_resume_after_it(
    fresh_pods: Pods, readers: Readers
) -> None:
    fake = fresh_pods.fake
    worker = await fresh_pods.store("worker-0", ready=True)
    observer = await fresh_pods.store(watch_timeout=1.0)
    await worker.put(f"{PREFIX}/a", b"a")
    watch = readers(observer.watch(PREFIX))
    assert len((await watch.snapshot()).items) == 1
    lists = fake.calls("list", DWM_PLURAL)
    # The server ends each stream after timeoutSeconds=1; the watch resumes each time.
    await eventually_async(lambda: len(fake.watch_resource_versions(DWM_PLURAL)) >= 3)
    assert set(fake.watch_timeouts(DWM_PLURAL)) == {"1"}
    assert set(fake.watch_timeouts(ES_PLURAL)) == {"1"}
    resumed_from = fake.watch_resource_versions(DWM_PLURAL)[1:]
    assert "0" not in resumed_from
    assert None not in resumed_from
    await worker.put(f"{PREFIX}/b", b"b")
    event = await watch.next()
    assert isinstance(event, Put)
    assert event.key == f"{PREFIX}/b"
    assert fake.calls("list", DWM_PLURAL) == lists  # resumed, never relisted
    assert not any(isinstance(e, Snapshot) for e in watch.events[1:])


async def test_the_default_watch_timeout_is_about_five_minutes(
    fresh_pods: Pods, readers: Readers
) -> None:
    observer = await fresh_pods.store()
    watch = readers(observer.watch(PREFIX))
    await watch.snapshot()
    await asyncio.to_thread(fresh_pods.fake.wait_for_watches, 2)
    for asked in fresh_pods.fake.watch_timeouts(DWM_PLURAL) + fresh_pods.fake.watch_timeouts(
        ES_PLURAL
    ):
        assert asked is not None
        assert 300 <= int(asked) <= 375


async def test_a_silent_half_open_stream_is_abandoned_and_resumed(
    fresh_pods: Pods, readers: Readers
) -> None:
    fake = fresh_pods.fake
    worker = await fresh_pods.store("worker-0", ready=True)
    observer = await fresh_pods.store(watch_timeout=1.0)
    watch = readers(observer.watch(PREFIX))
    await watch.snapshot()
    await asyncio.to_thread(fake.wait_for_watches, 2)
    watches = len(fake.watch_resource_versions(DWM_PLURAL))
    assert fake.stall_watches() == 2  # no events, no end: only the read timeout can notice
    await worker.put(f"{PREFIX}/a", b"a")
    event = await asyncio.wait_for(watch.next(), 10.0)
    assert isinstance(event, Put)
    assert event.key == f"{PREFIX}/a"
    assert len(fake.watch_resource_versions(DWM_PLURAL)) > watches


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


def test_lease_actor_retries_a_registration_the_store_could_not_write(
    rt: Runtime, fake_kubernetes: FakeKubernetes, namespace: str
) -> None:
    config = KubernetesConfig(kubeconfig=str(fake_kubernetes.kubeconfig))
    # No patience: a write that meets one conflict raises DiscoveryUnavailable at once.
    worker = KubernetesStore(config, PodInfo("worker-0", namespace, "uid-0"), write_patience=0.0)
    rt.io.run(worker.connect(), timeout=5)
    try:
        rt.io.run(worker.put("/static", b"s"), timeout=5)  # the resource exists: writes patch it
        bumps = conflict_before_patches(fake_kubernetes, namespace, "worker-0", 3)
        lease = rt.spawn(lambda: LeaseActor(worker, ttl=5.0, backoff=Backoff(min=0.02, max=0.1)))
        assert lease.ask(Register(f"{PREFIX}/aaaa", b"a"), timeout=5) is None  # retried, written
        assert len(bumps) == 3
        obj = fake_kubernetes.get_resource(namespace, DWM_PLURAL, "worker-0")
        assert obj is not None
        assert obj["spec"]["instances"][f"{PREFIX}/aaaa"]["lease"] == lease.ask(Status()).lease_id
        assert lease.ask(Status()).grants == 1  # the lease held throughout
    finally:
        rt.system.shutdown()
        rt.io.run(worker.close(), timeout=5)
