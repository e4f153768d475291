"""Router failures: a killed worker, migration of a broken stream (resuming where it broke),
overloaded instances and retries, and what a policy sees. The cluster is in ``_cluster.py``."""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from typing import Any

import pytest

from troupe.actors.routing import (
    Retries,
    RoutedInstance,
)
from troupe.errors import (
    ConfigError,
    Overloaded,
    StreamBroken,
    StreamNotResumable,
)
from troupe.testing._wait import eventually

from ._cluster import (
    COMP,
    EP,
    NAME,
    NS,
    Cluster,
    Worker,
    call,
)

# --- failures ------------------------------------------------------------------------------------


def test_killed_worker_gives_a_typed_error_and_is_set_aside(cluster: Cluster) -> None:
    a, b = cluster.tcp_worker(), cluster.tcp_worker()
    router = cluster.router(expect=2, set_aside_for=30.0)
    stream = router.generate_sync({"kind": "hang"})
    victim_id = next(stream)
    victim, survivor = (a, b) if victim_id == a.id else (b, a)
    victim.kill()
    with pytest.raises(StreamBroken):
        next(stream)
    eventually(lambda: victim.id in router.snapshot.set_aside)
    assert router.instance_ids() == sorted([a.id, b.id])  # still registered, only set aside
    assert [call(router)[0] for _ in range(4)] == [survivor.id] * 4


def test_migration_completes_a_broken_stream_on_another_instance(cluster: Cluster) -> None:
    a, b = cluster.tcp_worker(), cluster.tcp_worker()
    router = cluster.router(expect=2, migration_limit=2)
    stream = router.generate_sync({"kind": "resume"})
    first = next(stream)
    victim, survivor = (a, b) if first == a.id else (b, a)
    victim.kill()
    assert list(stream) == [["rest", survivor.id, 1]]  # msgpack turns tuples into lists
    assert survivor.seen == [("resume", 1)]
    assert survivor.received == [1]  # told what its caller already had
    assert victim.seen == [("resume", 0)]
    eventually(lambda: victim.id in router.snapshot.set_aside)


def _victim(cluster: Cluster, served_by: str) -> tuple[Worker, Worker]:
    a, b = cluster.workers[-2:]
    return (a, b) if served_by == a.id else (b, a)


def _who_has(cluster: Cluster, count: int) -> Worker:
    """The worker that has received ``count`` requests (waited for)."""
    eventually(lambda: any(len(w.seen) == count for w in cluster.workers), what="the request")
    return next(w for w in cluster.workers if len(w.seen) == count)


def test_a_migrated_stream_continues_where_it_broke_never_repeating(cluster: Cluster) -> None:
    cluster.tcp_worker()
    cluster.tcp_worker()
    router = cluster.router(expect=2, migration_limit=1)
    stream = router.generate_sync({"kind": "stream", "n": 8, "hang_at": 2})
    got = [next(stream), next(stream), next(stream)]
    victim = _who_has(cluster, 1)
    survivor = next(w for w in cluster.workers if w is not victim)
    victim.kill()
    got += list(stream)
    assert got == list(range(8))  # every chunk once, in order
    assert survivor.seen == [("stream", 1)]
    assert survivor.received == [3]


def test_a_handler_that_cannot_resume_is_not_migrated_past_its_first_chunk(
    cluster: Cluster,
) -> None:
    cluster.tcp_worker(can_resume=False)
    cluster.tcp_worker(can_resume=False)
    router = cluster.router(expect=2, migration_limit=2)
    stream = router.generate_sync({"kind": "stream", "n": 8, "hang_at": 1})
    assert [next(stream), next(stream)] == [0, 1]
    victim = _who_has(cluster, 1)
    survivor = next(w for w in cluster.workers if w is not victim)
    victim.kill()
    with pytest.raises(StreamNotResumable) as info:
        next(stream)
    assert info.value.received == 2
    assert "resumable" in str(info.value)
    assert "resume hook" in str(info.value)
    assert survivor.seen == []  # not re-sent: it would have repeated chunks 0 and 1


def test_a_request_that_breaks_before_its_first_chunk_moves_without_resuming(
    cluster: Cluster,
) -> None:
    cluster.tcp_worker(can_resume=False)
    cluster.tcp_worker(can_resume=False)
    router = cluster.router(expect=2, migration_limit=1)
    stream = router.generate_sync({"kind": "stream", "n": 3, "hang_at": None})
    box: list[list[Any]] = []
    reader = threading.Thread(target=lambda: box.append(list(stream)))
    reader.start()
    victim = _who_has(cluster, 1)
    survivor = next(w for w in cluster.workers if w is not victim)
    victim.kill()
    reader.join(10)
    assert box == [[0, 1, 2]]
    assert survivor.seen == [("stream", 1)]
    assert survivor.received == [0]


def test_a_resume_hook_rewrites_the_request_for_the_next_instance(cluster: Cluster) -> None:
    cluster.tcp_worker(can_resume=False)
    cluster.tcp_worker(can_resume=False)
    calls: list[tuple[Any, list[Any]]] = []

    def resume(request: Any, received: list[Any]) -> Any:
        calls.append((request, received))
        return {**request, "skip": len(received)}

    router = cluster.router(expect=2, migration_limit=1, resume=resume)
    request = {"kind": "stream", "n": 6, "hang_at": 1}
    stream = router.generate_sync(request)
    got = [next(stream), next(stream)]
    victim = _who_has(cluster, 1)
    survivor = next(w for w in cluster.workers if w is not victim)
    victim.kill()
    got += list(stream)
    assert got == list(range(6))
    assert calls == [(request, [0, 1])]
    assert survivor.received == [0]  # the rewritten request starts afresh


def test_an_overloaded_instance_is_skipped_for_the_next(cluster: Cluster) -> None:
    busy = cluster.tcp_worker(max_inflight=1)
    free = cluster.tcp_worker(max_inflight=1)
    router = cluster.router(expect=2)
    hold = router.generate_sync({"kind": "hang"}, instance_id=busy.id)
    assert next(hold) == busy.id
    # Round robin sends every other request to the busy one: each is refused there (Overloaded
    # before any chunk) and served by the other instead of failing.
    assert [call(router)[0] for _ in range(6)] == [free.id] * 6
    held = router.generate_sync({"kind": "hang"}, instance_id=free.id)
    assert next(held) == free.id
    with pytest.raises(Overloaded):
        call(router)  # both full: the typed error, not a hang
    with pytest.raises(Overloaded):
        call(router, instance_id=busy.id)  # direct requests are not moved
    hold.close()
    held.close()


class Told:
    """A RouteObserver that counts what it is told."""

    def __init__(self) -> None:
        self.counts = {"retried": 0, "migrated": 0}

    def retried(self, endpoint: str) -> None:
        assert endpoint == EP
        self.counts["retried"] += 1

    def migrated(self, endpoint: str) -> None:
        assert endpoint == EP
        self.counts["migrated"] += 1


def refusals(worker: Worker) -> float:
    labels = {"namespace": NS, "component": COMP, "endpoint": NAME, "kind": "overloaded"}
    return worker.rt.metrics.registry.get_sample_value("troupe_errors_total", labels) or 0


def test_overloaded_tries_go_round_again_after_a_pause_up_to_the_limit(cluster: Cluster) -> None:
    busy = cluster.tcp_worker(max_inflight=1)
    told = Told()
    retries = Retries(overload_tries=3, overload_pause=0.001)
    router = cluster.router(expect=1, retries=retries, observer=told)
    once = cluster.router(expect=1)  # the default: each instance once
    hold = once.generate_sync({"kind": "hang"})
    assert next(hold) == busy.id
    with pytest.raises(Overloaded):
        call(once)
    assert refusals(busy) == 1
    with pytest.raises(Overloaded):
        call(router)  # the only instance refused: asked again after a pause, 3 times in all
    assert refusals(busy) == 4
    assert told.counts == {"retried": 2, "migrated": 0}
    hold.close()


def test_overload_retry_settings_are_validated() -> None:
    for bad in ({"overload_tries": 0}, {"overload_pause": -1}, {"replacement_wait": -1}):
        with pytest.raises(ConfigError):
            Retries(**bad)  # type: ignore[arg-type]
    rng = random.Random(1)
    assert 0.005 <= Retries(overload_pause=0.01).pause(1, rng) < 0.015
    assert 0.02 <= Retries(overload_pause=0.01).pause(3, rng) < 0.06


def test_a_migration_waits_for_a_replacement_when_every_instance_was_tried(
    cluster: Cluster,
) -> None:
    only = cluster.tcp_worker()
    told = Told()
    router = cluster.router(
        expect=1, migration_limit=1, retries=Retries(replacement_wait=10), observer=told
    )
    stream = router.generate_sync({"kind": "resume"})
    assert next(stream) == only.id
    only.kill()
    eventually(lambda: only.id in router.snapshot.set_aside, what="the failure seen")
    replacement = cluster.tcp_worker()
    assert list(stream) == [["rest", replacement.id, 1]]
    assert told.counts == {"retried": 0, "migrated": 1}


class Recording:
    """A Policy that takes the first candidate and records what it was shown."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[str], dict[str, int], Any, Any]] = []

    def choose(
        self,
        candidates: tuple[RoutedInstance, ...],
        load: Mapping[str, int],
        request: Any,
        headers: Mapping[str, str] | None,
    ) -> RoutedInstance:
        self.seen.append(([i.instance_id for i in candidates], dict(load), request, headers))
        return candidates[0]


def test_a_policy_sees_the_request_its_headers_and_every_callers_load(cluster: Cluster) -> None:
    a, b = cluster.tcp_worker(), cluster.tcp_worker()
    policy = Recording()
    router = cluster.router(expect=2, policy=policy)
    assert router.policy == "Recording"
    held = router.generate_sync({"kind": "hang"}, instance_id=b.id)  # direct: no policy step
    assert next(held) == b.id
    assert router.load == {b.id: 1}
    request = {"kind": "who", "prompt": [1, 2, 3]}
    first = min(a.id, b.id)
    assert list(router.generate_sync(request, headers={"session": "s1"})) == [first]
    assert policy.seen == [(sorted([a.id, b.id]), {b.id: 1}, request, {"session": "s1"})]
    held.close()


def test_migration_gives_up_when_no_other_instance_is_left(cluster: Cluster) -> None:
    only = cluster.tcp_worker()
    router = cluster.router(expect=1, migration_limit=2)
    stream = router.generate_sync({"kind": "resume"})
    assert next(stream) == only.id
    only.kill()
    with pytest.raises(StreamBroken):
        next(stream)
