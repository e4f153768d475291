"""The HTTP/2 plane's own tests: the httpcore/hypercorn defects it designs around, addresses and
ports, size limits, a worker killed mid-stream, and garbage POSTed straight at the server.

The shared semantics (streaming, errors, cancellation, deadlines) are in the conformance suite.
"""

from __future__ import annotations

import asyncio
import gc
import random
import signal
import socket
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest

from troupe.config import Http2Config, HttpConfig
from troupe.errors import (
    Cancelled,
    ConfigError,
    ConnectionLost,
    ConnectTimeout,
    MessageTooLarge,
    RequestTimeout,
    StreamBroken,
    TransportClosed,
)
from troupe.messages._frames import (
    Cancel,
    Chunk,
    End,
    Error,
    Frame,
    FrameBuffer,
    Request,
    encode,
)
from troupe.testing import eventually_async, free_port
from troupe.transports import RequestContext
from troupe.transports.http2 import (
    CANCEL_PATH,
    FRAMES_CONTENT_TYPE,
    Http2Client,
    Http2Server,
    create_client,
    create_server,
)

from .conftest import WorkerProcess

LOOPBACK = HttpConfig(host="127.0.0.1", port=0)
MIB = 1024 * 1024


async def echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield payload


async def size_of(payload: bytes, ctx: RequestContext) -> bytes:
    return str(len(payload)).encode()


class Blocker:
    """Yields one chunk, then waits until cancelled; records how it was stopped."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.reason: str | None = None

    async def __call__(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"first"
        try:
            await asyncio.Event().wait()
        finally:
            self.reason = ctx.stop_reason
            self.cancelled.set()


@pytest.fixture
async def server() -> AsyncIterator[Http2Server]:
    srv = Http2Server(LOOPBACK)
    srv.add_endpoint("echo", echo)
    srv.add_endpoint("size", size_of)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


@pytest.fixture
async def client() -> AsyncIterator[Http2Client]:
    cli = Http2Client()
    try:
        yield cli
    finally:
        await cli.close()


def _our_tasks() -> list[str]:
    return sorted(
        t.get_name()
        for t in asyncio.all_tasks()
        if t.get_name().startswith("http2-") and not t.done()
    )


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


async def test_a_dropped_stream_is_cancelled_at_its_next_chunk(
    server: Http2Server, client: Http2Client
) -> None:
    stopped = asyncio.Event()
    reasons: list[str | None] = []

    async def ticker(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"tick"
                await asyncio.sleep(0.02)
        finally:
            reasons.append(ctx.stop_reason)
            stopped.set()

    server.add_endpoint("ticker", ticker)
    stream = await client.request(server.address, "ticker", b"")
    assert await anext(stream) == b"tick"
    del stream  # neither closed nor read to the end
    gc.collect()
    await asyncio.wait_for(stopped.wait(), 5)
    assert reasons == ["cancelled"]


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


async def test_request_timeout_between_frames_cancels_the_handler(server: Http2Server) -> None:
    blocker = Blocker()
    server.add_endpoint("block", blocker)
    client = Http2Client(HttpConfig(request_timeout=0.3))
    try:
        stream = await client.request(server.address, "block", b"")
        assert await anext(stream) == b"first"
        with pytest.raises(RequestTimeout):
            await anext(stream)
        await asyncio.wait_for(blocker.cancelled.wait(), 5)
        assert blocker.reason == "cancelled"
    finally:
        await client.close()


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
    assert not [name for name in _our_tasks() if name.startswith("http2-connect")]


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
        await eventually_async(lambda: not _our_tasks(), what="server tasks gone")
    finally:
        await client.close()
    assert _our_tasks() == []


# --- raw HTTP: the wire as curl or a proxy sees it -------------------------------------------


def _frames(body: bytes) -> list[Frame]:
    buffer = FrameBuffer(MIB)
    frames = buffer.feed(body)
    buffer.close()
    return frames


async def test_connection_drop_cancels_the_request(server: Http2Server) -> None:
    blocker = Blocker()
    server.add_endpoint("block", blocker)
    raw = httpx.AsyncClient(http1=False, http2=True)
    body = encode(Request("raw-1", "block", b""))
    async with raw.stream("POST", server.address + "/block", content=body) as response:
        assert response.http_version == "HTTP/2"
        async for _ in response.aiter_raw():
            break
    await raw.aclose()  # closes the connection: hypercorn delivers http.disconnect
    await asyncio.wait_for(blocker.cancelled.wait(), 5)
    assert blocker.reason == "disconnected"


async def test_cancel_that_overtakes_its_request_refuses_it(server: Http2Server) -> None:
    started = asyncio.Event()

    async def work(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        started.set()
        yield b"work"

    server.add_endpoint("work", work)
    async with httpx.AsyncClient(http1=False, http2=True) as raw:
        cancel = await raw.post(f"{server.address}/{CANCEL_PATH}", content=encode(Cancel("r-9")))
        assert cancel.status_code == 204
        response = await raw.post(
            server.address + "/work", content=encode(Request("r-9", "work", b""))
        )
    assert response.headers["content-type"].encode() == FRAMES_CONTENT_TYPE
    (frame,) = _frames(response.content)
    assert isinstance(frame, Error)
    assert frame.kind == Cancelled.__name__
    assert not started.is_set()


async def test_plain_http11_post_works_for_debugging(server: Http2Server) -> None:
    async with httpx.AsyncClient() as raw:  # HTTP/1.1, as plain curl would
        response = await raw.post(
            server.address + "/echo", content=encode(Request(7, "echo", b"hello"))
        )
    assert response.status_code == 200
    assert _frames(response.content) == [Chunk(7, b"hello", end=True)]


def _fuzz_case(rng: random.Random, i: int) -> tuple[str, str, bytes]:
    """(method, path suffix, body) of one malformed or odd request."""
    valid = encode(Request(f"fuzz-{i}", "echo", rng.randbytes(rng.randint(0, 64))))
    kind = i % 12
    if kind == 0:
        return "POST", "echo", rng.randbytes(rng.randint(0, 300))
    if kind == 1:
        return "POST", "echo", valid[: rng.randint(0, len(valid) - 1)]
    if kind == 2:
        flipped = bytearray(valid)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return "POST", "echo", bytes(flipped)
    if kind == 3:
        wrong = rng.choice(
            [
                ["req", 1.5, "echo", b""],
                ["req", "id", 3, b""],
                ["req", "id", "echo", "not bytes"],
                ["req", "id", "echo", b"", "soon", {}],
                ["req", "id", "echo", b"", None, {"k": 1}],
                ["req"],
                ["nope", 1],
                {"type": "req", "id": 1},
                [[[[[[[[[[[]]]]]]]]]]],
                2**64 - 1,
                None,
            ]
        )
        return "POST", "echo", msgspec.msgpack.encode(wrong)
    if kind == 4:
        frame = rng.choice([Chunk(i, b"x"), End(i), Error(i, "Boom", "no")])
        return "POST", "echo", encode(frame)
    if kind == 5:
        return "POST", CANCEL_PATH, encode(Cancel(f"unknown-{i}"))
    if kind == 6:
        return "POST", "missing", encode(Request(f"fuzz-{i}", "missing", b""))
    if kind == 7:
        return "GET", "echo", b""
    if kind == 8:
        return "POST", "../../elsewhere", valid
    if kind == 9:
        return "POST", "echo", valid + rng.randbytes(rng.randint(1, 16))  # trailing garbage
    if kind == 10 and i % 120 == 10:
        return "POST", "echo", rng.randbytes(70 * 1024)  # over the limit
    return "POST", "echo", valid  # a valid request among the garbage


async def test_fuzz_garbage_bodies_leave_the_server_serving() -> None:
    server = Http2Server(LOOPBACK, max_message_size=64 * 1024)
    server.add_endpoint("echo", echo)
    await server.start()
    normal = Http2Client()
    raw = httpx.AsyncClient(http1=False, http2=True, timeout=10.0)
    rng = random.Random(20261122)
    cases = [_fuzz_case(rng, i) for i in range(3000)]
    gate = asyncio.Semaphore(32)
    statuses: dict[int, int] = {}

    async def fire(method: str, suffix: str, body: bytes) -> None:
        async with gate:
            url = f"{server.address}/{suffix}"
            response = await raw.request(method, url, content=body)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code in (200, 204, 400, 404, 405, 413), response
        if response.headers.get("content-type", "").encode() == FRAMES_CONTENT_TYPE:
            frames = _frames(response.content)
            assert frames
            last = frames[-1]
            assert isinstance(last, End | Error) or (isinstance(last, Chunk) and last.end)

    async def meanwhile() -> None:
        for i in range(30):
            stream = await normal.request(server.address, "echo", b"%d" % i)
            assert await stream.collect() == [b"%d" % i]

    started = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(meanwhile(), *(fire(*case) for case in cases)), 40)
        print(f"fuzz: {len(cases)} cases in {time.perf_counter() - started:.1f} s: {statuses}")
        assert {400, 404, 405, 413} <= set(statuses)
        stream = await normal.request(server.address, "echo", b"after")
        assert await stream.collect() == [b"after"]
        await eventually_async(lambda: server.inflight == 0, what="no request left running")
    finally:
        await raw.aclose()
        await normal.close()
        await server.close()


# --- a worker process killed mid-stream ------------------------------------------------------


async def test_killed_worker_breaks_every_open_stream_promptly() -> None:
    worker = WorkerProcess("http", [])
    client = Http2Client()
    try:
        address = await worker.ready()
        streams = [await client.request(address, "forever", b"") for _ in range(5)]
        for stream in streams:
            assert await anext(stream) == b"first"
        worker.kill()
        killed_at = time.monotonic()
        for stream in streams:
            with pytest.raises(StreamBroken):
                await asyncio.wait_for(anext(stream), 5)
        assert time.monotonic() - killed_at < 1.5
        # The dead address now fails fast, and the client still reaches live workers.
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(client.request(address, "echo", b""), 5)
        other = WorkerProcess("http", [])
        try:
            other_address = await other.ready()
            stream = await client.request(other_address, "echo", b"alive")
            assert await stream.collect() == [b"alive"]
        finally:
            other.close()
    finally:
        await client.close()
        worker.close()


async def test_close_is_quick_after_a_caller_reset_a_request_mid_upload(
    server: Http2Server,
) -> None:
    """hypercorn never counts a connection idle after its last stream was reset by the caller;
    close() must not wait out hypercorn's whole graceful timeout for it (it took 2 s)."""
    import h2.config  # noqa: PLC0415 - the raw client of this test only
    import h2.connection  # noqa: PLC0415
    import h2.events  # noqa: PLC0415

    url = urlsplit(server.address)
    assert url.hostname is not None
    assert url.port is not None
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", url.netloc),
        (":path", f"{url.path}/echo"),
        ("content-type", FRAMES_CONTENT_TYPE),
    ]
    conn.send_headers(1, headers)  # the body never follows: reset mid-upload
    conn.reset_stream(1)
    conn.ping(b"troupe!!")
    writer.write(conn.data_to_send())
    try:
        async with asyncio.timeout(5):
            acked = False
            while not acked:  # frames are handled in order: the reset came before the ping
                data = await reader.read(65536)
                assert data, "the server closed the connection"
                events = conn.receive_data(data)
                acked = any(isinstance(e, h2.events.PingAckReceived) for e in events)
                writer.write(conn.data_to_send())
        await eventually_async(lambda: server._calls == 0)
        started = time.monotonic()
        await server.close()
        assert time.monotonic() - started < 1.0
    finally:
        writer.close()


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
        assert _our_tasks() == []
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
    assert _our_tasks() == []
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
