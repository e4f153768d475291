"""What a caller can make an HTTP/2 worker hold: replies it never reads, bodies it sends, streams
it opens. Everything is bounded (flow control, the admission limits, ``max_buffered``) and what
the worker refuses is counted."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from _rawh2 import RawH2

from troupe import RequestContext
from troupe.config import HttpConfig
from troupe.errors import Overloaded
from troupe.messages import Cancel, Error, FrameBuffer, Request, encode
from troupe.testing import eventually_async
from troupe.transports.http2 import CANCEL_PATH, Http2Client, Http2Server

LOOPBACK = HttpConfig(host="127.0.0.1", port=0)
KIB = 1024
ROOT = "/v1/rpc"


def _port(server: Http2Server) -> int:
    return int(server.address.rsplit(":", 1)[1].split("/")[0])


class Producer:
    """Yields ``count`` chunks of ``size`` bytes (then waits until cancelled if ``hold``)."""

    def __init__(self, count: int, size: int, *, hold: bool = False) -> None:
        self.count = count
        self.size = size
        self.hold = hold
        self.produced = 0
        self.all_produced = asyncio.Event()

    async def __call__(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            self.produced += 1
            yield b"x" * self.size
        self.all_produced.set()
        if self.hold:
            await asyncio.Event().wait()


async def echo(payload: bytes, ctx: RequestContext) -> bytes:
    return payload


@pytest.fixture
async def client() -> AsyncIterator[Http2Client]:
    cli = Http2Client()
    try:
        yield cli
    finally:
        await cli.close()


async def _echo_once(client: Http2Client, server: Http2Server, payload: bytes) -> bytes:
    stream = await client.request(server.address, "echo", payload)
    async with stream:
        return b"".join([chunk async for chunk in stream])


async def test_a_caller_that_reads_nothing_holds_back_its_handlers() -> None:
    """Its replies wait in the worker (two chunks per request at most), not everything the
    handlers can produce; when it goes away, everything it held is let go."""
    server = Http2Server(LOOPBACK)
    producer = Producer(count=50, size=64 * KIB)
    server.add_endpoint("produce", producer)
    await server.start()
    try:
        peer = await RawH2.open(_port(server), window=0)
        for i in range(3):
            peer.request(f"{ROOT}/produce", encode(Request(f"quiet-{i}", "produce", b"")))
        await eventually_async(lambda: server.inflight == 3, what="three requests running")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(producer.all_produced.wait(), 0.5)
        assert producer.produced <= 3 * 2
        assert server._budget.held <= 3 * 2 * (64 * KIB + 64)
        peer.abort()
        await eventually_async(lambda: server.inflight == 0, what="requests stopped")
        await eventually_async(lambda: server._budget.held == 0, what="bytes let go")
        assert server._served is not None
        await eventually_async(lambda: server._served.connections == 0, what="connection gone")
        await peer.close()
    finally:
        await server.close()


async def test_a_body_over_max_buffered_is_refused_as_overloaded_and_counted(
    client: Http2Client,
) -> None:
    server = Http2Server(LOOPBACK, max_buffered=64 * KIB)
    server.add_endpoint("echo", echo)
    await server.start()
    try:
        with pytest.raises(Overloaded, match="limit 65536"):
            await _echo_once(client, server, b"b" * (100 * KIB))
        assert server.metrics.refused() == {"buffered": 1}
        assert server._budget.held == 0
        assert await _echo_once(client, server, b"s" * (10 * KIB)) == b"s" * (10 * KIB)
    finally:
        await server.close()


async def test_replies_a_caller_left_unread_count_until_its_connection_ends(
    client: Http2Client,
) -> None:
    """A reply cancelled while the caller reads nothing stays in hypercorn until the stream or
    the connection ends: it still counts, and new requests are refused while it exceeds
    max_buffered."""
    server = Http2Server(LOOPBACK, max_buffered=256 * KIB)
    server.add_endpoint("produce", Producer(count=1, size=300 * KIB))
    server.add_endpoint("echo", echo)
    await server.start()
    try:
        quiet = await RawH2.open(_port(server), window=0)
        quiet.request(f"{ROOT}/produce", encode(Request("stuck", "produce", b"")))
        await eventually_async(lambda: server._budget.exceeded, what="the reply counted")
        with pytest.raises(Overloaded, match="limit 262144"):
            await _echo_once(client, server, b"refused")

        other = await RawH2.open(_port(server))
        status, _ = await other.response(
            other.request(f"{ROOT}/{CANCEL_PATH}", encode(Cancel("stuck")))
        )
        assert status == 204
        await eventually_async(lambda: server.inflight == 0, what="request cancelled")
        assert server._budget.exceeded  # hypercorn still holds the reply
        with pytest.raises(Overloaded):
            await _echo_once(client, server, b"refused")
        assert server.metrics.refused() == {"buffered": 2}

        quiet.abort()
        await eventually_async(lambda: server._budget.held == 0, what="bytes let go")
        assert await _echo_once(client, server, b"served") == b"served"
        await quiet.close()
        await other.close()
    finally:
        await server.close()


async def test_a_connection_is_one_caller_for_the_admission_limits(client: Http2Client) -> None:
    """The worker advertises the per-caller limit as its concurrent streams, so a caller at its
    limit opens another connection rather than being refused; each connection is counted."""
    server = Http2Server(LOOPBACK)
    server.limit(0, 2)
    producer = Producer(count=1, size=8, hold=True)
    server.add_endpoint("produce", producer)
    await server.start()
    streams = []
    try:
        peer = await RawH2.open(_port(server))
        assert peer.conn.remote_settings.max_concurrent_streams == 2
        await peer.close()
        for _ in range(3):
            streams.append(await client.request(server.address, "produce", b""))
        await eventually_async(lambda: server.inflight == 3, what="three requests running")
        assert server._runner.callers == 2
        assert max(server._runner.held_by(c) for c in list(server._runner._callers)) == 2
        assert server.metrics.refused() == {}
    finally:
        for stream in streams:
            await stream.aclose()
        await server.close()


async def test_an_overloaded_refusal_is_one_error_frame() -> None:
    server = Http2Server(LOOPBACK)
    server.limit(1, 0)
    server.add_endpoint("produce", Producer(count=1, size=8, hold=True))
    await server.start()
    try:
        peer = await RawH2.open(_port(server))
        peer.request(f"{ROOT}/produce", encode(Request("first", "produce", b"")))
        await eventually_async(lambda: server.inflight == 1, what="first request running")
        status, body = await peer.response(
            peer.request(f"{ROOT}/produce", encode(Request("second", "produce", b"")))
        )
        buffer = FrameBuffer(KIB)
        (frame,) = buffer.feed(body)
        assert status == 200
        assert isinstance(frame, Error)
        assert (frame.id, frame.kind) == ("second", "Overloaded")
        assert server.metrics.refused() == {"max_inflight": 1}
        await peer.close()
    finally:
        await server.close()


async def test_http11_keep_alive_connections_closed_by_callers_are_let_go_at_once() -> None:
    """hypercorn 0.18 kept each in CLOSE_WAIT, its descriptor held, until the worker's idle
    timeout (100 s with the default settings)."""
    server = Http2Server(LOOPBACK)
    await server.start()
    try:
        assert server._served is not None
        served = server._served
        before = len(os.listdir("/proc/self/fd"))
        body = encode(Cancel("nothing"))
        head = (
            f"POST {ROOT}/{CANCEL_PATH} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        writers = []
        for _ in range(100):
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
            writer.write(head.encode() + body)
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert answer.startswith(b"HTTP/1.1 204")
            writers.append(writer)
        await eventually_async(lambda: served.connections == 100, what="100 connections open")
        for writer in writers:
            writer.close()
        await eventually_async(lambda: served.connections == 0, timeout=3, what="let go")
        await eventually_async(
            lambda: len(os.listdir("/proc/self/fd")) <= before + 2, timeout=3, what="fds closed"
        )
    finally:
        await server.close()
