"""Helpers of the kubernetes store tests: stores that are pods on the fake API server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from troupe.config import KubernetesConfig, PodInfo
from troupe.discovery import KubernetesStore, Watch
from troupe.messages import InstanceRecord, encode_record
from troupe.testing.fake_kubernetes import DWM_PLURAL, FakeKubernetes

from ._helpers import WatchReader

Readers = Callable[[Watch], WatchReader]
PREFIX = "/services/ns/comp/ep"


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


def record(instance_id: str = "00000000000000aa") -> tuple[str, bytes]:
    rec = InstanceRecord.create(
        "ns", "comp", "ep", instance_id=instance_id, transport={"tcp": "tcp://127.0.0.1:1"}
    )
    return rec.key, encode_record(rec)


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
