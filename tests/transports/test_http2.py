"""The HTTP/2 plane's own tests: the httpcore/hypercorn defects it designs around.

Its settings, limits and closing are in ``test_http2_server.py``, the raw wire in
``test_http2_wire.py``, its flow control in ``test_http2_limits.py``; the shared semantics
(streaming, errors, cancellation, deadlines) are in the conformance suite.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import pytest

from troupe import RequestContext
from troupe.config import Http2Config
from troupe.errors import (
    StreamBroken,
)
from troupe.testing import eventually_async
from troupe.transports.http2 import (
    Http2Client,
    Http2Server,
)

from . import _http2
from ._http2 import LOOPBACK, MIB, Blocker
from .conftest import WorkerProcess

# The plane's fixtures (pytest finds fixtures among a module's names).
server = _http2.server
client = _http2.client

# --- httpcore / hypercorn defects ------------------------------------------------------------


async def test_abandoned_large_streams_do_not_stall_the_connection(
    server: Http2Server, client: Http2Client
) -> None:
    """httpcore sends no RST_STREAM for an abandoned response; unread DATA would use up the
    connection's 16 MiB window and stall every later request on it."""
    produced = 0
    stopped = asyncio.Event()
    block = b"x" * MIB

    async def firehose(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        nonlocal produced
        try:
            while True:
                produced += 1
                yield block
        finally:
            stopped.set()

    server.add_endpoint("firehose", firehose)
    for _ in range(3):
        stopped.clear()
        before = produced
        stream = await client.request(server.address, "firehose", b"")
        assert len(await asyncio.wait_for(anext(stream), 5)) == MIB
        # More than a whole flow-control window is sent before the caller gives up.
        await eventually_async(lambda b=before: produced - b >= 20, what="20 MiB produced")
        await stream.aclose()
        await asyncio.wait_for(stopped.wait(), 5)
    assert server.inflight == 0
    for i in range(100):
        stream = await client.request(server.address, "echo", b"%d" % i)
        assert await asyncio.wait_for(stream.collect(), 5) == [b"%d" % i]


async def test_16_mib_request_uploads_in_linear_time(
    server: Http2Server, client: Http2Client
) -> None:
    """A single 16 MiB bytes body takes ~5 s through httpcore; chunked it takes well under 1 s."""
    assert await (await client.request(server.address, "size", b"warm")).collect() == [b"4"]
    payload = bytes(16 * MIB)
    started = time.perf_counter()
    stream = await client.request(server.address, "size", payload)
    assert await stream.collect() == [str(len(payload)).encode()]
    elapsed = time.perf_counter() - started
    print(f"16 MiB request over HTTP/2 took {elapsed:.3f} s")
    assert elapsed < 3.0


async def test_five_thousand_requests_on_one_client(
    server: Http2Server, client: Http2Client
) -> None:
    """hypercorn closes a connection after 1,000 requests unless told otherwise."""
    gate = asyncio.Semaphore(50)

    async def one(i: int) -> bool:
        async with gate:
            stream = await client.request(server.address, "echo", b"%d" % i)
            return await stream.collect() == [b"%d" % i]

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(5000))), 55)
    assert all(results)
    assert server.inflight == 0


async def test_idle_open_streams_do_not_hold_back_other_requests(
    server: Http2Server, client: Http2Client
) -> None:
    """With httpcore, two idle open streams starve a third: its frames wait for more traffic."""
    gates = [asyncio.Event() for _ in range(5)]

    async def gated(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"first"
        await gates[int(payload)].wait()
        yield b"second"

    server.add_endpoint("gated", gated)
    streams = [await client.request(server.address, "gated", b"%d" % i) for i in range(5)]
    for stream in streams:
        assert await asyncio.wait_for(anext(stream), 2) == b"first"
    # A new request is answered while five streams sit idle.
    stream = await asyncio.wait_for(client.request(server.address, "echo", b"new"), 2)
    assert await asyncio.wait_for(stream.collect(), 2) == [b"new"]
    # A chunk on one idle stream is delivered at once, the others still idle.
    gates[3].set()
    assert await asyncio.wait_for(streams[3].collect(), 2) == [b"second"]
    for gate in gates:
        gate.set()
    for stream in streams:
        await asyncio.wait_for(stream.collect(), 2)


async def test_worker_stream_limit_spreads_requests_over_connections() -> None:
    server = Http2Server(LOOPBACK, Http2Config(max_concurrent_streams=2))
    blocker = Blocker()
    release = asyncio.Event()

    async def held(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"first"
        await release.wait()
        yield payload

    server.add_endpoint("held", held)
    server.add_endpoint("block", blocker)
    await server.start()
    client = Http2Client()
    try:
        streams = [await client.request(server.address, "held", b"%d" % i) for i in range(5)]
        for stream in streams:
            assert await asyncio.wait_for(anext(stream), 2) == b"first"
        assert server.inflight == 5
        release.set()
        for i, stream in enumerate(streams):
            assert await asyncio.wait_for(stream.collect(), 2) == [b"%d" % i]
    finally:
        await client.close()
        await server.close()


async def test_cancelling_an_unfinished_upload_resets_its_stream(
    server: Http2Server, client: Http2Client
) -> None:
    started = asyncio.Event()

    async def sink(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        started.set()
        yield b"ok"

    server.add_endpoint("sink", sink)
    upload = asyncio.create_task(
        client.request(server.address, "sink", bytes(16 * MIB)), name="big-upload"
    )
    for _ in range(3):
        await asyncio.sleep(0)
    assert not upload.done()
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    for i in range(20):
        stream = await client.request(server.address, "echo", b"%d" % i)
        assert await asyncio.wait_for(stream.collect(), 5) == [b"%d" % i]
    await eventually_async(lambda: server.inflight == 0, what="nothing left running")
    assert not started.is_set()


async def test_keep_alive_ping_detects_a_frozen_worker() -> None:
    """A worker that stops answering (here: SIGSTOP) is noticed by the keep-alive ping."""
    worker = WorkerProcess("http", [])
    client = Http2Client(http2=Http2Config(keep_alive_interval=0.2, keep_alive_timeout=0.3))
    try:
        address = await worker.ready()
        stream = await client.request(address, "forever", b"")
        assert await anext(stream) == b"first"
        worker.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            with pytest.raises(StreamBroken, match="keep-alive"):
                await asyncio.wait_for(anext(stream), 5)
            assert time.monotonic() - stopped_at < 2.0
        finally:
            worker.proc.send_signal(signal.SIGCONT)
    finally:
        await client.close()
        worker.close()


async def test_idle_connections_are_retired_and_replaced(server: Http2Server) -> None:
    release = asyncio.Event()

    async def held(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"first"
        await release.wait()

    server.add_endpoint("held", held)

    def live(of: Http2Client) -> int:  # white-box: connections the client still holds
        return sum(len(pool.live) for pool in of._pools.values())

    client = Http2Client(http2=Http2Config(pool_idle_timeout=0.2))
    # One stream per connection, and at most one idle connection kept.
    narrow = Http2Client(http2=Http2Config(max_concurrent_streams=1, pool_max_idle_per_host=1))
    try:
        assert await (await client.request(server.address, "echo", b"1")).collect() == [b"1"]
        assert live(client) == 1
        await eventually_async(lambda: live(client) == 0, what="idle connection closed")
        assert await (await client.request(server.address, "echo", b"2")).collect() == [b"2"]

        streams = [await narrow.request(server.address, "held", b"") for _ in range(3)]
        for stream in streams:
            assert await anext(stream) == b"first"
        assert live(narrow) == 3
        release.set()
        for stream in streams:
            assert await stream.collect() == []
        await eventually_async(lambda: live(narrow) == 1, what="extra idle connections closed")
    finally:
        await client.close()
        await narrow.close()
