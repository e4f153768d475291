"""WorkerActor through Runtime.serve: handler kinds, concurrency, admission, graceful stop."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from troupe import Config, RequestContext, Runtime
from troupe.actors._worker import Health
from troupe.config import DiscoveryConfig, RequestPlaneConfig, TcpConfig, WorkerConfig
from troupe.discovery import MemoryKvServer
from troupe.errors import ConfigError, Overloaded
from troupe.messages import decode_payload, decode_record, encode_payload
from troupe.testing._wait import eventually

CONFIG = Config(
    discovery=DiscoveryConfig(kv_store="memory"),
    request_plane=RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1")),
)


@pytest.fixture
def rt() -> Iterator[Runtime]:
    with Runtime(CONFIG, handle_signals=False, memory_server=MemoryKvServer()) as runtime:
        yield runtime


def call(rt: Runtime, address: str, endpoint: str, request: Any) -> list[Any]:
    async def go() -> list[Any]:
        stream = await rt.network.client_for(address).request(
            address, endpoint, encode_payload(request)
        )
        return [decode_payload(chunk) async for chunk in stream]

    return rt.io.run(go(), timeout=10)


def registered(rt: Runtime, prefix: str) -> list[Any]:
    items, _ = rt.io.run(rt.store.list(prefix), timeout=5)
    return [decode_record(kv.value, key=kv.key) for kv in items]


async def words(request: dict[str, str], ctx: RequestContext) -> AsyncIterator[dict[str, str]]:
    for word in request["text"].split():
        yield {"word": word}


def sync_words(request: dict[str, str], ctx: RequestContext) -> Iterator[str]:
    yield from request["text"].split()


async def shout(request: str, ctx: RequestContext) -> str:
    return request.upper()


def length(request: str, ctx: RequestContext) -> int:
    return len(request)


@pytest.mark.parametrize(
    ("handler", "request_", "expected"),
    [
        (
            words,
            {"text": "hello big world"},
            [{"word": "hello"}, {"word": "big"}, {"word": "world"}],
        ),
        (sync_words, {"text": "a b"}, ["a", "b"]),
        (shout, "hi", ["HI"]),
        (length, "four", [4]),
    ],
)
def test_handler_kinds_are_served_and_registered(
    rt: Runtime, handler: Any, request_: Any, expected: list[Any]
) -> None:
    endpoint = rt.namespace("demo").component("backend").endpoint("generate")
    worker = rt.serve(endpoint, handler, metadata={"model": "m"})
    assert worker.ask(Health()) == ("serving", 0)
    [record] = registered(rt, endpoint.prefix)
    assert record.instance_id == rt.instance_id
    assert record.metadata == {"model": "m"}
    address = record.transport["tcp"]
    assert address == rt.server().address
    assert call(rt, address, endpoint.path, request_) == expected


def test_sync_handlers_run_concurrently(rt: Runtime) -> None:
    barrier = threading.Barrier(2, timeout=5)

    def meet(request: int, ctx: RequestContext) -> int:
        barrier.wait()  # both requests must be inside the handler at once
        return request

    rt.serve("demo.backend.meet", meet)
    address = rt.server().address

    async def both() -> list[list[bytes]]:
        client = rt.network.client_for(address)
        streams = [
            await client.request(address, "demo.backend.meet", encode_payload(i)) for i in (1, 2)
        ]
        return list(await asyncio.gather(*(s.collect() for s in streams)))

    results = rt.io.run(both(), timeout=10)
    assert sorted(decode_payload(r[0]) for r in results) == [1, 2]


def test_admission_limit_refuses_at_once(rt: Runtime) -> None:
    release = asyncio.Event()

    async def hold(request: Any, ctx: RequestContext) -> AsyncIterator[str]:
        yield "started"
        await release.wait()
        yield "done"

    rt.serve("demo.backend.hold", hold, max_inflight=1)
    address = rt.server().address

    async def scenario() -> tuple[list[Any], type[BaseException]]:
        client = rt.network.client_for(address)
        first = await client.request(address, "demo.backend.hold", encode_payload(None))
        assert decode_payload(await anext(first)) == "started"
        second = await client.request(address, "demo.backend.hold", encode_payload(None))
        try:
            await second.collect()
        except Overloaded as exc:
            refused: type[BaseException] = type(exc)
        release.set()
        return [decode_payload(c) async for c in first], refused

    rest, refused = rt.io.run(scenario(), timeout=10)
    assert rest == ["done"]
    assert refused is Overloaded


def test_the_process_wide_limit_covers_every_endpoint_and_is_counted() -> None:
    config = dataclasses.replace(
        CONFIG, worker=WorkerConfig(max_inflight=1, max_inflight_per_caller=0)
    )
    release = asyncio.Event()

    async def hold(request: Any, ctx: RequestContext) -> AsyncIterator[str]:
        yield "started"
        await release.wait()
        yield "done"

    with Runtime(config, handle_signals=False, memory_server=MemoryKvServer()) as rt:
        rt.serve("demo.backend.first", hold)
        rt.serve("demo.backend.second", hold)
        address = rt.server().address

        async def scenario() -> list[Any]:
            client = rt.network.client_for(address)
            first = await client.request(address, "demo.backend.first", encode_payload(None))
            assert decode_payload(await anext(first)) == "started"
            # The second endpoint runs nothing, but the process holds its one request.
            second = await client.request(address, "demo.backend.second", encode_payload(None))
            with pytest.raises(Overloaded):
                await second.collect()
            release.set()
            return [decode_payload(c) async for c in first]

        assert rt.io.run(scenario(), timeout=10) == ["done"]
        assert (
            'troupe_worker_requests_refused_total{plane="tcp",reason="max_inflight"} 1.0'
            in rt.metrics.render().decode()
        )


def test_a_worker_bounds_what_it_holds_by_default() -> None:
    assert (WorkerConfig().max_inflight, WorkerConfig().max_inflight_per_caller) == (1024, 512)


def test_stop_unregisters_first_then_drains_in_flight(rt: Runtime) -> None:
    release = asyncio.Event()
    entered = threading.Semaphore(0)

    async def long(request: int, ctx: RequestContext) -> AsyncIterator[int]:
        entered.release()
        await release.wait()
        yield request

    endpoint = rt.endpoint("dyn://demo.backend.long")
    worker = rt.serve(endpoint, long, grace=10)
    address = rt.server().address
    client = rt.network.client_for(address)

    async def start(i: int) -> Any:
        return await client.request(address, endpoint.path, encode_payload(i))

    streams = [rt.io.run(start(i), timeout=5) for i in range(10)]
    for _ in range(10):
        assert entered.acquire(timeout=5)
    stopper = threading.Thread(target=worker.stop, kwargs={"timeout": 20}, name="stopper")
    stopper.start()
    eventually(lambda: registered(rt, endpoint.prefix) == [], what="unregistered first")
    eventually(lambda: worker.is_alive() and worker._cell.alive)  # still draining

    async def refused() -> bool:
        try:
            await (await start(99)).collect()
        except Overloaded:
            return True
        return False

    assert rt.io.run(refused(), timeout=5)
    rt.io.loop.call_soon_threadsafe(release.set)

    async def finish() -> list[list[bytes]]:
        return list(await asyncio.gather(*(s.collect() for s in streams)))

    results = rt.io.run(finish(), timeout=10)
    assert sorted(decode_payload(r[0]) for r in results) == list(range(10))
    stopper.join(20)
    assert not worker.is_alive()


@pytest.mark.parametrize("path", ["a.b", "a.b.c.d", "dyn://a..c", "Bad.b.c"])
def test_malformed_endpoint_paths_are_config_errors(rt: Runtime, path: str) -> None:
    with pytest.raises(ConfigError):
        rt.endpoint(path)
