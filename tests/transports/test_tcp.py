"""TCP (ZeroMQ) specifics: limits, timeouts, pooling, back-pressure, addresses."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import msgspec
import pytest
import zmq

from troupe import RequestContext
from troupe._support._net import advertised_host, format_hostport, split_address
from troupe.config import TcpConfig
from troupe.errors import (
    ConnectionRefused,
    ConnectTimeout,
    InvalidRequest,
    ProtocolError,
    StreamBroken,
    TransportError,
)
from troupe.messages import Chunk, End, Error, Request, encode
from troupe.messages._frames import BATCH_MAX_BYTES, decode_message, encode_batch
from troupe.testing import free_port
from troupe.transports.tcp import TcpClient, TcpServer
from troupe.transports.tcp._pump import _batch_bytes, _next_message

LIMIT = 64 * 1024
CONFIG = TcpConfig(host="127.0.0.1", max_message_size=LIMIT, request_timeout=10.0)


async def echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield payload


@pytest.fixture
async def server() -> AsyncIterator[TcpServer]:
    server = TcpServer(CONFIG)
    server.add_endpoint("echo", echo)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def client() -> AsyncIterator[TcpClient]:
    client = TcpClient(CONFIG)
    yield client
    await client.close()


async def call(client: TcpClient, address: str, endpoint: str, payload: bytes) -> list[bytes]:
    return await (await client.request(address, endpoint, payload)).collect()


async def test_address_reports_the_real_port(server: TcpServer) -> None:
    host, port = split_address(server.address, "tcp")
    assert host == "127.0.0.1"
    assert port > 0
    assert server.address == f"tcp://127.0.0.1:{port}"


async def test_localhost_is_resolved_for_binding() -> None:
    server = TcpServer(replace(CONFIG, host="localhost"))
    await server.start()
    try:
        assert server.address.startswith("tcp://127.0.0.1:")
    finally:
        await server.close()


async def test_connect_timeout_when_the_peer_never_answers_the_handshake() -> None:
    client = TcpClient(replace(CONFIG, connect_timeout=0.3))
    mute = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody speaks ZMTP
    try:
        started = time.monotonic()
        with pytest.raises(ConnectTimeout) as info:
            await client.request(f"tcp://127.0.0.1:{mute.getsockname()[1]}", "echo", b"")
        assert 0.25 < time.monotonic() - started < 2.0
        assert info.value.timeout == 0.3
        assert client._pools == {}  # the failed connection is not kept
    finally:
        mute.close()
        await client.close()


async def test_a_refused_connection_fails_at_once_not_at_the_connect_timeout() -> None:
    # libzmq retries a refused connect in silence; the caller must hear of it at once (a dead
    # worker's port) and go elsewhere, not wait out DYN_TCP_CONNECT_TIMEOUT.
    client = TcpClient(replace(CONFIG, connect_timeout=10.0))
    try:
        address = f"tcp://127.0.0.1:{free_port()}"
        for _ in range(3):  # and again: nothing of the failed connection is kept
            started = time.monotonic()
            with pytest.raises(ConnectionRefused) as info:
                await client.request(address, "echo", b"")
            assert time.monotonic() - started < 1.0
            assert info.value.address == address
            assert "refused" in str(info.value)
            assert client._pools == {}
    finally:
        await client.close()


async def test_streams_fail_at_once_when_the_worker_goes_away() -> None:
    server = TcpServer(CONFIG)
    release = asyncio.Event()

    async def slow(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"first"
        await release.wait()
        yield b"never"

    server.add_endpoint("slow", slow)
    await server.start()
    client = TcpClient(replace(CONFIG, connect_timeout=10.0, request_timeout=30.0))
    try:
        streams = [await client.request(server.address, "slow", b"") for _ in range(5)]
        for stream in streams:
            assert await anext(stream) == b"first"
        started = time.monotonic()
        await server.close()
        for stream in streams:
            with pytest.raises(StreamBroken):
                await anext(stream)
        assert time.monotonic() - started < 2.0
        with pytest.raises(ConnectionRefused):  # and the next request is refused at once
            await client.request(server.address, "slow", b"")
    finally:
        await client.close()


async def test_oversized_message_from_a_raw_peer_harms_no_one_else(
    server: TcpServer, client: TcpClient
) -> None:
    started = asyncio.Event()

    async def sink(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        started.set()
        yield b""

    server.add_endpoint("sink", sink)
    assert await call(client, server.address, "echo", b"before") == [b"before"]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(server.address)
    try:
        raw.send(encode(Request(1, "sink", b"x" * (LIMIT * 2))))
        # The ordinary client keeps working while libzmq drops the offending peer.
        for i in range(20):
            assert await call(client, server.address, "echo", str(i).encode()) == [str(i).encode()]
        assert not started.is_set()
    finally:
        raw.close(0)
        ctx.term()


async def test_pool_grows_up_to_pool_size(server: TcpServer) -> None:
    server.limit(0, 0)  # more requests at once than the default admission limits let in
    client = TcpClient(replace(CONFIG, pool_size=2))
    try:
        results = await asyncio.gather(
            *(call(client, server.address, "echo", str(i).encode()) for i in range(1500))
        )
        assert results == [[str(i).encode()] for i in range(1500)]
        assert 1 <= len(client._pools[server.address]) <= 2
    finally:
        await client.close()


async def test_back_pressure_with_tiny_buffers() -> None:
    config = replace(CONFIG, channel_buffer=2)
    server = TcpServer(config)

    async def flood(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        for i in range(int(payload)):
            yield i.to_bytes(4, "big")

    server.add_endpoint("flood", flood)
    server.add_endpoint("echo", echo)
    await server.start()
    client = TcpClient(config)
    try:
        stream = await client.request(server.address, "flood", b"3000")
        received = [int.from_bytes(chunk, "big") async for chunk in stream]
        assert received == list(range(3000))
        results = await asyncio.gather(
            *(call(client, server.address, "echo", str(i).encode()) for i in range(300))
        )
        assert results == [[str(i).encode()] for i in range(300)]
    finally:
        await client.close()
        await server.close()


async def test_requests_to_a_malformed_address_fail_clearly(client: TcpClient) -> None:
    with pytest.raises(TransportError, match="malformed tcp address"):
        await client.request("tcp://no-port", "echo", b"")
    with pytest.raises(TransportError, match="malformed tcp address"):
        await client.request("http://127.0.0.1:1", "echo", b"")


def test_address_helpers() -> None:
    assert format_hostport("::1", 5) == "[::1]:5"
    assert format_hostport("10.0.0.1", 5) == "10.0.0.1:5"
    assert split_address("tcp://[::1]:7", "tcp") == ("::1", 7)
    assert advertised_host("127.0.0.1") == "127.0.0.1"


def test_works_on_uvloop() -> None:
    """The runtime's I/O loop is uvloop: the FD-driven sockets must work there too."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        blocker_cancelled = asyncio.Event()

        async def block(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
            yield b"first"
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                blocker_cancelled.set()
                raise

        server = TcpServer(CONFIG)
        server.add_endpoint("echo", echo)
        server.add_endpoint("block", block)
        await server.start()
        client = TcpClient(CONFIG)
        try:
            results = await asyncio.gather(
                *(call(client, server.address, "echo", str(i).encode()) for i in range(200))
            )
            assert results == [[str(i).encode()] for i in range(200)]
            stream = await client.request(server.address, "block", b"")
            assert await anext(stream) == b"first"
            await stream.aclose()
            await asyncio.wait_for(blocker_cancelled.wait(), 5)
        finally:
            await client.close()
            await server.close()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(scenario(), 30))
    finally:
        loop.close()


async def test_server_closing_right_after_a_cancel_does_not_wait_for_its_grace() -> None:
    # A worker closed within milliseconds of a caller's Cancel must not wait out its grace.
    server = TcpServer(CONFIG)
    started, stopped = asyncio.Event(), asyncio.Event()

    async def slow(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        try:
            for _ in range(1000):
                yield b"t"
                started.set()
                await asyncio.sleep(0.01)
        finally:
            stopped.set()

    server.add_endpoint("slow", slow)
    await server.start()
    client = TcpClient(CONFIG)
    try:
        stream = await client.request(server.address, "slow", b"")
        assert await anext(stream) == b"t"
        await asyncio.wait_for(started.wait(), 5)
        await stream.aclose()
        began = time.monotonic()
        await asyncio.wait_for(server.close(grace=5.0), 5)
        assert time.monotonic() - began < 1.0
        assert stopped.is_set()
    finally:
        await client.close()
        await server.close()


async def test_concurrent_frames_are_batched_within_the_size_limit(
    server: TcpServer, client: TcpClient
) -> None:
    # 15 kB frames: up to four fit in one batch under the 64 KiB limit; a batch over it would
    # make ZeroMQ drop the connection (MAXMSGSIZE) and every stream would break.
    payloads = [bytes([i]) * 15_000 for i in range(48)]
    answers = await asyncio.gather(
        *(call(client, server.address, "echo", payload) for payload in payloads)
    )
    assert answers == [[payload] for payload in payloads]
    small = [str(i).encode() for i in range(600)]
    answers = await asyncio.gather(
        *(call(client, server.address, "echo", payload) for payload in small)
    )
    assert answers == [[payload] for payload in small]


def test_batches_respect_the_byte_limit_and_leave_large_frames_alone() -> None:
    frames = [b"a" * 100, b"b" * 100, b"c" * 20_000, b"d" * 10]
    data, count = _next_message(frames, 1_000)
    assert count == 2
    assert data == encode_batch(frames[:2])
    assert _next_message(frames[2:], 1_000_000) == (frames[2], 1)  # large: alone, uncopied
    assert _next_message(frames, 0) == (frames[0], 1)  # batching off
    assert _next_message(frames[:2], 150) == (frames[0], 1)  # two would exceed the limit


def test_batches_never_exceed_64_kib_and_small_limits_turn_them_off() -> None:
    assert _batch_bytes(TcpConfig(max_message_size=32 * 1024 * 1024)) == BATCH_MAX_BYTES
    assert _batch_bytes(TcpConfig(max_message_size=BATCH_MAX_BYTES)) == BATCH_MAX_BYTES
    assert _batch_bytes(TcpConfig(max_message_size=BATCH_MAX_BYTES - 1)) == 0


async def test_batches_fit_a_worker_with_a_smaller_limit() -> None:
    # The caller's limit (32 MiB) is far above the worker's (64 KiB): its batches must still
    # fit the worker's, or libzmq drops the connection and every stream on it breaks.
    server = TcpServer(CONFIG)
    server.add_endpoint("echo", echo)
    await server.start()
    client = TcpClient(replace(CONFIG, max_message_size=32 * 1024 * 1024, pool_size=1))
    try:
        payloads = [bytes([i]) * 15_000 for i in range(64)]
        answers = await asyncio.gather(
            *(call(client, server.address, "echo", payload) for payload in payloads)
        )
        assert answers == [[payload] for payload in payloads]
    finally:
        await client.close()
        await server.close()


async def test_batches_fit_a_caller_with_a_smaller_limit() -> None:
    server = TcpServer(replace(CONFIG, max_message_size=32 * 1024 * 1024))
    server.add_endpoint("echo", echo)
    await server.start()
    client = TcpClient(replace(CONFIG, pool_size=1))  # 64 KiB
    try:
        payloads = [bytes([i]) * 15_000 for i in range(64)]
        answers = await asyncio.gather(
            *(call(client, server.address, "echo", payload) for payload in payloads)
        )
        assert answers == [[payload] for payload in payloads]
    finally:
        await client.close()
        await server.close()


async def test_request_refuses_what_a_worker_could_not_decode(
    server: TcpServer, client: TcpClient
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await client.request(server.address, "echo", b"x", headers={"n": 1})  # type: ignore[dict-item]
    assert caught.value.param == "headers"
    with pytest.raises(InvalidRequest) as caught:
        await client.request(server.address, "echo", "text")  # type: ignore[arg-type]
    assert caught.value.param == "payload"
    with pytest.raises(InvalidRequest):
        await client.request(server.address, "echo", b"x", headers={"k": "\ud800"})
    assert await call(client, server.address, "echo", b"fine") == [b"fine"]


def _poisoned_request(rid: int) -> bytes:
    """A request whose headers hold an int: the worker cannot decode it."""
    return msgspec.msgpack.encode(["req", rid, "echo", b"bad", None, {"n": 1}, 0])


async def test_one_bad_request_in_a_batch_costs_only_itself(server: TcpServer) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    try:
        frames = [encode(Request(i, "echo", b"%d" % i)) for i in range(16)]
        frames.insert(8, _poisoned_request(99))
        sock.send(encode_batch(frames))
        answers: dict[int | str, object] = {}
        async with asyncio.timeout(5):
            while len(answers) < 17:
                while sock.poll(0):
                    for frame in decode_message(sock.recv()):
                        assert isinstance(frame, Chunk | End | Error)
                        answers[frame.id] = frame.data if isinstance(frame, Chunk) else frame
                await asyncio.sleep(0.005)
        assert {rid: answers[rid] for rid in range(16)} == {i: b"%d" % i for i in range(16)}
        refused = answers[99]
        assert isinstance(refused, Error)
        assert refused.kind == "ProtocolError"
    finally:
        sock.close(0)
        await asyncio.to_thread(ctx.term)


async def test_an_undecodable_reply_fails_only_its_own_stream() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = TcpClient(replace(CONFIG, pool_size=1))
    try:
        address = f"tcp://127.0.0.1:{port}"
        first, second = await asyncio.gather(
            client.request(address, "echo", b"1"), client.request(address, "echo", b"2")
        )
        ids: list[int] = []
        async with asyncio.timeout(5):
            while len(ids) < 2:
                while router.poll(0):
                    identity, data = router.recv_multipart()
                    ids += [frame.id for frame in decode_message(data)]  # type: ignore[misc]
                await asyncio.sleep(0.005)
        good = encode(Chunk(first.request_id, b"ok", end=True))
        bad = msgspec.msgpack.encode(["chunk", second.request_id, 5])  # data is no bytes
        router.send_multipart([identity, encode_batch([good, bad])])
        assert await asyncio.wait_for(first.collect(), 5) == [b"ok"]
        with pytest.raises(ProtocolError, match="undecodable reply"):
            await asyncio.wait_for(second.collect(), 5)
    finally:
        await client.close()
        router.close(0)
        await asyncio.to_thread(ctx.term)


async def test_streams_dropped_unclosed_are_forgotten_and_cancelled(server: TcpServer) -> None:
    count = 100
    started: list[None] = []
    all_started = asyncio.Event()
    stopped: list[str | None] = []
    all_stopped = asyncio.Event()

    async def silent(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        started.append(None)
        if len(started) == count:
            all_started.set()
        try:
            await asyncio.Event().wait()
            yield b"never"
        finally:
            stopped.append(ctx.stop_reason)
            if len(stopped) == count:
                all_stopped.set()

    server.add_endpoint("silent", silent)
    client = TcpClient(replace(CONFIG, pool_size=1))
    try:
        streams = [await client.request(server.address, "silent", b"") for _ in range(count)]
        await asyncio.wait_for(all_started.wait(), 5)
        [conn] = client._pools[server.address]
        assert len(conn.streams) == count
        # Dropped without close() (an exception path, say); a cycle keeps one of them alive
        # until the collector runs.
        cycle: list[object] = [streams[0]]
        cycle.append(cycle)
        del streams, cycle
        gc.collect()
        await asyncio.wait_for(all_stopped.wait(), 5)
        assert stopped == ["cancelled"] * count
        assert conn.streams == {}
        assert server.inflight == 0
    finally:
        await client.close()
