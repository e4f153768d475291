"""The HTTP/2 plane on the wire: raw HTTP as curl or a proxy sends it, garbage POSTed at the
server, a caller resetting a request mid-upload, and a worker process killed mid-stream."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest

from troupe import RequestContext
from troupe.errors import (
    Cancelled,
    ConnectionLost,
    StreamBroken,
)
from troupe.messages import Cancel, Chunk, End, Error, Frame, FrameBuffer, Request, encode
from troupe.testing import eventually_async
from troupe.transports.http2 import (
    CANCEL_PATH,
    FRAMES_CONTENT_TYPE,
    Http2Client,
    Http2Server,
)

from . import _http2
from ._http2 import LOOPBACK, MIB, Blocker, echo
from .conftest import WorkerProcess

# The plane's fixtures (pytest finds fixtures among a module's names).
server = _http2.server

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
