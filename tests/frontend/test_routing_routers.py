"""Router lifetimes: a model's router released once idle and recreated on return (not under a
request, nor when it returns in time), and one router for every caller (a script and the
frontend alike)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from troupe import RequestContext
from troupe.discovery import MemoryKvServer
from troupe.errors import ConfigError, NoInstances
from troupe.frontend import Frontend, FrontendSettings, ModelRegistry
from troupe.frontend._app import resume_request
from troupe.testing import eventually_async

from ._http import answers, completion_text
from .conftest import Workers, running_frontend, wait_for_model

# --- idle routers are released -------------------------------------------------------------------


def router_actors(fe: Frontend, path: str) -> list[str]:
    return [
        ref.name
        for ref in fe.rt.system.actors()
        if ref.name.startswith((f"RouterActor-{path}-", f"WatcherActor-{path}-"))
    ]


async def test_a_router_is_released_once_idle_and_recreated_on_return(
    kv: MemoryKvServer, settings: FrontendSettings, workers: Workers
) -> None:
    async with running_frontend(kv, settings, router_idle=0.2) as fe:
        worker = await workers.serve("demo.mocker.generate", answers("A"), model="mock")
        await wait_for_model(fe, "mock")
        assert len(router_actors(fe, "demo.mocker.generate")) == 2
        first = fe.registry.router(fe.registry.get("mock"))  # type: ignore[arg-type]
        await workers.stop(worker)
        await wait_for_model(fe, "mock", present=False)
        await eventually_async(lambda: not fe.registry.routings(), timeout=5, what="released")
        await eventually_async(
            lambda: not router_actors(fe, "demo.mocker.generate"), timeout=5, what="actors gone"
        )
        await workers.serve("demo.mocker.generate", answers("B"), model="mock")
        await wait_for_model(fe, "mock")
        second = fe.registry.router(fe.registry.get("mock"))  # type: ignore[arg-type]
        assert second is not first
        await second.wait_for_instances(timeout=5)
        async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
            assert await completion_text(http, "mock") == "B"


async def test_a_router_returning_in_time_is_kept(
    kv: MemoryKvServer, settings: FrontendSettings, workers: Workers
) -> None:
    async with running_frontend(kv, settings, router_idle=60) as fe:
        worker = await workers.serve("demo.mocker.generate", answers("A"), model="mock")
        await wait_for_model(fe, "mock")
        first = fe.registry.router(fe.registry.get("mock"))  # type: ignore[arg-type]
        await workers.stop(worker)
        await wait_for_model(fe, "mock", present=False)
        await workers.serve("demo.mocker.generate", answers("B"), model="mock")
        await wait_for_model(fe, "mock")
        assert fe.registry.router(fe.registry.get("mock")) is first  # type: ignore[arg-type]


async def test_a_leased_router_is_not_released_under_its_request(
    kv: MemoryKvServer,
    settings: FrontendSettings,
    workers: Workers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts: list[bool] = []
    attempted = threading.Event()
    release_router = ModelRegistry._release_router

    def spy(self: ModelRegistry, model: str, path: str) -> bool:
        released = release_router(self, model, path)
        attempts.append(released)
        attempted.set()
        return released

    monkeypatch.setattr(ModelRegistry, "_release_router", spy)
    async with running_frontend(kv, settings, router_idle=0.1) as fe:
        worker = await workers.serve("demo.mocker.generate", answers("A"), model="mock")
        await wait_for_model(fe, "mock")
        entry = fe.registry.get("mock")
        assert entry is not None
        with fe.registry.lease(entry) as routing:
            await workers.stop(worker)
            assert await asyncio.to_thread(attempted.wait, 5)
            assert attempts[0] is False  # held: kept, retried later
            assert fe.registry.routings() == [routing]
            assert len(router_actors(fe, "demo.mocker.generate")) == 2
        await eventually_async(lambda: True in attempts, timeout=5, what="released")
        assert not fe.registry.routings()
        with pytest.raises(NoInstances), fe.registry.lease(entry):
            pass  # a request holding the stale entry gets a clean 503


def test_router_idle_is_validated() -> None:
    with pytest.raises(ConfigError):
        FrontendSettings(router_idle=0)
    with pytest.raises(ConfigError):
        FrontendSettings(overload_tries=0)
    with pytest.raises(ConfigError):
        FrontendSettings(overload_pause=-1)


# --- one router for every caller -----------------------------------------------------------------


def named(name: str) -> Any:
    """A worker answering its ``name``; a request asking to ``hold`` then stays in flight
    until its caller cancels it."""

    async def handler(request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        yield {"text": name, "prompt_tokens": 1}
        if request.get("hold") or request.get("ext", {}).get("hold"):
            await ctx.wait_stopped()

    return handler


async def test_a_least_loaded_router_sees_the_frontend_and_a_script_alike(
    kv: MemoryKvServer, settings: FrontendSettings, workers: Workers
) -> None:
    ids = {
        name: (await workers.serve("demo.mocker.generate", named(name), model="mock")).instance_id
        for name in ("A", "B")
    }
    other = {"A": "B", "B": "A"}
    async with running_frontend(kv, settings, router_mode="least_loaded") as fe:
        await wait_for_model(fe, "mock")
        router = fe.registry.router(fe.registry.get("mock"))  # type: ignore[arg-type]
        await eventually_async(lambda: len(router.instance_ids()) == 2)
        assert router.policy == "least_loaded"
        async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
            # A script's request in flight on the frontend's router: the frontend's requests
            # go to the other worker, every one of them.
            held = router.generate({"hold": True})
            busy = (await anext(held))["text"]
            assert router.load == {ids[busy]: 1}
            served = [await completion_text(http, "mock") for _ in range(8)]
            assert served == [other[busy]] * 8
            await held.aclose()
            await eventually_async(lambda: not router.load, what="the script's request ended")
            # And the other way round: a generation streaming through the frontend is load the
            # script's requests see.
            body = {"model": "mock", "prompt": "x", "stream": True, "ext": {"hold": True}}
            async with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.aiter_lines()
                first = await anext(lines)
                busy = json.loads(first.removeprefix("data: "))["choices"][0]["text"]
                assert router.load == {ids[busy]: 1}
                texts = [[c["text"] async for c in router.generate({"x": i})] for i in range(8)]
                assert texts == [[other[busy]]] * 8
        await eventually_async(lambda: not router.load, what="the frontend's request ended")


def test_the_resume_field_counts_what_the_client_has() -> None:
    received = [
        {"text": "a", "prompt_tokens": 1},
        {"text": "", "finish_reason": None},
        {"text": "bc", "tokens": 2},
        "garbage",
    ]
    request = {"prompt": "x", "max_tokens": 9}
    assert resume_request(request, received) == {
        "prompt": "x",
        "max_tokens": 9,
        "resume": {"tokens": 3, "text": "abc"},
    }
    assert request == {"prompt": "x", "max_tokens": 9}  # not changed in place
