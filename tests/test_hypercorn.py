"""troupe._hypercorn: serving an ASGI app on a socket we bound, and a startup that fails."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest
from hypercorn.config import Config

from troupe._hypercorn import StartFailed, launch, serve_on_socket


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def _app(started: asyncio.Future[None], *, fail: bool) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if fail:
                        await send({"type": "lifespan.startup.failed", "message": "no model"})
                        return
                    started.set_result(None)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def test_serves_until_the_shutdown_trigger() -> None:
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sock = _listening_socket()
    port = sock.getsockname()[1]
    config = Config()
    config.graceful_timeout = 1.0
    try:
        task, shutdown = await serve_on_socket(
            _app(started, fail=False), config, sock, started=started, name="test-hypercorn"
        )
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/")
        assert (response.status_code, response.text) == (200, "ok")
        shutdown.set()
        await asyncio.wait_for(task, 5)
    finally:
        sock.close()


async def test_a_failed_startup_is_start_failed_with_its_cause() -> None:
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sock = _listening_socket()
    try:
        with pytest.raises(StartFailed) as info:
            await asyncio.wait_for(
                serve_on_socket(
                    _app(started, fail=True), Config(), sock, started=started, name="test-fail"
                ),
                5,
            )
        assert started.cancelled()
        assert "no model" in repr(info.value.cause)
    finally:
        sock.close()


async def test_a_cancelled_wait_stops_hypercorn_before_it_propagates() -> None:
    """A start-up cancelled while waiting must not leave hypercorn serving with no owner."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    never: asyncio.Future[None] = loop.create_future()  # the startup is never seen
    sock = _listening_socket()
    try:
        served = launch(_app(never, fail=False), Config(), sock, name="test-cancelled")
        waiter = asyncio.create_task(served.wait_started(started), name="test-wait")
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiter, 5)
        assert served.task.done()  # stopped and awaited before the cancellation propagated
        assert served.shutdown.is_set()
        assert started.cancelled()
        assert served.error() is None
    finally:
        sock.close()
        never.cancel()


async def test_a_task_cancelled_by_someone_else_is_start_failed_without_cause() -> None:
    """task.exception() raises CancelledError for a cancelled task: the cause is None."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    never: asyncio.Future[None] = loop.create_future()
    sock = _listening_socket()
    try:
        served = launch(_app(never, fail=False), Config(), sock, name="test-killed")
        served.task.cancel()
        with pytest.raises(StartFailed) as info:
            await asyncio.wait_for(served.wait_started(started), 5)
        assert info.value.cause is None
        assert started.cancelled()
    finally:
        sock.close()
        never.cancel()


async def test_stop_returns_the_task_error() -> None:
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sock = _listening_socket()
    config = Config()
    config.graceful_timeout = 1.0
    try:
        served = launch(_app(started, fail=False), config, sock, name="test-stop")
        await asyncio.wait_for(served.wait_started(started), 5)
        assert await asyncio.wait_for(served.stop(), 5) is None
        assert served.task.done()
    finally:
        sock.close()
