"""The frontend's HTTP server: the body size limit (HTTP/1.1 and HTTP/2), binding, and
start/close races."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from troupe import RequestContext, Runtime
from troupe.discovery import MemoryKvServer
from troupe.errors import (
    ConfigError,
    TroupeError,
)
from troupe.frontend import Frontend, FrontendSettings
from troupe.testing import eventually_async

from ._http import CHAT, CHAT_LABEL, HELLO, assert_openai_error, events, sample
from .conftest import CONFIG, Workers, running_frontend, wait_for_model

# --- limits --------------------------------------------------------------------------------------


async def raw_exchange(frontend: Frontend, data: bytes) -> tuple[int, dict[str, Any]]:
    """Send raw bytes (an unfinished upload) and read one HTTP/1.1 response: status and JSON."""
    reader, writer = await asyncio.open_connection("127.0.0.1", frontend.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            status = int(lines[0].split()[1])
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
            body = await reader.readexactly(int(headers["content-length"]))
        return status, json.loads(body)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def upload_head(extra: str) -> bytes:
    return (
        f"POST {CHAT} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n{extra}\r\n"
    ).encode()


async def test_a_body_over_the_limit_is_413_without_reading_it(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    async with running_frontend(kv, settings, max_body_size=1000) as fe:
        # declared too large: answered before a byte of the body is sent
        status, body = await raw_exchange(fe, upload_head("content-length: 100000000\r\n"))
        assert status == 413
        assert body["error"]["code"] == "request_too_large"
        assert "1000 bytes" in body["error"]["message"]
        # chunked, no length: answered once the first 1001 bytes have arrived, the rest unsent
        chunk = b"x" * 2000
        first = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        status, body = await raw_exchange(fe, upload_head("transfer-encoding: chunked\r\n") + first)
        assert status == 413
        assert body["error"]["type"] == "invalid_request_error"
        # within the limit the request is read and answered as usual
        async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
            response = await http.post(CHAT, json={"model": "nope", "messages": HELLO})
            assert_openai_error(response, 404, param="model")
        assert (
            sample(fe, "troupe_frontend_errors_total", model="", endpoint=CHAT_LABEL, code="413")
            == 2
        )


async def unsized(part: bytes, count: int) -> AsyncIterator[bytes]:
    """A body with no declared length."""
    for _ in range(count):
        yield part


class Gated:
    """A handler that yields one chunk, then waits for ``gate`` before finishing."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    async def __call__(self, request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        yield {"text": "one", "prompt_tokens": 1}
        await asyncio.to_thread(self.gate.wait, 10)
        yield {"text": " two", "finish_reason": "stop"}


async def test_a_body_over_the_limit_on_http2_leaves_the_other_streams_alone(
    kv: MemoryKvServer, settings: FrontendSettings, workers: Workers
) -> None:
    gated = Gated()
    await workers.serve("demo.mocker.generate", gated, model="mock")
    limits = httpx.Limits(max_connections=1)
    try:
        async with (
            running_frontend(kv, settings, max_body_size=1000) as fe,
            httpx.AsyncClient(
                base_url=fe.url, http1=False, http2=True, limits=limits, timeout=10
            ) as http,
        ):
            await wait_for_model(fe, "mock")
            body = {"model": "mock", "messages": HELLO, "stream": True}
            async with http.stream("POST", CHAT, json=body) as stream:
                assert stream.http_version == "HTTP/2"
                lines = stream.aiter_lines()
                assert (await anext(lines)).startswith("data: ")  # the stream is open
                # on the same connection: oversized, declared and not (a generator has no length)
                for content in (b"x" * 200_000, None):
                    response = await http.post(
                        CHAT,
                        content=content if content is not None else unsized(b"x" * 50_000, 4),
                        headers={"content-type": "application/json"},
                    )
                    assert response.http_version == "HTTP/2"
                    assert_openai_error(response, 413, code="request_too_large")
                    assert "connection" not in response.headers
                gated.gate.set()
                rest = [line async for line in lines]
            assert stream.status_code == 200
            assert events("\n\n".join(line for line in rest if line) + "\n\n")[-1] == "[DONE]"
            assert "two" in "".join(rest)
            assert (await http.get("/health")).status_code == 200  # the connection still works
    finally:
        gated.gate.set()


def test_the_default_body_limit_is_the_request_planes_message_size(frontend: Frontend) -> None:
    assert frontend.settings.max_body_size is None
    assert frontend.state.max_body_size == CONFIG.request_plane.tcp.max_message_size


# --- binding, and start/close races -------------------------------------------------------------


async def test_a_failed_bind_leaves_no_actor_behind(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rt = Runtime(CONFIG, handle_signals=False, memory_server=kv).start()
        try:
            before = {ref.name for ref in rt.system.actors()}
            frontend = Frontend(rt, dataclasses.replace(settings, port=port))
            with pytest.raises(ConfigError, match="in use"):
                await frontend.start()
            assert {ref.name for ref in rt.system.actors()} == before
        finally:
            await asyncio.to_thread(rt.close)


class GatedFrontend(Frontend):
    """Its lifespan startup waits for :attr:`gate`: start() stays inside hypercorn's start-up."""

    def __init__(self, rt: Runtime, settings: FrontendSettings) -> None:
        super().__init__(rt, settings)
        self.gate = asyncio.Event()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.gate.wait()
        async with super()._lifespan(app):
            yield


async def test_close_during_start_stops_hypercorn_and_start_raises(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    rt = Runtime(CONFIG, handle_signals=False, memory_server=kv).start()
    try:
        before = {ref.name for ref in rt.system.actors()}
        frontend = GatedFrontend(rt, settings)
        start = asyncio.create_task(frontend.start(), name="test-frontend-start")
        await eventually_async(lambda: frontend._task is not None, timeout=5, what="hypercorn")
        task, shutdown = frontend._task, frontend._shutdown
        assert task is not None
        assert shutdown is not None
        close = asyncio.create_task(frontend.close(), name="test-frontend-close")
        await eventually_async(shutdown.is_set, timeout=5, what="shutdown triggered")
        frontend.gate.set()  # the startup completes only now, after close() began
        with pytest.raises(TroupeError, match="closed while starting"):
            await asyncio.wait_for(start, 5)
        await asyncio.wait_for(close, 5)
        assert task.done()
        assert {ref.name for ref in rt.system.actors()} == before
    finally:
        await asyncio.to_thread(rt.close)


async def test_a_cancelled_start_leaves_no_server_behind(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    rt = Runtime(CONFIG, handle_signals=False, memory_server=kv).start()
    try:
        before = {ref.name for ref in rt.system.actors()}
        frontend = GatedFrontend(rt, settings)
        start = asyncio.create_task(frontend.start(), name="test-frontend-start")
        await eventually_async(lambda: frontend._task is not None, timeout=5, what="hypercorn")
        task = frontend._task
        assert task is not None
        port = frontend.port
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(start, 5)
        assert task.done()
        assert frontend._task is None
        assert {ref.name for ref in rt.system.actors()} == before
        with pytest.raises(ConnectionRefusedError):  # the socket is closed
            await asyncio.open_connection("127.0.0.1", port)
        await frontend.close()
    finally:
        await asyncio.to_thread(rt.close)
