"""KV-aware routing between real runtimes: mocker workers publish KV events (brokerless zmq
over memory discovery), a ``policy="kv"`` router follows them and sends each prompt where its
prefix is cached; busy workers are skipped; a worker that leaves takes its blocks with it;
approximate mode needs no event plane at all."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from troupe import Config, Runtime
from troupe.actors.routing import Router
from troupe.actors.routing._kv import KvPolicy, KvRouterSettings
from troupe.config import (
    DiscoveryConfig,
    EventPlaneConfig,
    NatsConfig,
    RequestPlaneConfig,
    TcpConfig,
)
from troupe.demo.mocker import Mocker, MockerConfig
from troupe.discovery import MemoryKvServer
from troupe.kv import block_hashes
from troupe.testing import eventually

ENDPOINT = "ns.llm.generate"
BLOCK = 4
CAPACITY = 64
PLANE = RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1", connect_timeout=0.5))
ZMQ = Config(
    discovery=DiscoveryConfig(kv_store="memory", lease_ttl=2.0),
    request_plane=PLANE,
    events=EventPlaneConfig(plane="zmq"),
)
FAST = MockerConfig(
    block_size=BLOCK,
    num_gpu_blocks=CAPACITY,
    tokens_per_second=1000.0,
    time_to_first_token=0.0,
    output_tokens=2,
    prefill_tokens_per_second=1e6,
)
SLOW = MockerConfig(  # requests that stay in flight for 40 s: load that does not go away
    block_size=BLOCK,
    num_gpu_blocks=CAPACITY,
    tokens_per_second=5.0,
    time_to_first_token=0.0,
    output_tokens=200,
    prefill_tokens_per_second=1e6,
)


class Cluster:
    def __init__(self, config: Config) -> None:
        self.kv = MemoryKvServer()
        self.config = config
        self.runtimes: list[Runtime] = []
        self.workers: dict[str, Runtime] = {}

    def runtime(self) -> Runtime:
        rt = Runtime(self.config, handle_signals=False, memory_server=self.kv).start()
        self.runtimes.append(rt)
        return rt

    def worker(self, mocker: MockerConfig = FAST, *, events: bool = True) -> str:
        rt = self.runtime()
        sink = rt.kv_events(ENDPOINT, block_size=BLOCK) if events else None
        engine = Mocker(mocker, sink=sink)
        rt.serve(ENDPOINT, engine.generate, metadata={"kv_total_blocks": CAPACITY})
        self.workers[rt.instance_id] = rt
        return rt.instance_id

    def close(self) -> None:
        for rt in reversed(self.runtimes):
            rt.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster(ZMQ)
    yield c
    c.close()


def _prompt(seed: int, blocks: int) -> list[int]:
    return [seed * 10_000 + i for i in range(blocks * BLOCK)]


def _policy(router: Router) -> KvPolicy:
    policy = router.policy_object
    assert isinstance(policy, KvPolicy)
    return policy


def _overlap(router_rt: Runtime, router: Router, tokens: list[int]) -> dict[str, int]:
    hashes = block_hashes(tokens, BLOCK)

    async def ask() -> dict[str, int]:  # the index lives on the I/O loop
        return _policy(router).index.find_matches(hashes)

    return router_rt.io.run(ask(), timeout=5)


def _last_choice(router: Router) -> str | None:
    return _policy(router).last_sent


def _wait(predicate: Callable[[], bool], what: str) -> None:
    eventually(predicate, timeout=10, what=what)


def test_a_prompt_goes_to_the_worker_that_holds_its_prefix(cluster: Cluster) -> None:
    workers = sorted(cluster.worker() for _ in range(4))
    rt = cluster.runtime()
    router = rt.router(ENDPOINT, policy="kv", kv=KvRouterSettings(block_size=BLOCK))
    _wait(lambda: router.instance_ids() == workers, "the router sees four workers")
    tokens = _prompt(1, 6)
    holder = workers[2]
    list(router.generate_sync({"token_ids": tokens}, instance_id=holder))
    _wait(lambda: _overlap(rt, router, tokens) == {holder: 6}, "the holder's blocks indexed")
    for _ in range(4):
        list(router.generate_sync({"token_ids": [*tokens, 7, 7, 7, 7]}))
        assert _last_choice(router) == holder
    assert _policy(router).predicted_hit_rate > 0.5

    # A worker that leaves takes its blocks with it at once; nothing is routed to it again.
    cluster.workers[holder].close()
    _wait(lambda: holder not in router.instance_ids(), "the holder left discovery")
    _wait(lambda: holder not in _overlap(rt, router, tokens), "its blocks left the index")
    for _ in range(4):
        list(router.generate_sync({"token_ids": tokens}))
        assert _last_choice(router) != holder


def test_a_busy_holder_is_skipped_for_the_least_loaded(cluster: Cluster) -> None:
    workers = sorted(cluster.worker(SLOW) for _ in range(4))
    rt = cluster.runtime()
    settings = KvRouterSettings(block_size=BLOCK, busy_threshold=0.25)  # 16 of 64 blocks
    router = rt.router(ENDPOINT, policy="kv", kv=settings)
    _wait(lambda: router.instance_ids() == workers, "four workers")
    tokens = _prompt(2, 8)
    holder = workers[1]
    first = router.generate_sync({"token_ids": tokens, "max_tokens": 1}, instance_id=holder)
    list(first)
    _wait(lambda: _overlap(rt, router, tokens) == {holder: 8}, "indexed")
    # Two long requests on the holder: 2 x 9 blocks in flight > 16.
    streams = [
        router.generate_sync({"token_ids": _prompt(10 + i, 9)}, instance_id=holder)
        for i in range(2)
    ]
    for stream in streams:
        next(stream)  # started: in flight until closed
    try:
        assert _policy(router).active_blocks.get(holder, 0) > 16
        list(router.generate_sync({"token_ids": tokens, "max_tokens": 1}))
        assert _last_choice(router) != holder
    finally:
        for stream in streams:
            stream.close()
    _wait(lambda: _policy(router).active_blocks.get(holder, 0) == 0, "the long ones ended")
    list(router.generate_sync({"token_ids": tokens, "max_tokens": 1}))
    # The prefix is cached twice now (the detour cached it too): either holder will do.
    assert _policy(router).last_overlap[_last_choice(router)] == 8  # type: ignore[index]


def test_approximate_mode_needs_no_event_plane() -> None:
    unreachable = Config(
        discovery=DiscoveryConfig(kv_store="memory"),
        request_plane=PLANE,
        nats=NatsConfig(server="nats://127.0.0.1:1", connect_timeout=0.2),
        events=EventPlaneConfig(plane="nats"),
    )
    cluster = Cluster(unreachable)
    try:
        workers = sorted(cluster.worker(events=False) for _ in range(3))
        rt = cluster.runtime()
        settings = KvRouterSettings(block_size=BLOCK, approximate=True)
        router = rt.router(ENDPOINT, policy="kv", kv=settings)
        _wait(lambda: router.instance_ids() == workers, "three workers")
        chosen = {}
        for conversation in range(6):
            tokens = _prompt(100 + conversation, 5)
            list(router.generate_sync({"token_ids": tokens}))
            chosen[conversation] = _last_choice(router)
        for conversation in range(6):  # every repeat goes where its prefix was sent
            tokens = _prompt(100 + conversation, 5) + list(range(8))
            list(router.generate_sync({"token_ids": tokens}))
            assert _last_choice(router) == chosen[conversation]
        assert len(set(chosen.values())) > 1  # and load still spreads new prefixes
        assert rt._event_plane is None  # nothing asked for the event plane
    finally:
        cluster.close()


def test_router_replicas_count_each_others_load(cluster: Cluster) -> None:
    workers = sorted(cluster.worker(SLOW) for _ in range(2))
    settings = KvRouterSettings(block_size=BLOCK, replica_sync=True)
    rt_a, rt_b = cluster.runtime(), cluster.runtime()
    router_a = rt_a.router(ENDPOINT, policy="kv", kv=settings)
    router_b = rt_b.router(ENDPOINT, policy="kv", kv=settings)
    for router in (router_a, router_b):
        _wait(lambda r=router: r.instance_ids() == workers, "two workers")  # type: ignore[misc]
    busy = workers[0]
    stream = router_a.generate_sync({"token_ids": _prompt(50, 10)}, instance_id=busy)
    next(stream)
    sync_b = _policy(router_b).sync
    assert sync_b is not None
    _wait(lambda: sync_b.remote_blocks.get(busy) == 10, "router b counts router a's request")
    # Router b has sent nothing, yet routes a fresh prompt away from the worker a keeps busy.
    for seed in range(3):
        list(router_b.generate_sync({"token_ids": _prompt(60 + seed, 2), "max_tokens": 1}))
        assert _last_choice(router_b) == workers[1]
    stream.close()
    _wait(lambda: busy not in sync_b.remote_blocks, "freed when router a's request ended")
