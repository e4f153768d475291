"""The kubernetes store against the fake API server, through the real client (kr8s).

What only this backend has, in three files: here the per-pod resource and its owner reference,
the processes and leases of one pod that write it, write conflicts, and the pod's identity and
credentials; ``test_kubernetes_visibility.py``: visibility gated by EndpointSlice readiness and
the pod as the lease; ``test_kubernetes_watch.py``: the list/watch protocol's failure modes and
the actors on top. The KeyValueStore contract itself is checked by ``test_store_conformance.py``.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from pathlib import Path

import pytest

from troupe.config import DiscoveryConfig, KubernetesConfig, NatsConfig, PodInfo
from troupe.discovery import KubernetesStore, open_store
from troupe.errors import ConfigError, DiscoveryError, DiscoveryUnavailable, KeyExists, LeaseLost
from troupe.testing import make_tls_files
from troupe.testing.fake_kubernetes import DWM_PLURAL, FakeKubernetes

from ._kubernetes_helpers import PREFIX, Pods, conflict_before_patches, record

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
