"""The KV-aware policy: overlap beats load until load outweighs it, busy workers are skipped,
approximate mode predicts caches from its own decisions, and the router tells it what ended."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from troupe.actors.routing import RoutedInstance
from troupe.actors.routing._kv import KvPolicy, KvRouterSettings, request_tokens
from troupe.actors.routing._kv_sync import ActiveAdded, ActiveFreed, ReplicaSync
from troupe.errors import AllWorkersBusy, ConfigError
from troupe.messages import InstanceRecord


def _hasher(tokens: Sequence[int], block_size: int) -> list[int]:
    """Chained stand-in for troupe's hashes: a block's hash is its prefix."""
    blocks = len(tokens) // block_size
    return [hash(tuple(tokens[: (i + 1) * block_size])) for i in range(blocks)]


def _instances(n: int, capacity: int | None = None) -> tuple[RoutedInstance, ...]:
    out = []
    for i in range(n):
        iid = f"{i:016x}"
        meta = {"kv_total_blocks": capacity} if capacity is not None else {}
        record = InstanceRecord.create(
            "ns", "c", "e", instance_id=iid, transport={"tcp": "tcp://h:1"}, metadata=meta
        )
        out.append(RoutedInstance(iid, "tcp://h:1", record))
    return tuple(out)


def _policy(**kw: object) -> KvPolicy:
    settings = KvRouterSettings(block_size=4, **kw)  # type: ignore[arg-type]
    return KvPolicy(settings, hasher=_hasher, rng=random.Random(3))


def _request(prefix: int, blocks: int) -> dict[str, list[int]]:
    return {"token_ids": [prefix * 1000 + t for t in range(blocks * 4)]}


def test_the_worker_holding_the_prefix_wins() -> None:
    policy = _policy()
    workers = _instances(4)
    request = _request(7, 8)
    policy.index.store(workers[2].instance_id, _hasher(request["token_ids"], 4)[:6])
    for _ in range(5):
        assert policy.choose(workers, {}, request, None) is workers[2]
    assert policy.last_overlap == {workers[2].instance_id: 6}
    assert policy.predicted_hit_rate == pytest.approx(6 / 8)


def test_load_outweighs_a_small_overlap() -> None:
    policy = _policy()
    workers = _instances(2)
    request = _request(1, 8)
    policy.index.store(workers[0].instance_id, _hasher(request["token_ids"], 4)[:2])
    # Worker 0 is busy with 20 blocks of other requests: 2 cached blocks do not pay for that.
    for i in range(5):
        other = _request(100 + i, 4)
        policy.choose((workers[0],), {}, other, None)
        policy.started(workers[0].instance_id, other)
    assert policy.active_blocks == {workers[0].instance_id: 20}
    assert policy.choose(workers, {}, request, None) is workers[1]


def test_finished_requests_free_their_blocks() -> None:
    policy = _policy()
    (worker,) = _instances(1)
    request = _request(1, 3)
    policy.choose((worker,), {}, request, None)
    token = policy.started(worker.instance_id, request)
    assert policy.active_blocks == {worker.instance_id: 3}
    policy.finished(token)
    policy.finished(token)  # twice: ignored
    assert policy.active_blocks == {}


def test_busy_workers_are_skipped_and_all_busy_fails_fast() -> None:
    policy = _policy(busy_threshold=0.5)
    workers = _instances(2, capacity=10)
    request = _request(1, 6)
    policy.index.store(workers[0].instance_id, _hasher(request["token_ids"], 4))
    policy.choose((workers[0],), {}, request, None)
    policy.started(workers[0].instance_id, request)  # 6 active blocks > 0.5 x 10
    assert policy.choose(workers, {}, request, None) is workers[1]
    policy.started(workers[1].instance_id, request)
    with pytest.raises(AllWorkersBusy, match=r"all 2 workers of ns\.c\.e"):
        policy.choose(workers, {}, request, None)


def test_ties_go_to_the_smaller_tree() -> None:
    policy = _policy()
    workers = _instances(2)
    policy.index.store(workers[0].instance_id, [1, 2, 3])
    for _ in range(5):
        assert policy.choose(workers, {}, _request(9, 2), None) is workers[1]


def test_temperature_spreads_choices_by_cost() -> None:
    policy = _policy(temperature=1.0)
    workers = _instances(3)
    request = _request(5, 16)
    policy.index.store(workers[1].instance_id, _hasher(request["token_ids"], 4))
    picks = [policy.choose(workers, {}, request, None).instance_id for _ in range(300)]
    counts = {w.instance_id: picks.count(w.instance_id) for w in workers}
    assert counts[workers[1].instance_id] > max(counts[workers[0].instance_id], 50)
    assert counts[workers[0].instance_id] > 0  # not greedy


def test_approximate_mode_remembers_where_it_sent_a_prefix_until_the_ttl() -> None:
    now = [0.0]
    policy = KvPolicy(
        KvRouterSettings(block_size=4, approximate=True, approx_ttl=10.0),
        hasher=_hasher,
        rng=random.Random(1),
        clock=lambda: now[0],
    )
    workers = _instances(4)
    request = _request(3, 8)
    first = policy.choose(workers, {}, request, None)
    policy.finished(policy.started(first.instance_id, request))
    now[0] = 5.0
    for _ in range(3):
        assert policy.choose(workers, {}, request, None) is first
        policy.finished(policy.started(first.instance_id, request))  # refreshed at t=5
    now[0] = 12.0  # the first routing expired, the refresh has not
    policy.choose(workers, {}, _request(4, 1), None)
    assert policy.index.find_matches(_hasher(request["token_ids"], 4)) == {first.instance_id: 8}
    now[0] = 15.5
    policy.choose(workers, {}, _request(4, 1), None)
    assert policy.index.find_matches(_hasher(request["token_ids"], 4)) == {}


def test_requests_without_tokens_balance_on_load() -> None:
    policy = _policy()
    workers = _instances(2)
    assert request_tokens({"prompt": "hi"}) is None
    first = policy.choose(workers, {}, {"prompt": "hi"}, None)
    policy.started(first.instance_id, _request(1, 5))
    assert policy.choose(workers, {}, {"prompt": "hi"}, None) is not first


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError):
        KvRouterSettings(block_size=0)
    with pytest.raises(ConfigError):
        KvRouterSettings(temperature=-1)
    with pytest.raises(ConfigError):
        KvRouterSettings(busy_threshold=0)


def test_concurrent_requests_are_tracked_apart() -> None:
    policy = _policy()
    (worker,) = _instances(1)
    tokens = [policy.started(worker.instance_id, _request(i, 2)) for i in range(3)]
    assert len(set(tokens)) == 3
    assert policy.active_blocks == {worker.instance_id: 6}
    for token in tokens:
        policy.finished(token)
    assert policy.active_blocks == {}


def test_replica_sync_forgets_a_silent_replicas_requests() -> None:
    now = [0.0]
    sync = ReplicaSync(stale_after=10.0, clock=lambda: now[0])
    sync.apply("a", ActiveAdded(1, "w", 4))
    sync.apply("b", ActiveAdded(1, "w", 2))  # same token, another replica: a separate request
    assert sync.remote_blocks == {"w": 6}
    sync.apply("b", ActiveFreed(1))
    sync.apply("b", ActiveFreed(1))  # twice: ignored
    assert sync.remote_blocks == {"w": 4}
    now[0] = 11.0
    sync.apply("c", ActiveAdded(7, "v", 3))  # a's request is stale by now
    assert sync.remote_blocks == {"v": 3}


def test_requests_sharing_a_prefix_load_a_worker_once() -> None:
    """The case that sent shared prefixes away from their cache: 8 requests in flight on one
    long prefix load its worker with the prefix once, so the 9th still goes there."""
    policy = _policy()
    workers = _instances(2)
    prefix = _request(1, 60)["token_ids"]

    def on(prefix_tokens: list[int], tail: int) -> dict[str, list[int]]:
        return {"token_ids": [*prefix_tokens, *range(10_000 + tail * 8, 10_000 + tail * 8 + 8)]}

    holder, other = workers
    policy.index.store(holder.instance_id, _hasher(prefix, 4))
    for n in range(8):
        policy.started(holder.instance_id, on(prefix, n))
    other_prefix = _request(2, 60)["token_ids"]
    for n in range(7):
        policy.started(other.instance_id, on(other_prefix, 100 + n))
    assert policy.active_blocks == {holder.instance_id: 60 + 8 * 2, other.instance_id: 60 + 7 * 2}
    assert policy.choose(workers, {}, on(prefix, 50), None) is holder


def test_a_worker_busy_prefilling_costs_its_queued_prefill() -> None:
    """Queued prefill counts until the first chunk: of two workers with the same decode load,
    the one still prefilling a long uncached prompt is avoided by the next uncached one."""
    policy = _policy()
    first, second = _instances(2)
    token = policy.started(first.instance_id, _request(1, 100))  # prefilling
    policy.first_chunk(policy.started(second.instance_id, _request(2, 100)))  # decoding
    assert policy.active_blocks == {first.instance_id: 100, second.instance_id: 100}
    for n in range(6):
        assert policy.choose((first, second), {}, _request(10 + n, 50), None) is second
    policy.first_chunk(token)
    policy.first_chunk(token)  # twice: ignored
    picks = {
        policy.choose((first, second), {}, _request(20 + n, 50), None).instance_id
        for n in range(12)
    }
    assert picks == {first.instance_id, second.instance_id}  # even again: ties go either way
    policy.finished(token)
    assert policy.active_blocks.get(first.instance_id, 0) == 0
