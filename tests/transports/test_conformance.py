"""One conformance suite for every request plane (see the plane table in conftest.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from troupe.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidRequest,
    MessageTooLarge,
    Overloaded,
    RemoteError,
    StreamBroken,
    UnknownEndpoint,
)
from troupe.transports import RequestContext

from .conftest import Plane, WorkerProcess

# How long the caller's cancellation may take to reach the handler.
CANCEL_LATENCY = 0.1


async def echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield payload


async def test_a_request_its_worker_could_not_decode_is_refused_before_sending(
    plane: Plane,
) -> None:
    async def echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield payload

    server = await plane.server()
    server.add_endpoint("echo", echo)
    client = plane.client()
    with pytest.raises(InvalidRequest) as caught:
        await client.request(server.address, "echo", b"x", headers={"n": 1})  # type: ignore[dict-item]
    assert caught.value.param == "headers"
    with pytest.raises(InvalidRequest):
        await client.request(server.address, "echo", "text")  # type: ignore[arg-type]
    stream = await client.request(server.address, "echo", b"still serving")
    assert [chunk async for chunk in stream] == [b"still serving"]


async def test_chunks_arrive_in_order_and_incrementally(plane: Plane) -> None:
    release = asyncio.Event()
    finished = asyncio.Event()

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"0"
        await release.wait()  # the caller must see chunk 0 before we go on
        for i in range(1, 50):
            yield str(i).encode()
        finished.set()

    server = await plane.server()
    server.add_endpoint("gen", handler)
    client = plane.client()
    stream = await client.request(server.address, "gen", b"")
    first = await asyncio.wait_for(anext(stream), 5)
    assert first == b"0"
    assert not finished.is_set()
    release.set()
    rest = [chunk async for chunk in stream]
    assert rest == [str(i).encode() for i in range(1, 50)]


async def test_unary_coroutine_handler_and_empty_stream(plane: Plane) -> None:
    async def unary(payload: bytes, ctx: RequestContext) -> bytes:
        return payload[::-1]

    async def empty(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        return
        yield b""

    server = await plane.server()
    server.add_endpoint("unary", unary)
    server.add_endpoint("empty", empty)
    client = plane.client()
    assert await (await client.request(server.address, "unary", b"abc")).collect() == [b"cba"]
    assert await (await client.request(server.address, "empty", b"")).collect() == []


async def test_handler_exception_is_a_remote_error_and_server_keeps_serving(plane: Plane) -> None:
    async def broken(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"partial"
        raise ValueError("the model fell over")

    server = await plane.server()
    server.add_endpoint("broken", broken)
    server.add_endpoint("echo", echo)
    client = plane.client()
    stream = await client.request(server.address, "broken", b"")
    assert await anext(stream) == b"partial"
    with pytest.raises(RemoteError) as info:
        await anext(stream)
    assert info.value.kind == "ValueError"
    assert info.value.remote_message == "the model fell over"
    assert "the model fell over" in str(info.value)
    assert await (await client.request(server.address, "echo", b"still")).collect() == [b"still"]


async def test_troupe_errors_keep_their_type(plane: Plane) -> None:
    async def busy(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        raise Overloaded("busy", 4)
        yield b""

    server = await plane.server()
    server.add_endpoint("busy", busy)
    client = plane.client()
    with pytest.raises(Overloaded, match="max in-flight 4"):
        await (await client.request(server.address, "busy", b"")).collect()
    with pytest.raises(UnknownEndpoint):
        await (await client.request(server.address, "nope", b"")).collect()
    server.remove_endpoint("busy")
    with pytest.raises(UnknownEndpoint):
        await (await client.request(server.address, "busy", b"")).collect()


class _Blocker:
    """A handler that yields one chunk, then blocks until cancelled; records what it saw."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.cancelled_at = 0.0
        self.stopped_seen = False
        self.reason: str | None = None

    async def __call__(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        self.started.set()
        yield b"first"
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled_at = asyncio.get_running_loop().time()
            self.stopped_seen = ctx.is_stopped()
            self.reason = ctx.stop_reason
            self.cancelled.set()
            raise


async def test_aclose_cancels_the_handler_promptly(plane: Plane) -> None:
    blocker = _Blocker()
    server = await plane.server()
    server.add_endpoint("block", blocker)
    client = plane.client()
    stream = await client.request(server.address, "block", b"")
    assert await anext(stream) == b"first"
    assert server.inflight == 1
    closed_at = asyncio.get_running_loop().time()
    await stream.aclose()
    await asyncio.wait_for(blocker.cancelled.wait(), 5)
    assert blocker.stopped_seen
    assert blocker.reason == "cancelled"
    assert blocker.cancelled_at - closed_at < CANCEL_LATENCY
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_cancelling_the_awaiting_task_cancels_the_handler(plane: Plane) -> None:
    blocker = _Blocker()
    server = await plane.server()
    server.add_endpoint("block", blocker)
    client = plane.client()
    got_first = asyncio.Event()

    async def consume() -> None:
        stream = await client.request(server.address, "block", b"")
        async for _ in stream:
            got_first.set()

    task = asyncio.create_task(consume(), name="consumer")
    await asyncio.wait_for(got_first.wait(), 5)
    cancelled_at = asyncio.get_running_loop().time()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(blocker.cancelled.wait(), 5)
    assert blocker.stopped_seen
    assert blocker.cancelled_at - cancelled_at < CANCEL_LATENCY


async def test_deadline_headers_and_attempt_travel(plane: Plane) -> None:
    seen: list[RequestContext] = []

    async def record(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        seen.append(ctx)
        yield b"ok"

    server = await plane.server()
    server.add_endpoint("record", record)
    client = plane.client()
    deadline = time.time() + 30.5
    stream = await client.request(
        server.address,
        "record",
        b"",
        deadline=deadline,
        headers={"trace-id": "abc", "x": "1"},
        attempt=2,
    )
    assert await stream.collect() == [b"ok"]
    (ctx,) = seen
    assert ctx.deadline == deadline
    assert dict(ctx.headers) == {"trace-id": "abc", "x": "1"}
    assert ctx.attempt == 2
    assert ctx.endpoint == "record"
    remaining = ctx.time_remaining()
    assert remaining is not None
    assert 25 < remaining <= 30.5


async def test_expired_request_is_not_started(plane: Plane) -> None:
    started = asyncio.Event()

    async def work(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        started.set()
        yield b"done"

    server = await plane.server()
    server.add_endpoint("work", work)
    server.add_endpoint("echo", echo)
    client = plane.client()
    with pytest.raises(DeadlineExceeded):
        await (
            await client.request(server.address, "work", b"", deadline=time.time() - 1)
        ).collect()
    # A later request on the same client has been fully served: the expired one was handled.
    assert await (await client.request(server.address, "echo", b"x")).collect() == [b"x"]
    assert not started.is_set()


async def test_deadline_passing_mid_stream_stops_both_sides(plane: Plane) -> None:
    blocker = _Blocker()
    server = await plane.server()
    server.add_endpoint("block", blocker)
    client = plane.client()
    stream = await client.request(server.address, "block", b"", deadline=time.time() + 0.3)
    assert await anext(stream) == b"first"
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await anext(stream)
    assert time.monotonic() - started < 2.0
    await asyncio.wait_for(blocker.cancelled.wait(), 5)
    assert blocker.stopped_seen


async def test_a_thousand_concurrent_requests_on_one_client(plane: Plane) -> None:
    async def double(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        await asyncio.sleep(0)
        yield payload
        yield payload

    server = await plane.server()
    server.add_endpoint("double", double)
    client = plane.client()

    async def one(i: int) -> list[bytes]:
        return await (await client.request(server.address, "double", str(i).encode())).collect()

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(1000))), 50)
    assert results == [[str(i).encode()] * 2 for i in range(1000)]
    assert server.inflight == 0


async def test_server_close_breaks_open_streams(plane: Plane) -> None:
    blocker = _Blocker()
    server = await plane.server()
    server.add_endpoint("block", blocker)
    client = plane.client()
    stream = await client.request(server.address, "block", b"")
    assert await anext(stream) == b"first"
    await server.close()
    with pytest.raises(StreamBroken):
        await asyncio.wait_for(anext(stream), 5)
    assert blocker.reason == "shutdown"


async def test_graceful_close_lets_running_requests_finish(plane: Plane) -> None:
    release = asyncio.Event()

    async def slow(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"a"
        await release.wait()
        yield b"b"

    server = await plane.server()
    server.add_endpoint("slow", slow)
    client = plane.client()
    stream = await client.request(server.address, "slow", b"")
    assert await anext(stream) == b"a"
    closing = asyncio.create_task(server.close(grace=5.0), name="close-grace")
    await asyncio.sleep(0)
    release.set()
    assert [chunk async for chunk in stream] == [b"b"]
    await asyncio.wait_for(closing, 5)


async def test_oversized_request_is_refused_before_sending(plane: Plane) -> None:
    assert plane.request_limit is not None, f"{plane.name} must enforce a request limit"
    limit = plane.request_limit
    started = asyncio.Event()

    async def sink(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        started.set()
        yield b"got it"

    server = await plane.server()
    server.add_endpoint("sink", sink)
    server.add_endpoint("echo", echo)
    client = plane.client()
    with pytest.raises(MessageTooLarge) as info:
        await client.request(server.address, "sink", b"x" * (limit + 1))
    assert info.value.size > limit
    assert not started.is_set()
    assert await (await client.request(server.address, "echo", b"ok")).collect() == [b"ok"]


async def test_explicit_port_in_use_names_port_and_variable(ported_plane: Plane) -> None:
    plane = ported_plane
    first = await plane.server()
    port = int(first.address.rsplit(":", 1)[1].split("/")[0])
    second = plane.manager(plane.with_port(port)).create_server(plane.name)
    with pytest.raises(ConfigError) as info:
        await second.start()
    assert info.value.variable == plane.port_variable
    assert str(port) in str(info.value)
    assert plane.port_variable in str(info.value)


async def test_worker_killed_mid_stream_gives_stream_broken(
    remote_plane: Plane, spawn_worker: object
) -> None:
    assert callable(spawn_worker)
    worker: WorkerProcess = spawn_worker(remote_plane)
    address = await worker.ready()
    client = remote_plane.client()
    assert await (await client.request(address, "echo", b"hi")).collect() == [b"hi"]
    stream = await client.request(address, "forever", b"")
    assert await anext(stream) == b"first"
    worker.kill()
    killed_at = time.monotonic()
    with pytest.raises(StreamBroken):
        await asyncio.wait_for(anext(stream), 10)
    assert time.monotonic() - killed_at < 1.5
