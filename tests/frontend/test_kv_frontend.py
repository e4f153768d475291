"""The frontend's KV-aware routing (``--router-mode kv``): repeated prefixes go where they are
cached, all-busy is 503 with Retry-After, approximate mode needs no NATS, and an unreachable
NATS with events on is a start-up error that names ``--no-kv-events``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from troupe import Config, Runtime
from troupe.actors.routing import KvPolicy, KvRouterSettings
from troupe.config import (
    DiscoveryConfig,
    EventPlaneConfig,
    LogConfig,
    NatsConfig,
    RequestPlaneConfig,
    TcpConfig,
)
from troupe.demo.mocker import Mocker, MockerConfig
from troupe.discovery import MemoryKvServer
from troupe.errors import ConnectionLost
from troupe.frontend import Frontend, FrontendSettings
from troupe.testing import NatsServer, eventually_async

BLOCK = 4
CAPACITY = 100
PLANE = RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1", connect_timeout=0.5))
ZMQ = Config(
    discovery=DiscoveryConfig(kv_store="memory"),
    request_plane=PLANE,
    events=EventPlaneConfig(plane="zmq"),
    log=LogConfig(level="error"),
)
NO_NATS = Config(
    discovery=DiscoveryConfig(kv_store="memory"),
    request_plane=PLANE,
    nats=NatsConfig(server="nats://127.0.0.1:1", connect_timeout=0.3),
    events=EventPlaneConfig(plane="nats"),
    log=LogConfig(level="error"),
)
FAST = MockerConfig(
    block_size=BLOCK,
    num_gpu_blocks=CAPACITY,
    tokens_per_second=2000.0,
    time_to_first_token=0.0,
    output_tokens=2,
    prefill_tokens_per_second=1e6,
)
PROMPT = " ".join(f"word{i}" for i in range(40))


class Cluster:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.kv = MemoryKvServer()
        self.runtimes: list[Runtime] = []

    def runtime(self) -> Runtime:
        rt = Runtime(self.config, handle_signals=False, memory_server=self.kv).start()
        self.runtimes.append(rt)
        return rt

    async def worker(self, engine: MockerConfig = FAST, *, events: bool = True) -> str:
        def start() -> str:
            rt = self.runtime()
            sink = rt.kv_events("demo.llm.generate", block_size=BLOCK) if events else None
            mocker = Mocker(engine, sink=sink)
            metadata = {"model": "mock", "kv_total_blocks": CAPACITY}
            rt.serve("demo.llm.generate", mocker.generate, metadata=metadata)
            return rt.instance_id

        return await asyncio.to_thread(start)

    def close(self) -> None:
        for rt in reversed(self.runtimes):
            rt.close()


@contextlib.asynccontextmanager
async def frontend(cluster: Cluster, kv: KvRouterSettings) -> AsyncIterator[Frontend]:
    rt = await asyncio.to_thread(cluster.runtime)
    settings = FrontendSettings(
        host="127.0.0.1", port=0, grace=1.0, instance_wait=0.3, router_mode="kv", kv=kv
    )
    async with Frontend(rt, settings) as fe:
        yield fe


def _policy(fe: Frontend) -> KvPolicy:
    entry = fe.registry.get("mock")
    assert entry is not None
    policy = fe.registry.router(entry).policy_object
    assert isinstance(policy, KvPolicy)
    return policy


async def _complete(http: httpx.AsyncClient, prompt: str, **extra: Any) -> httpx.Response:
    body = {"model": "mock", "prompt": prompt, "max_tokens": 2, **extra}
    return await http.post("/v1/completions", json=body)


async def _wait_workers(fe: Frontend, count: int) -> None:
    def ready() -> bool:
        entry = fe.registry.get("mock")
        return entry is not None and len(fe.registry.router(entry).instance_ids()) == count

    await eventually_async(ready, timeout=5, what=f"{count} workers seen")


@pytest.fixture
def zmq_cluster() -> Any:
    cluster = Cluster(ZMQ)
    yield cluster
    cluster.close()


async def test_a_repeated_prefix_goes_where_it_is_cached(zmq_cluster: Cluster) -> None:
    for _ in range(3):
        await zmq_cluster.worker()
    async with frontend(zmq_cluster, KvRouterSettings(block_size=BLOCK)) as fe:
        await _wait_workers(fe, 3)
        async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
            assert (await _complete(http, PROMPT)).status_code == 200
            policy = _policy(fe)
            first = policy.last_sent
            await eventually_async(
                lambda: policy.index.block_count(first or "") >= 10,
                timeout=5,
                what="the first worker's blocks indexed",
            )
            for turn in range(4):
                response = await _complete(http, PROMPT + f" turn{turn}")
                assert response.status_code == 200
                assert policy.last_sent == first
                assert policy.last_overlap.get(first or "", 0) >= 10


async def test_all_busy_is_503_with_retry_after(zmq_cluster: Cluster) -> None:
    slow = MockerConfig(
        block_size=BLOCK,
        num_gpu_blocks=CAPACITY,
        tokens_per_second=5.0,
        time_to_first_token=0.0,
        output_tokens=100,
        prefill_tokens_per_second=1e6,
    )
    await zmq_cluster.worker(slow)
    settings = KvRouterSettings(block_size=BLOCK, busy_threshold=0.05)  # 5 of 100 blocks
    async with frontend(zmq_cluster, settings) as fe:
        await _wait_workers(fe, 1)
        async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
            body = {"model": "mock", "prompt": PROMPT, "max_tokens": 100, "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as long:
                assert long.status_code == 200
                await anext(long.aiter_bytes())  # in flight, 10 blocks: over the threshold
                refused = await _complete(http, PROMPT)
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "all_workers_busy"


async def test_approximate_mode_needs_no_nats() -> None:
    cluster = Cluster(NO_NATS)
    try:
        for _ in range(2):
            await cluster.worker(events=False)
        kv = KvRouterSettings(block_size=BLOCK, approximate=True)
        async with frontend(cluster, kv) as fe:
            await _wait_workers(fe, 2)
            async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
                assert (await _complete(http, PROMPT)).status_code == 200
                first = _policy(fe).last_sent
                for turn in range(3):
                    assert (await _complete(http, PROMPT + f" t{turn}")).status_code == 200
                    assert _policy(fe).last_sent == first
            assert fe.rt._event_plane is None
    finally:
        await asyncio.to_thread(cluster.close)


async def test_events_with_nats_unreachable_fail_at_start_naming_no_kv_events() -> None:
    cluster = Cluster(NO_NATS)
    try:
        rt = await asyncio.to_thread(cluster.runtime)
        settings = FrontendSettings(host="127.0.0.1", port=0, router_mode="kv")
        with pytest.raises(ConnectionLost, match="--no-kv-events"):
            async with Frontend(rt, settings):
                pass
    finally:
        await asyncio.to_thread(cluster.close)


async def test_the_router_reports_its_decisions_as_metrics(zmq_cluster: Cluster) -> None:
    await zmq_cluster.worker()
    async with frontend(zmq_cluster, KvRouterSettings(block_size=BLOCK)) as fe:
        await _wait_workers(fe, 1)
        async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
            for _ in range(3):
                assert (await _complete(http, PROMPT)).status_code == 200
            await eventually_async(
                lambda: _policy(fe).index.block_count(_policy(fe).last_sent or "") >= 10,
                timeout=5,
                what="indexed",
            )
            assert (await _complete(http, PROMPT)).status_code == 200
            text = (await http.get("/metrics")).text
    labels = 'endpoint="demo.llm.generate",model="mock"'
    assert f"troupe_router_kv_decisions_total{{{labels}}} 4.0" in text
    assert f"troupe_router_kv_index_workers{{{labels}}} 1.0" in text
    rate = next(
        line
        for line in text.splitlines()
        if line.startswith("troupe_router_kv_predicted_hit_rate{")
    )
    assert 0.2 < float(rate.split()[-1]) < 1.0


@pytest.fixture(scope="module")
def counted_nats() -> Iterator[NatsServer]:
    with NatsServer(jetstream=False, monitor=True) as server:
        yield server


@pytest.mark.parametrize("events", [False, True], ids=["no-kv-events", "kv-events"])
async def test_no_kv_events_opens_no_nats_connection(
    counted_nats: NatsServer, events: bool
) -> None:
    """The server's own count: 0 with --no-kv-events; the events case shows the count works."""
    config = dataclasses.replace(
        NO_NATS, nats=NatsConfig(server=counted_nats.url, connect_timeout=2.0)
    )
    cluster = Cluster(config)
    try:
        await cluster.worker(events=False)
        kv = KvRouterSettings(block_size=BLOCK, approximate=not events)
        before = counted_nats.connections()
        async with frontend(cluster, kv) as fe:
            await _wait_workers(fe, 1)
            async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
                assert (await _complete(http, PROMPT)).status_code == 200
            opened = counted_nats.connections() - before
        assert opened == (1 if events else 0)
    finally:
        await asyncio.to_thread(cluster.close)
