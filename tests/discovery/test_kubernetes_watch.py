"""The kubernetes store: the list/watch protocol, and the actors on top of it.

The protocol's failure modes: a dropped stream resumes from its resourceVersion; 410 Gone relists
and reports only the difference; a silent half-open stream is abandoned; a lost API server ends
the watch with DiscoveryUnavailable. Through the actors, the same Joined/Left as every backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from troupe import Config, Runtime
from troupe.actors import Backoff
from troupe.actors._lease import LeaseActor, Register, Status
from troupe.actors._watcher import Joined, Left, Subscribe, WatcherActor
from troupe.config import KubernetesConfig, PodInfo
from troupe.discovery import KubernetesStore, Put, Snapshot
from troupe.errors import DiscoveryUnavailable
from troupe.testing._wait import eventually, eventually_async
from troupe.testing.fake_kubernetes import DWM_PLURAL, ES_PLURAL, FakeKubernetes

from ._kubernetes_helpers import PREFIX, Pods, Readers, conflict_before_patches

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
