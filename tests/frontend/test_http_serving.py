"""The frontend serving over raw HTTP (httpx): health, liveness and draining, metrics,
cancellation when the client disconnects, many concurrent streams, and instances on another
wire version."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest

from troupe import RequestContext
from troupe.demo.mocker import VOCABULARY
from troupe.discovery import MemoryKvServer
from troupe.frontend import Frontend, FrontendSettings
from troupe.messages import decode_record, encode_record
from troupe.testing import eventually_async

from ._http import CHAT, CHAT_LABEL, FAST, HELLO, assert_openai_error, events, sample
from .conftest import Workers, running_frontend, wait_for_model

# --- health, liveness, draining, metrics ---------------------------------------------------------


@pytest.mark.usefixtures("mock")
async def test_health_live_and_draining(frontend: Frontend, http: httpx.AsyncClient) -> None:
    health = await http.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "healthy", "models": ["mock"]}
    assert (await http.get("/live")).json() == {"status": "live"}
    assert await frontend.drain(0)
    assert (await http.get("/health")).status_code == 503
    assert (await http.get("/live")).status_code == 200
    response = await http.post(CHAT, json={"model": "mock", "messages": HELLO})
    assert_openai_error(response, 503, code="shutting_down")


@pytest.mark.usefixtures("mock")
async def test_metrics(frontend: Frontend, http: httpx.AsyncClient) -> None:
    await http.post(CHAT, json={"model": "mock", "messages": HELLO, "stream": True})
    await http.post("/v1/completions", json={"model": "mock", "prompt": "a b"})
    await http.post(CHAT, json={"model": "nope", "messages": HELLO})
    text = (await http.get("/metrics")).text
    assert "troupe_frontend_requests_total" in text
    assert "troupe_frontend_time_to_first_token_seconds_bucket" in text
    m = "troupe_frontend_requests_total"
    assert (
        sample(
            frontend,
            m,
            model="mock",
            endpoint="chat_completions",
            request_type="stream",
            status="success",
        )
        == 1
    )
    assert (
        sample(
            frontend,
            m,
            model="mock",
            endpoint="completions",
            request_type="unary",
            status="success",
        )
        == 1
    )
    assert (
        sample(
            frontend,
            "troupe_frontend_errors_total",
            model="",
            endpoint="chat_completions",
            code="404",
        )
        == 1
    )
    assert sample(frontend, "troupe_frontend_time_to_first_token_seconds_count", model="mock") == 2
    assert sample(frontend, "troupe_frontend_inter_token_latency_seconds_count", model="mock") == 14
    assert sample(frontend, "troupe_frontend_output_sequence_tokens_sum", model="mock") == 16
    assert sample(frontend, "troupe_frontend_input_sequence_tokens_sum", model="mock") == 4
    assert sample(frontend, "troupe_frontend_inflight_requests", model="mock") == 0


async def test_draining_counts_unknown_models_under_one_label(
    frontend: Frontend, http: httpx.AsyncClient
) -> None:
    assert await frontend.drain(0)
    response = await http.post(CHAT, json={"model": "client-chosen-name", "messages": HELLO})
    assert_openai_error(response, 503, code="shutting_down")
    labels = {"endpoint": CHAT_LABEL, "code": "503"}
    assert sample(frontend, "troupe_frontend_errors_total", model="", **labels) == 1
    assert "client-chosen-name" not in (await http.get("/metrics")).text


# --- cancellation --------------------------------------------------------------------------------


class Recorder:
    """A slow engine that records when it started, and when and whether stopped it ended."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()
        self.ended_at = 0.0
        self.saw_stop = False

    async def __call__(self, request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        try:
            for index in range(1000):
                yield {"text": f" t{index}", "prompt_tokens": 1}
                self.started.set()  # the first chunk is on its way to the frontend
                await asyncio.sleep(0.01)
        finally:
            self.saw_stop = ctx.is_stopped()
            self.ended_at = time.monotonic()
            self.ended.set()


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_stops_the_worker(
    frontend: Frontend, workers: Workers, stream: bool
) -> None:
    recorder = Recorder()

    async def handler(request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        async for chunk in recorder(request, ctx):
            yield chunk

    await workers.serve("slow.engine.generate", handler, model="slow")
    await wait_for_model(frontend, "slow")
    body = {"model": "slow", "messages": HELLO, "stream": stream}
    async with httpx.AsyncClient(base_url=frontend.url, timeout=10) as http:
        if stream:
            async with http.stream("POST", CHAT, json=body) as response:
                lines = response.aiter_lines()
                seen = 0
                while seen < 3:
                    if (await anext(lines)).startswith("data: "):
                        seen += 1
                gone = time.monotonic()
                # leaving the block closes the connection mid-stream
        else:
            task = asyncio.create_task(http.post(CHAT, json=body))
            # the worker is generating (no chunk reaches the client: it is not streamed)
            assert await asyncio.to_thread(recorder.started.wait, 5)
            task.cancel()
            gone = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert await asyncio.to_thread(recorder.ended.wait, 5)
    assert recorder.saw_stop
    assert recorder.ended_at - gone < 0.2, f"worker stopped {recorder.ended_at - gone:.3f} s late"
    await _eventually_counted(frontend, "stream" if stream else "unary")


async def _eventually_counted(frontend: Frontend, request_type: str) -> None:
    labels = {"model": "slow", "endpoint": "chat_completions", "request_type": request_type}
    await eventually_async(
        lambda: sample(frontend, "troupe_frontend_cancellation_total", **labels) == 1,
        what="cancellation counted",
    )


# --- load ----------------------------------------------------------------------------------------


async def test_hundred_concurrent_streams_over_two_workers(
    frontend: Frontend, workers: Workers, http: httpx.AsyncClient
) -> None:
    first = await workers.serve("demo.mocker.generate", FAST, model="mock")
    second = await workers.serve("demo.mocker.generate", FAST, model="mock")
    await wait_for_model(frontend, "mock")
    router = frontend.registry.router(frontend.registry.get("mock"))  # type: ignore[arg-type]
    await eventually_async(lambda: len(router.instance_ids()) == 2)

    async def one(n: int) -> str:
        body = {"model": "mock", "messages": HELLO, "stream": True, "max_tokens": 4}
        response = await http.post(CHAT, json=body)
        assert response.status_code == 200
        data = events(response.text)
        assert data[-1] == "[DONE]"
        return "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1])

    texts = await asyncio.gather(*(one(n) for n in range(100)))
    assert texts == [" ".join(VOCABULARY[:4])] * 100
    served = [
        rt.metrics.registry.get_sample_value(
            "troupe_requests_total",
            {"namespace": "demo", "component": "mocker", "endpoint": "generate"},
        )
        for rt in (first, second)
    ]
    assert served == [50, 50]  # round robin over both workers


async def test_an_instance_on_another_wire_version_gets_no_generation(
    kv: MemoryKvServer, settings: FrontendSettings, workers: Workers
) -> None:
    """The model's router never sends a generation to an instance whose record says another
    wire version (nothing is generated there; every request is served by the other)."""

    def named(name: str) -> Any:
        async def handler(request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
            yield {"text": name, "prompt_tokens": 1}

        return handler

    await workers.serve("demo.mocker.generate", named("current"), model="mock")
    old = await workers.serve("demo.mocker.generate", named("old"), model="mock")
    async with running_frontend(kv, settings) as fe:
        await wait_for_model(fe, "mock")
        router = fe.registry.router(fe.registry.get("mock"))  # type: ignore[arg-type]
        await eventually_async(lambda: len(router.instance_ids()) == 2)
        key = f"/services/demo/mocker/generate/{old.instance_id}"

        async def downgrade() -> None:
            stored = await old.store.get(key)
            assert stored is not None
            record = decode_record(stored.value, key=key)
            old_record = encode_record(msgspec.structs.replace(record, wire=0))
            await old.store.put(key, old_record, lease=stored.lease)  # still leased

        await asyncio.to_thread(old.io.run, downgrade(), 5)
        await eventually_async(lambda: old.instance_id in router.snapshot.incompatible)
        async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
            body = {"model": "mock", "prompt": "x"}
            texts = [
                (await http.post("/v1/completions", json=body)).json()["choices"][0]["text"]
                for _ in range(6)
            ]
        assert texts == ["current"] * 6
