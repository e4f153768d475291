"""RouterActor and Router: policies, snapshots and membership, and the loop bridges.

Failures and migration are in ``test_router_failures.py``, the actor on its own and wire versions
in ``test_router_actor.py``. Workers are separate Runtimes sharing one MemoryKvServer with the
frontend (the cluster of ``_cluster.py``), so each has its own instance id and lease.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from troupe.actors.routing import (
    spawn_router,
)
from troupe.errors import (
    ConfigError,
    InstanceNotFound,
    NoInstances,
    TroupeError,
)
from troupe.testing._wait import eventually

from ._cluster import (
    EP,
    Cluster,
    call,
)

# --- policies ------------------------------------------------------------------------------------


def test_round_robin_visits_each_of_three_once_per_three_calls(cluster: Cluster) -> None:
    ids = {cluster.inproc_worker().id for _ in range(3)}
    router = cluster.router(expect=3, policy="round_robin")
    served = [call(router)[0] for _ in range(9)]
    for start in (0, 3, 6):
        assert set(served[start : start + 3]) == ids
    assert served[0:3] == served[3:6] == served[6:9]


def test_direct_routing_and_unknown_instance_fails_at_once(cluster: Cluster) -> None:
    a, b = cluster.inproc_worker(), cluster.inproc_worker()
    router = cluster.router(expect=2)
    assert call(router, instance_id=b.id) == [b.id]
    assert call(router, instance_id=a.id) == [a.id]
    with pytest.raises(InstanceNotFound) as info:
        call(router, instance_id="0123456789abcdef")
    assert info.value.instance_id == "0123456789abcdef"
    assert a.seen == [("who", 0)]  # nothing was sent for the unknown id


def test_least_loaded_prefers_the_idle_instance(cluster: Cluster) -> None:
    a, b = cluster.inproc_worker(), cluster.inproc_worker()
    router = cluster.router(expect=2, policy="least_loaded")
    hanging = router.generate_sync({"kind": "hang"})
    busy = next(hanging)
    idle = b.id if busy == a.id else a.id
    assert [call(router)[0] for _ in range(10)] == [idle] * 10
    hanging.close()  # cancels the request
    busy_worker = a if busy == a.id else b
    assert busy_worker.stopped.wait(5)
    assert busy_worker.stop_reason == ["cancelled"]


def test_random_policy_reaches_every_instance(cluster: Cluster) -> None:
    ids = {cluster.inproc_worker().id for _ in range(2)}
    router = cluster.router(expect=2, policy="random")
    served: set[str] = set()
    eventually(lambda: served.add(call(router)[0]) or served == ids)


def test_unknown_policy_is_a_config_error(cluster: Cluster) -> None:
    with pytest.raises(ConfigError) as info:
        spawn_router(
            cluster.rt.system, cluster.rt.store, cluster.net, cluster.rt.io, EP, policy="x"
        )
    assert "round_robin" in str(info.value)
    with pytest.raises(ConfigError):
        spawn_router(
            cluster.rt.system, cluster.rt.store, cluster.net, cluster.rt.io, EP, migration_limit=-1
        )


# --- membership ----------------------------------------------------------------------------------


def test_no_instances_fails_at_once_then_wait_for_instances_succeeds(cluster: Cluster) -> None:
    router = cluster.router(expect=0)
    with pytest.raises(NoInstances) as info:
        call(router)
    assert info.value.endpoint == EP
    with pytest.raises(NoInstances):
        router.wait_for_instances_sync(timeout=0.05)
    waiting = cluster.rt.io.submit(router.wait_for_instances(timeout=5))
    waiting_sync: list[list[str]] = []
    thread = threading.Thread(
        target=lambda: waiting_sync.append(router.wait_for_instances_sync(5)), name="waiter"
    )
    thread.start()
    worker = cluster.inproc_worker()
    assert waiting.result(5) == [worker.id]
    thread.join(5)
    assert waiting_sync == [[worker.id]]
    assert call(router) == [worker.id]


def test_wait_for_snapshot_returns_the_first_matching_snapshot(cluster: Cluster) -> None:
    router = cluster.router(expect=0)
    first = cluster.inproc_worker()
    two = cluster.rt.io.submit(router.wait_for_snapshot(lambda s: len(s.instances) == 2, timeout=5))
    assert (
        cluster.rt.io.run(router.wait_for_snapshot(lambda s: len(s.instances) == 3, timeout=0.05))
        is None
    )  # timed out: None, not an exception
    second = cluster.inproc_worker()
    snapshot = two.result(5)
    assert snapshot is not None
    assert {i.instance_id for i in snapshot.instances} == {first.id, second.id}


def test_left_removes_the_instance_at_once(cluster: Cluster) -> None:
    a, b = cluster.inproc_worker(), cluster.inproc_worker()
    router = cluster.router(expect=2)
    a.rt.close()  # the clean stop revokes its lease: Left
    eventually(lambda: router.instance_ids() == [b.id])
    assert [call(router)[0] for _ in range(4)] == [b.id] * 4
    assert a.seen == []


# --- the bridges ---------------------------------------------------------------------------------


async def test_generate_from_a_foreign_loop_streams_and_cancels(cluster: Cluster) -> None:
    worker = await asyncio.to_thread(cluster.inproc_worker)
    router = await asyncio.to_thread(cluster.router, expect=1)
    assert asyncio.get_running_loop() is not cluster.rt.io.loop
    assert [c async for c in router.generate({"kind": "who"})] == [worker.id]
    # Many more chunks than the bridge's window: flow control must not lose or reorder any.
    assert [c async for c in router.generate({"kind": "count", "n": 300})] == list(range(300))

    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in router.generate({"kind": "hang"}):
            got_first.set()

    task = asyncio.create_task(consume(), name="router-consumer")
    await asyncio.wait_for(got_first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(worker.stopped.wait, 5)
    assert worker.stop_reason == ["cancelled"]

    with pytest.raises(InstanceNotFound):
        await anext(router.generate({"kind": "who"}, instance_id="0123456789abcdef"))
    with pytest.raises(TroupeError, match="generate_sync"):
        router.generate_sync({"kind": "who"})
    assert await router.wait_for_instances(timeout=1) == [worker.id]


def test_generate_on_the_io_loop_itself(cluster: Cluster) -> None:
    worker = cluster.inproc_worker()
    router = cluster.router(expect=1)

    async def go() -> list[Any]:
        return [c async for c in router.generate({"kind": "count", "n": 3})]

    assert cluster.rt.io.run(go(), timeout=5) == [0, 1, 2]
    assert worker.seen == [("count", 0)]


def test_generate_on_the_io_loop_fails_at_the_first_iteration(cluster: Cluster) -> None:
    router = cluster.router(expect=0)

    async def go() -> tuple[type[BaseException], type[BaseException]]:
        chunks = router.generate({"kind": "count", "n": 1})  # nothing sent, nothing raised yet
        unknown = router.generate({}, instance_id="nope")
        errors = []
        for gen in (chunks, unknown):
            try:
                await anext(gen)
            except TroupeError as exc:
                errors.append(type(exc))
        return errors[0], errors[1]

    assert cluster.rt.io.run(go(), timeout=5) == (NoInstances, InstanceNotFound)


def test_generate_sync_from_threads(cluster: Cluster) -> None:
    cluster.inproc_worker()
    router = cluster.router(expect=1)
    results: dict[int, list[Any]] = {}

    def run(n: int) -> None:
        results[n] = list(router.generate_sync({"kind": "count", "n": n}))

    threads = [threading.Thread(target=run, args=(n,), name=f"caller-{n}") for n in (5, 100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {5: list(range(5)), 100: list(range(100))}
