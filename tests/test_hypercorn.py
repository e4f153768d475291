"""hypercorn start-up: serving an ASGI app on a socket we bound, a startup that fails, and what a
peer can make the server hold (connections it closed, responses it does not read)."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import httpx
import pytest
from _rawh2 import RawH2
from hypercorn.config import Config

from troupe._support._hypercorn import Served, StartFailed, launch, serve_on_socket
from troupe.testing import eventually_async


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


# --- what a peer can make the server hold ----------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _keep_alive_config() -> Config:
    config = Config()
    config.keep_alive_timeout = 100.0  # the HTTP/2 plane's: pool idle timeout + keep-alive
    config.graceful_timeout = 1.0
    return config


async def _started_server(app: Any, config: Config, name: str) -> tuple[Served, int]:
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    sock = _listening_socket()
    served = launch(app(started), config, sock, name=name)
    await asyncio.wait_for(served.wait_started(started), 5)
    return served, sock.getsockname()[1]


def _ok_app(started: asyncio.Future[None]) -> Any:
    return _app(started, fail=False)


async def test_keep_alive_connections_closed_by_the_client_are_released_at_once() -> None:
    """hypercorn 0.18 kept them in CLOSE_WAIT, fd and all, until keep_alive_timeout (100 s)."""
    served, port = await _started_server(_ok_app, _keep_alive_config(), "test-keep-alive")
    try:
        before = _open_fds()
        peers = []
        for _ in range(100):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            assert b"connection: close" not in head.lower()  # kept alive
            await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)  # the chunked body
            peers.append(writer)
        await eventually_async(lambda: served.connections == 100, what="100 connections open")
        for writer in peers:
            writer.close()
        await eventually_async(lambda: served.connections == 0, what="connections released")
        await eventually_async(lambda: _open_fds() <= before + 2, what="descriptors released")
    finally:
        await served.stop()


async def test_http2_connections_dropped_without_goaway_are_released_at_once() -> None:
    served, port = await _started_server(_ok_app, _keep_alive_config(), "test-h2-drop")
    try:
        peers = []
        for _ in range(50):
            peer = await RawH2.open(port)
            status, body = await peer.response(peer.request("/"))
            assert (status, body) == (200, b"ok")
            peers.append(peer)
        await eventually_async(lambda: served.connections == 50, what="50 connections open")
        for peer in peers:
            await peer.close()
        await eventually_async(lambda: served.connections == 0, what="connections released")
    finally:
        await served.stop()


class Writer:
    """An app that answers with ``count`` chunks of ``size`` bytes, counting writes that
    returned; ``finished`` is set when the call ends, however it ends."""

    def __init__(self, count: int, size: int = 64 * 1024) -> None:
        self.count = count
        self.size = size
        self.written = 0
        self.all_written = asyncio.Event()
        self.finished = asyncio.Event()

    def __call__(self, started: asyncio.Future[None]) -> Any:
        lifespan = _app(started, fail=False)

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await lifespan(scope, receive, send)
                return
            try:
                await send({"type": "http.response.start", "status": 200, "headers": []})
                chunk = b"x" * self.size
                for _ in range(self.count):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    self.written += 1
                self.all_written.set()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                self.finished.set()

        return app


async def test_an_http2_peer_granting_no_window_holds_back_the_writer() -> None:
    """hypercorn 0.18 let every write return at once when the peer's window was 0: a caller that
    never reads made the stream buffer everything the app wrote."""
    writer = Writer(100)
    served, port = await _started_server(writer, _keep_alive_config(), "test-h2-window")
    try:
        peer = await RawH2.open(port, window=0)
        sid = peer.request("/")
        await asyncio.wait_for(peer.headed[sid].wait(), 5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(writer.all_written.wait(), 0.5)
        assert writer.written <= 1  # 64 KiB is over hypercorn's 32 KiB high-water mark
        peer.grant(sid, 100 * writer.size)
        status, body = await peer.response(sid)
        assert (status, len(body)) == (200, 100 * writer.size)
        await peer.close()
    finally:
        await served.stop()


async def test_a_writer_waiting_for_window_is_released_when_the_peer_drops() -> None:
    """hypercorn's HTTP/2 sender stopped at the connection's end without releasing writes that
    waited for window: the app, and the connection with it, would have waited for ever."""
    writer = Writer(100)
    served, port = await _started_server(writer, _keep_alive_config(), "test-h2-stuck")
    try:
        peer = await RawH2.open(port, window=0)
        sid = peer.request("/")
        await asyncio.wait_for(peer.headed[sid].wait(), 5)
        await eventually_async(lambda: served.connections == 1, what="connection open")
        peer.abort()
        await asyncio.wait_for(writer.finished.wait(), 5)
        await eventually_async(lambda: served.connections == 0, what="connection released")
        await peer.close()
    finally:
        await served.stop()
