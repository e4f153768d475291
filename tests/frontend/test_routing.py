"""Which worker answers: one router per (model, endpoint), capped retries past overloaded workers,
and migrations that never go back to a worker that already failed the request but wait for a
replacement to register. Router lifetimes (released once idle, shared by every caller) are in
``test_routing_routers.py``."""

from __future__ import annotations

import asyncio
import collections
import random
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from troupe import RequestContext, Runtime
from troupe.actors import Actor, ActorSystem, Joined, Subscribe
from troupe.actors.routing import Retries, RouterActor, SnapshotHolder
from troupe.demo.mocker import make_generate
from troupe.discovery import MemoryKvServer
from troupe.errors import StreamBroken
from troupe.frontend import Frontend, FrontendSettings
from troupe.messages import InstanceRecord
from troupe.testing import eventually_async

from ._http import CHAT, HELLO, answers, completion_text
from .conftest import CONFIG, Workers, running_frontend, wait_for_model

# --- one router per (model, endpoint) ------------------------------------------------------------


async def test_models_sharing_an_endpoint_are_routed_apart(
    frontend: Frontend, workers: Workers, http: httpx.AsyncClient
) -> None:
    await workers.serve("demo.mocker.generate", answers("A"), model="model-a")
    await workers.serve("demo.mocker.generate", answers("B"), model="model-b")
    await wait_for_model(frontend, "model-a")
    await wait_for_model(frontend, "model-b")
    for model in ("model-a", "model-b"):
        entry = frontend.registry.get(model)
        assert entry is not None
        assert entry.endpoints == ("demo.mocker.generate",)
        router = frontend.registry.router(entry)
        await eventually_async(lambda r=router: len(r.instance_ids()) == 1)  # type: ignore[misc]
    served = collections.Counter([await completion_text(http, "model-a") for _ in range(10)])
    served.update([await completion_text(http, "model-b") for _ in range(10)])
    assert served == {"A": 10, "B": 10}


async def test_two_routers_on_one_endpoint_have_their_own_actors(
    kv: MemoryKvServer, workers: Workers
) -> None:
    a = await workers.serve("demo.mocker.generate", answers("A"), model="model-a")
    b = await workers.serve("demo.mocker.generate", answers("B"), model="model-b")
    rt = await asyncio.to_thread(Runtime(CONFIG, handle_signals=False, memory_server=kv).start)
    try:
        only_a = rt.router(
            "demo.mocker.generate", instance_filter=lambda r: r.metadata.get("model") == "model-a"
        )
        everyone = rt.router("demo.mocker.generate")
        await only_a.wait_for_instances(timeout=5)
        await eventually_async(lambda: len(everyone.instance_ids()) == 2)
        assert only_a.instance_ids() == [a.instance_id]
        assert sorted(everyone.instance_ids()) == sorted([a.instance_id, b.instance_id])
        names = [ref.name for ref in rt.system.actors()]
        assert len(names) == len(set(names)), names
        assert sum(n.startswith("RouterActor-demo.mocker.generate") for n in names) == 2
        assert sum(n.startswith("WatcherActor-demo.mocker.generate") for n in names) == 2
        chunks = [c async for c in only_a.generate({"prompt": "x"})]
        assert chunks == [{"text": "A", "prompt_tokens": 1}]
    finally:
        await asyncio.to_thread(rt.close)


class _FakeWatcher(Actor[Subscribe]):
    def __init__(self, subscribed: threading.Event) -> None:
        super().__init__()
        self.subscribed = subscribed

    def receive(self, message: Subscribe) -> int:
        self.subscribed.set()
        return 0


def _record(instance_id: str, model: str) -> InstanceRecord:
    return InstanceRecord.create(
        "ns",
        "comp",
        "ep",
        instance_id=instance_id,
        transport={"tcp": "tcp://127.0.0.1:1"},
        metadata={"model": model},
        started_at=0.0,
    )


def test_a_record_that_stops_matching_the_filter_is_removed() -> None:
    system = ActorSystem("filter-test")
    holder = SnapshotHolder()
    subscribed = threading.Event()
    try:
        watcher = system.spawn(lambda: _FakeWatcher(subscribed))
        actor = system.spawn(
            lambda: RouterActor(
                watcher, holder, instance_filter=lambda r: r.metadata.get("model") == "a"
            )
        )
        assert subscribed.wait(5)
        one, two = "00000000000000aa", "00000000000000bb"
        actor.tell(Joined(f"/k/{two}", two, _record(two, "b")))  # never routed
        actor.tell(Joined(f"/k/{one}", one, _record(one, "a")))
        snap = holder.wait_sync(lambda s: len(s.instances) == 1, 5)
        assert snap is not None
        assert [i.instance_id for i in snap.instances] == [one]
        version = snap.version
        actor.tell(Joined(f"/k/{one}", one, _record(one, "b")))  # a Put: now another model's
        snap = holder.wait_sync(lambda s: s.version > version, 5)
        assert snap is not None
        assert snap.instances == ()
        actor.tell(Joined(f"/k/{two}", two, _record(two, "a")))  # and this one becomes ours
        snap = holder.wait_sync(lambda s: len(s.instances) == 1, 5)
        assert snap is not None
        assert [i.instance_id for i in snap.instances] == [two]
    finally:
        system.shutdown(timeout=5)


# --- overloaded workers --------------------------------------------------------------------------

SLOW = make_generate(tokens_per_second=20, time_to_first_token=0.0, output_tokens=100)
QUICK = {"mocker": {"tokens_per_second": 5000, "time_to_first_token": 0}}


async def hold_one_slot(
    http: httpx.AsyncClient, held: asyncio.Event, release: asyncio.Event
) -> None:
    body = {"model": "mock", "messages": HELLO, "stream": True}
    async with http.stream("POST", CHAT, json=body) as response:
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: ")  # admitted: it holds the slot
        held.set()
        await release.wait()


async def test_an_overloaded_worker_is_skipped_for_an_idle_one(
    frontend: Frontend, workers: Workers, http: httpx.AsyncClient
) -> None:
    first = await workers.serve("demo.mocker.generate", SLOW, model="mock", max_inflight=1)
    second = await workers.serve("demo.mocker.generate", SLOW, model="mock", max_inflight=1)
    await wait_for_model(frontend, "mock")
    router = frontend.registry.router(frontend.registry.get("mock"))  # type: ignore[arg-type]
    await eventually_async(lambda: len(router.instance_ids()) == 2)
    held, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold_one_slot(http, held, release))
    try:
        await asyncio.wait_for(held.wait(), 5)
        body = {"model": "mock", "prompt": "x", "max_tokens": 1, "ext": QUICK}
        statuses = [(await http.post("/v1/completions", json=body)).status_code for _ in range(6)]
        assert statuses == [200] * 6
    finally:
        release.set()
        await holder
    # the busy worker did refuse some of them, and each was then answered by the other one
    labels = {"namespace": "demo", "component": "mocker", "endpoint": "generate"}
    refused = [
        rt.metrics.registry.get_sample_value("troupe_errors_total", labels | {"kind": "overloaded"})
        for rt in (first, second)
    ]
    assert sum(v or 0 for v in refused) >= 1


async def test_503_only_when_every_worker_refuses(
    frontend: Frontend, workers: Workers, http: httpx.AsyncClient
) -> None:
    for _ in range(2):
        await workers.serve("demo.mocker.generate", SLOW, model="mock", max_inflight=1)
    await wait_for_model(frontend, "mock")
    router = frontend.registry.router(frontend.registry.get("mock"))  # type: ignore[arg-type]
    await eventually_async(lambda: len(router.instance_ids()) == 2)
    release = asyncio.Event()
    helds = [asyncio.Event(), asyncio.Event()]
    holders = [asyncio.create_task(hold_one_slot(http, h, release)) for h in helds]
    try:
        await asyncio.wait_for(asyncio.gather(*(h.wait() for h in helds)), 5)
        response = await http.post(CHAT, json={"model": "mock", "messages": HELLO})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "overloaded"
    finally:
        release.set()
        await asyncio.gather(*holders)


# --- migration -----------------------------------------------------------------------------------


class Breaking:
    """A worker whose stream always breaks (as if it died): counts the attempts it saw."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        yield {"text": "x", "prompt_tokens": 1}
        raise StreamBroken("the engine process died")


async def test_migration_never_returns_to_a_worker_that_failed(
    kv: MemoryKvServer, settings: FrontendSettings, workers: Workers
) -> None:
    broken = [Breaking(), Breaking()]
    for handler in broken:
        await workers.serve("broken.engine.generate", handler, model="broken")
    async with running_frontend(kv, settings, migration_limit=5) as fe:
        await wait_for_model(fe, "broken")
        router = fe.registry.router(fe.registry.get("broken"))  # type: ignore[arg-type]
        await eventually_async(lambda: len(router.instance_ids()) == 2)
        async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
            response = await http.post("/v1/completions", json={"model": "broken", "prompt": "x"})
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "worker_error"
        # each worker tried once, although the limit would allow 5 migrations
        assert [b.calls for b in broken] == [1, 1]
        labels = {"model": "broken"}
        migrations = fe.rt.metrics.registry.get_sample_value(
            "troupe_frontend_migrations_total", labels
        )
        assert migrations == 1


@pytest.mark.parametrize("mode", ["round_robin", "random", "least_loaded"])
def test_settings_accept_every_router_mode(mode: str) -> None:
    assert FrontendSettings(router_mode=mode).router_mode == mode


# --- capped retries ------------------------------------------------------------------------------


async def hold_instance(
    router: Any, instance_id: str, held: asyncio.Event, release: asyncio.Event
) -> None:
    """Take the one admission slot of ``instance_id`` (directly, not through the frontend)."""
    chunks = router.generate({"prompt": "x"}, instance_id=instance_id)
    try:
        await anext(chunks)
        held.set()
        await release.wait()
    finally:
        await chunks.aclose()


async def test_overloaded_retries_are_capped_and_counted(
    kv: MemoryKvServer, settings: FrontendSettings, workers: Workers
) -> None:
    busy = [
        await workers.serve("demo.mocker.generate", SLOW, model="mock", max_inflight=1)
        for _ in range(4)
    ]
    async with running_frontend(kv, settings, overload_tries=3) as fe:
        await wait_for_model(fe, "mock")
        router = fe.registry.router(fe.registry.get("mock"))  # type: ignore[arg-type]
        await eventually_async(lambda: len(router.instance_ids()) == 4)
        release = asyncio.Event()
        helds = [asyncio.Event() for _ in busy]
        holders = [
            asyncio.create_task(hold_instance(router, rt.instance_id, held, release))
            for rt, held in zip(busy, helds, strict=True)
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*(h.wait() for h in helds)), 5)
            async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
                response = await http.post(CHAT, json={"model": "mock", "messages": HELLO})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "overloaded"
        finally:
            release.set()
            await asyncio.gather(*holders)
        labels = {"namespace": "demo", "component": "mocker", "endpoint": "generate"}
        refused = [
            rt.metrics.registry.get_sample_value(
                "troupe_errors_total", labels | {"kind": "overloaded"}
            )
            or 0
            for rt in busy
        ]
        # three of the four workers were asked, once each; two of those were retries
        assert sorted(refused) == [0, 1, 1, 1]
        retries = fe.rt.metrics.registry.get_sample_value(
            "troupe_frontend_retries_total", {"model": "mock"}
        )
        assert retries == 2


def test_the_pause_between_tries_is_jittered_and_doubles(frontend: Frontend) -> None:
    settings = frontend.settings
    base = settings.overload_pause
    retries = frontend.registry.options.retries
    assert retries == Retries(settings.overload_tries, base, settings.instance_wait)
    rng = random.Random(7)
    first = [retries.pause(1, rng) for _ in range(50)]
    second = [retries.pause(2, rng) for _ in range(50)]
    assert all(0.5 * base <= p < 1.5 * base for p in first)
    assert all(base <= p < 3 * base for p in second)
    assert len(set(first)) > 1


# --- migration waits for a replacement -----------------------------------------------------------


class BreakOnce:
    """A worker whose stream breaks after one token (as if its engine died)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        yield {"text": "first", "prompt_tokens": 1}
        raise StreamBroken("the engine process died")


async def test_migration_waits_for_a_replacement_worker(
    kv: MemoryKvServer, settings: FrontendSettings, workers: Workers
) -> None:
    # The replacement registers only once the only worker failed the request and was set
    # aside (the router then has no instance left to try; before the fix, the generation
    # failed at that point).
    dying = BreakOnce()
    first = await workers.serve("demo.mocker.generate", dying, model="mock")
    async with running_frontend(kv, settings, migration_limit=1, instance_wait=10) as fe:
        await wait_for_model(fe, "mock")
        router = fe.registry.router(fe.registry.get("mock"))  # type: ignore[arg-type]
        await router.wait_for_instances(timeout=5)
        async with httpx.AsyncClient(base_url=fe.url, timeout=15) as http:
            body = {"model": "mock", "prompt": "a b", "max_tokens": 3, "ext": QUICK}
            request = asyncio.create_task(http.post("/v1/completions", json=body))
            failed = await router.wait_for_snapshot(
                lambda s: first.instance_id in s.set_aside, timeout=5
            )
            assert failed is not None
            assert not request.done()
            await workers.serve("demo.mocker.generate", SLOW, model="mock")
            response = await asyncio.wait_for(request, 10)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["text"].startswith("first")
        assert response.json()["usage"]["completion_tokens"] == 3
        assert dying.calls == 1
        migrations = fe.rt.metrics.registry.get_sample_value(
            "troupe_frontend_migrations_total", {"model": "mock"}
        )
        assert migrations == 1
