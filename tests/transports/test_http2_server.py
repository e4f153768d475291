"""The HTTP/2 plane's server and client settings: addresses and ports, size limits, closing,
and start/close races. The shared semantics are in the conformance suite."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from troupe import RequestContext
from troupe.config import HttpConfig
from troupe.errors import (
    ConfigError,
    ConnectionLost,
    ConnectTimeout,
    MessageTooLarge,
    StreamBroken,
    TransportClosed,
)
from troupe.testing import eventually_async, free_port
from troupe.transports.http2 import (
    Http2Client,
    Http2Server,
    create_client,
    create_server,
)

from . import _http2
from ._http2 import LOOPBACK, MIB, Blocker, echo, our_tasks

# The plane's fixtures (pytest finds fixtures among a module's names).
server = _http2.server
client = _http2.client

# --- addresses and ports ---------------------------------------------------------------------


async def test_port_zero_advertises_the_real_port_and_root_path() -> None:
    server = Http2Server(HttpConfig(host="127.0.0.1", port=0, root_path="/api/v2/rpc"))
    server.add_endpoint("echo", echo)
    await server.start()
    client = Http2Client()
    try:
        parts = urlsplit(server.address)
        assert parts.scheme == "http"
        assert parts.hostname == "127.0.0.1"
        assert parts.port not in (None, 0)
        assert parts.path == "/api/v2/rpc"
        with socket.create_connection(("127.0.0.1", parts.port), timeout=2):
            pass
        stream = await client.request(server.address, "echo", b"real port")
        assert await stream.collect() == [b"real port"]
    finally:
        await client.close()
        await server.close()


async def test_explicit_port_is_used_and_released_on_close() -> None:
    port = free_port()
    server = Http2Server(HttpConfig(host="127.0.0.1", port=port))
    await server.start()
    assert server.address == f"http://127.0.0.1:{port}/v1/rpc"
    await server.close()
    again = Http2Server(HttpConfig(host="127.0.0.1", port=port))
    await again.start()  # the port was released
    await again.close()


async def test_port_in_use_fails_with_one_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = Http2Server(HttpConfig(host="127.0.0.1", port=port))
        with pytest.raises(ConfigError) as info:
            await server.start()
    assert info.value.variable == "DYN_HTTP_RPC_PORT"
    assert str(port) in str(info.value)
    assert "DYN_HTTP_RPC_PORT" in str(info.value)
    assert "already in use" in str(info.value)
    await server.close()


async def test_unreachable_worker_is_connection_lost(client: Http2Client) -> None:
    address = f"http://127.0.0.1:{free_port()}/v1/rpc"
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(client.request(address, "echo", b""), 5)


async def test_peer_that_never_speaks_http2_is_a_connect_timeout() -> None:
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    client = Http2Client(connect_timeout=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(ConnectTimeout) as info:
            await client.request(f"http://127.0.0.1:{port}/v1/rpc", "echo", b"")
        assert time.monotonic() - started < 2.0
        assert info.value.timeout == 0.3
        assert str(port) in str(info.value)
    finally:
        await client.close()
        silent.close()
        await silent.wait_closed()


def test_works_on_uvloop() -> None:
    """The runtime's I/O loop runs uvloop, whose transports are not asyncio.Transport."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[bytes]:
        server = Http2Server(LOOPBACK)
        server.add_endpoint("echo", echo)
        await server.start()
        client = Http2Client()
        try:
            stream = await client.request(server.address, "echo", b"uv")
            return await asyncio.wait_for(stream.collect(), 5)
        finally:
            await client.close()
            await server.close()

    assert uvloop.run(main()) == [b"uv"]


async def test_factories_read_the_request_plane_settings() -> None:
    from troupe.config import RequestPlaneConfig  # noqa: PLC0415
    from troupe.transports import TransportSettings  # noqa: PLC0415

    settings = TransportSettings(
        RequestPlaneConfig(plane="http", http=HttpConfig(host="127.0.0.1", port=0, root_path="/x"))
    )
    server = create_server(settings)
    server.add_endpoint("echo", echo)
    await server.start()
    client = create_client(settings)
    try:
        assert urlsplit(server.address).path == "/x"
        assert await (await client.request(server.address, "echo", b"1")).collect() == [b"1"]
    finally:
        await client.close()
        await server.close()


# --- limits, timeouts, closing ---------------------------------------------------------------


async def test_size_limits_on_both_sides() -> None:
    started = asyncio.Event()

    async def sink(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        started.set()
        yield b"ok"

    async def huge_reply(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"y" * (128 * 1024)

    server = Http2Server(LOOPBACK, max_message_size=64 * 1024)
    server.add_endpoint("sink", sink)
    server.add_endpoint("huge", huge_reply)
    server.add_endpoint("echo", echo)
    await server.start()
    small = Http2Client(max_message_size=1024)
    large = Http2Client(max_message_size=MIB)
    try:
        # The client refuses before sending anything.
        with pytest.raises(MessageTooLarge) as info:
            await small.request(server.address, "sink", b"x" * 2048)
        assert info.value.size > 1024
        assert info.value.limit == 1024
        # The server refuses a body over its own limit, without running the handler.
        stream = await large.request(server.address, "sink", b"x" * (100 * 1024))
        with pytest.raises(MessageTooLarge) as info:
            await stream.collect()
        assert info.value.limit == 64 * 1024
        assert info.value.size > 100 * 1024
        assert not started.is_set()
        # A reply frame over the server's limit becomes a MessageTooLarge error.
        with pytest.raises(MessageTooLarge):
            await (await large.request(server.address, "huge", b"")).collect()
        # Both keep working.
        assert await (await small.request(server.address, "echo", b"a")).collect() == [b"a"]
        assert await (await large.request(server.address, "echo", b"b")).collect() == [b"b"]
    finally:
        await small.close()
        await large.close()
        await server.close()


async def test_client_close_fails_open_streams_and_stops_its_tasks(server: Http2Server) -> None:
    blocker = Blocker()
    server.add_endpoint("block", blocker)
    client = Http2Client()
    stream = await client.request(server.address, "block", b"")
    assert await anext(stream) == b"first"
    await client.close()
    with pytest.raises(TransportClosed):
        await anext(stream)
    with pytest.raises(TransportClosed):
        await client.request(server.address, "echo", b"")
    # The worker sees the connection go and stops the handler.
    await asyncio.wait_for(blocker.cancelled.wait(), 5)
    assert blocker.reason == "disconnected"
    assert not [name for name in our_tasks() if name.startswith("http2-connect")]


async def test_server_close_leaves_no_task_behind() -> None:
    server = Http2Server(LOOPBACK)
    blocker = Blocker()
    server.add_endpoint("block", blocker)
    await server.start()
    client = Http2Client()
    try:
        stream = await client.request(server.address, "block", b"")
        assert await anext(stream) == b"first"
        await server.close()
        with pytest.raises(StreamBroken):
            await asyncio.wait_for(anext(stream), 5)
        await eventually_async(lambda: not our_tasks(), what="server tasks gone")
    finally:
        await client.close()
    assert our_tasks() == []


# --- start/close races -------------------------------------------------------------------------


async def test_close_during_start_stops_hypercorn_and_start_raises_closed() -> None:
    """close() while start() awaits hypercorn's startup used to find no task to stop: start()
    then returned on a closed server and hypercorn died later with EBADF, unowned."""
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    try:
        server = Http2Server(LOOPBACK)
        start = asyncio.create_task(server.start(), name="test-start")
        await asyncio.sleep(0)  # start() now waits for hypercorn's lifespan startup
        assert server._task is not None
        await server.close()
        with pytest.raises(TransportClosed):
            await asyncio.wait_for(start, 5)
        assert our_tasks() == []
        gc.collect()
        assert unretrieved == []
    finally:
        loop.set_exception_handler(None)


async def test_a_cancelled_start_leaves_no_server_behind() -> None:
    server = Http2Server(LOOPBACK)
    start = asyncio.create_task(server.start(), name="test-start")
    await asyncio.sleep(0)
    assert server._sock is not None
    port = server._sock.getsockname()[1]
    start.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(start, 5)
    assert our_tasks() == []
    assert server._task is None
    with pytest.raises(ConnectionRefusedError):  # the socket is closed: nothing listens
        await asyncio.open_connection("127.0.0.1", port)
    await server.start()  # not closed: it can still start
    try:
        assert server.address.startswith("http://127.0.0.1:")
    finally:
        await server.close()


async def test_close_keeps_the_rest_of_the_grace_for_calls_still_writing(
    client: Http2Client,
) -> None:
    """Calls still running at close() may have bytes on their way to a slow reader: hypercorn
    gets what is left of the 2 s grace, not the 0.1 s meant for reset streams."""
    server = Http2Server(LOOPBACK)
    blocker = Blocker()
    server.add_endpoint("block", blocker)
    await server.start()
    closed = False
    try:
        stream = await client.request(server.address, "block", b"")
        assert await anext(stream) == b"first"
        assert server._calls == 1
        await server.close()
        closed = True
        assert server._hypercorn is not None
        assert server._hypercorn.graceful_timeout > 1.0
    finally:
        if not closed:
            await server.close()


async def test_close_with_no_call_running_gives_hypercorn_only_the_short_flush(
    server: Http2Server,
) -> None:
    await server.close()
    assert server._hypercorn is not None
    assert server._hypercorn.graceful_timeout == pytest.approx(0.1)
