"""The kubernetes store: visibility, the resource and the pod's readiness.

A key is visible while its resource exists and its pod is ready in an EndpointSlice; the pod is
the lease (a deleted resource or a removed pod ends it, a revoke removes the keys at once). Also
the fake API server's own protocol checks (delete preconditions, JSON patches, its kubeconfig).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from troupe.discovery import Delete, Put
from troupe.discovery._kubernetes import _View
from troupe.errors import LeaseLost
from troupe.testing.fake_kubernetes import DWM_PLURAL, ES_PLURAL, FakeKubernetes, json_patch

from ._helpers import is_delete, is_put
from ._kubernetes_helpers import PREFIX, Pods, Readers, record

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
