"""The NATS request plane: what only NATS shows (addresses, max_payload, broker outages, probes).

The shared semantics (streaming, cancellation, deadlines, errors, a SIGKILLed worker) are in the
conformance suite; these tests use real nats-servers started by the ``troupe.testing`` fixtures.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator

import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from troupe.config import NatsConfig, RequestPlaneConfig
from troupe.errors import (
    ConfigError,
    ConnectionLost,
    MessageTooLarge,
    RemoteError,
    StreamBroken,
    TransportClosed,
    TransportError,
    UnknownEndpoint,
)
from troupe.messages import Cancel, Chunk, End, Error, Request
from troupe.messages._frames import decode, encode
from troupe.testing import NatsServer, eventually_async, free_port
from troupe.transports import Client, NetworkManager, RequestContext
from troupe.transports._manager import plane_of
from troupe.transports.nats import NatsRpcClient, NatsRpcServer, subject_of

from .conftest import WorkerProcess


async def echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield payload


async def count(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    for i in range(int(payload)):
        yield str(i).encode()


class Gate:
    """A handler that yields ``first``, waits for :attr:`release`, then yields ``second``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.stopped = asyncio.Event()
        self.reason: str | None = None

    async def __call__(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"first"
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.reason = ctx.stop_reason
            self.stopped.set()
            raise
        yield b"second"


@pytest.fixture
def config(nats_server: NatsServer) -> NatsConfig:
    return NatsConfig(server=nats_server.url, connect_timeout=2.0, request_timeout=10.0)


@pytest.fixture
async def server(config: NatsConfig) -> AsyncIterator[NatsRpcServer]:
    srv = NatsRpcServer(config)
    srv.add_endpoint("echo", echo)
    srv.add_endpoint("count", count)
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def client(config: NatsConfig) -> AsyncIterator[NatsRpcClient]:
    cli = NatsRpcClient(config)
    yield cli
    await cli.close()


@pytest.fixture
def small_nats() -> Iterator[NatsServer]:
    """A nats-server whose max_payload is 4 KiB."""
    with NatsServer(max_payload=4096, jetstream=False) as srv:
        yield srv


# --- addresses -----------------------------------------------------------------------------------


async def test_address_names_the_subject_not_a_server(
    server: NatsRpcServer, client: NatsRpcClient
) -> None:
    address = server.address
    assert address == f"nats:{server.subject}"
    assert not address.startswith("nats://")
    prefix, token = server.subject.rsplit(".", 1)
    assert prefix == "troupe.rpc"
    assert len(token) == 16
    assert int(token, 16) >= 0
    assert plane_of(address) == "nats"
    assert subject_of(address) == server.subject
    assert await (await client.request(address, "count", b"3")).collect() == [b"0", b"1", b"2"]


@pytest.mark.parametrize(
    "address",
    ["nats://127.0.0.1:4222", "nats:", "nats:a b", "nats:foo.*", "nats:foo.>", "nats:a..b", "x"],
)
async def test_malformed_addresses_are_refused(client: NatsRpcClient, address: str) -> None:
    with pytest.raises(TransportError, match="malformed nats address"):
        await client.request(address, "echo", b"")


async def test_explicit_subject_and_bad_subject(config: NatsConfig, client: NatsRpcClient) -> None:
    with pytest.raises(ConfigError):
        NatsRpcServer(config, subject="no spaces please")
    srv = NatsRpcServer(config, subject="my-team.worker_1")
    srv.add_endpoint("echo", echo)
    with pytest.raises(TransportError, match="not started"):
        _ = srv.address
    await srv.start()
    try:
        assert srv.address == "nats:my-team.worker_1"
        assert await (await client.request(srv.address, "echo", b"x")).collect() == [b"x"]
    finally:
        await srv.close()
    with pytest.raises(TransportClosed):
        await srv.start()


async def test_network_manager_builds_the_nats_plane(config: NatsConfig) -> None:
    manager = NetworkManager(RequestPlaneConfig(plane="NATS"), config)
    srv = manager.create_server()
    assert isinstance(srv, NatsRpcServer)
    srv.add_endpoint("echo", echo)
    await srv.start()
    try:
        caller = manager.client_for(srv.address)
        assert isinstance(caller, NatsRpcClient)
        assert await (await caller.request(srv.address, "echo", b"m")).collect() == [b"m"]
    finally:
        await srv.close()
        await manager.close()


# --- limits --------------------------------------------------------------------------------------


async def test_request_over_max_payload_fails_at_once(small_nats: NatsServer) -> None:
    config = NatsConfig(server=small_nats.url, connect_timeout=2.0)
    started = asyncio.Event()

    async def sink(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        started.set()
        yield b"got"

    async with NatsRpcServer(config) as srv, NatsRpcClient(config) as cli:
        srv.add_endpoint("sink", sink)
        assert await (await cli.request(srv.address, "sink", b"x" * 100)).collect() == [b"got"]
        started.clear()
        began = time.monotonic()
        with pytest.raises(MessageTooLarge) as info:
            await cli.request(srv.address, "sink", b"x" * 5000)
        assert time.monotonic() - began < 0.5
        assert info.value.limit == 4096
        assert info.value.size > 4096
        assert info.value.address == srv.address
        assert "max_payload" in str(info.value)
        # Nothing was published: the handler never ran, and the client still works.
        assert await (await cli.request(srv.address, "sink", b"")).collect() == [b"got"]
        assert started.is_set()


async def test_chunk_over_max_payload_is_reported_to_the_caller(small_nats: NatsServer) -> None:
    config = NatsConfig(server=small_nats.url, connect_timeout=2.0)
    stopped = asyncio.Event()

    async def big(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        try:
            yield b"small"
            yield b"y" * 8000
            yield b"never"
        finally:
            if ctx.is_stopped():
                stopped.set()

    async with NatsRpcServer(config) as srv, NatsRpcClient(config) as cli:
        srv.add_endpoint("big", big)
        stream = await cli.request(srv.address, "big", b"")
        assert await anext(stream) == b"small"
        with pytest.raises(MessageTooLarge) as info:
            await anext(stream)
        assert info.value.limit == 4096
        await asyncio.wait_for(stopped.wait(), 5)


# --- instances going away ------------------------------------------------------------------------


async def test_request_to_a_gone_worker_fails_fast(
    config: NatsConfig, client: NatsRpcClient
) -> None:
    srv = NatsRpcServer(config)
    srv.add_endpoint("echo", echo)
    await srv.start()
    address = srv.address
    await srv.close()
    began = time.monotonic()
    stream = await client.request(address, "echo", b"")
    with pytest.raises(ConnectionLost, match="instance gone"):
        await stream.collect()
    assert time.monotonic() - began < 1.0


async def test_sigkilled_worker_breaks_only_its_streams(
    nats_server: NatsServer, server: NatsRpcServer, config: NatsConfig
) -> None:
    gate = Gate()
    server.add_endpoint("gate", gate)
    worker = WorkerProcess("nats", [nats_server.url])
    try:
        address = await worker.ready()
        async with NatsRpcClient(config, probe_interval=0.1) as cli:
            doomed = [await cli.request(address, "forever", b"") for _ in range(3)]
            for stream in doomed:
                assert await anext(stream) == b"first"
            survivor = await cli.request(server.address, "gate", b"")
            assert await anext(survivor) == b"first"
            worker.kill()
            killed_at = time.monotonic()
            for stream in doomed:
                with pytest.raises(StreamBroken, match="gone"):
                    await asyncio.wait_for(anext(stream), 5)
            assert time.monotonic() - killed_at < 1.5
            # The live worker's stream is untouched and finishes normally.
            gate.release.set()
            assert [chunk async for chunk in survivor] == [b"second"]
    finally:
        worker.close()


async def test_probes_do_not_break_a_long_silent_stream(
    config: NatsConfig, server: NatsRpcServer
) -> None:
    gate = Gate()
    server.add_endpoint("gate", gate)
    async with NatsRpcClient(config, probe_interval=0.02) as cli:
        stream = await cli.request(server.address, "gate", b"")
        assert await anext(stream) == b"first"
        # Let many probe ticks pass while the stream is silent, then finish it.
        ticks = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, ticks.set)
        await ticks.wait()
        gate.release.set()
        assert [chunk async for chunk in stream] == [b"second"]
    assert not gate.stopped.is_set()


async def test_cancel_travels_on_the_control_subject(
    config: NatsConfig, server: NatsRpcServer, client: NatsRpcClient
) -> None:
    gate = Gate()
    server.add_endpoint("gate", gate)
    spy = await nats.connect(config.server)
    seen: list[Msg] = []
    got = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        if msg.data:
            seen.append(msg)
            got.set()

    try:
        await spy.subscribe(server.subject + ".ctl", cb=on_msg)
        await spy.flush()
        stream = await client.request(server.address, "gate", b"")
        assert await anext(stream) == b"first"
        await stream.aclose()
        await asyncio.wait_for(gate.stopped.wait(), 5)
        assert gate.reason == "cancelled"
        await asyncio.wait_for(got.wait(), 5)
        frame = decode(seen[0].data)
        assert isinstance(frame, Cancel)
        assert seen[0].reply.rsplit(".", 1)[1] == str(frame.id)
    finally:
        await spy.close()


async def test_client_close_fails_open_streams(config: NatsConfig, server: NatsRpcServer) -> None:
    gate = Gate()
    server.add_endpoint("gate", gate)
    cli = NatsRpcClient(config)
    stream = await cli.request(server.address, "gate", b"")
    assert await anext(stream) == b"first"
    await cli.close()
    with pytest.raises(TransportClosed):
        await anext(stream)
    with pytest.raises(TransportClosed):
        await cli.request(server.address, "echo", b"")
    await cli.close()  # idempotent


# --- the broker going away -----------------------------------------------------------------------


async def _request_until_ok(cli: Client, address: str, timeout: float) -> list[bytes]:
    """Retry a request while the plane recovers (typed errors only); fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await (await cli.request(address, "echo", b"back")).collect()
        except (ConnectionLost, StreamBroken):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_outage_fails_fast_and_recovers_without_restart(
    fresh_nats_server: NatsServer,
) -> None:
    config = NatsConfig(server=fresh_nats_server.url, connect_timeout=2.0, request_timeout=10.0)
    gate = Gate()
    async with NatsRpcServer(config) as srv, NatsRpcClient(config) as cli:
        srv.add_endpoint("echo", echo)
        srv.add_endpoint("count", count)
        srv.add_endpoint("gate", gate)
        assert await (await cli.request(srv.address, "echo", b"a")).collect() == [b"a"]
        open_stream = await cli.request(srv.address, "gate", b"")
        assert await anext(open_stream) == b"first"

        await asyncio.to_thread(fresh_nats_server.stop)
        # The open stream breaks as soon as the client sees the connection drop ...
        with pytest.raises(StreamBroken, match="NATS connection"):
            await asyncio.wait_for(anext(open_stream), 5)
        # ... the worker stops the request it can no longer answer ...
        await asyncio.wait_for(gate.stopped.wait(), 5)
        assert gate.reason == "disconnected"
        # ... and new requests fail at once, without waiting for any timeout.
        for _ in range(3):
            began = time.monotonic()
            with pytest.raises(ConnectionLost, match="reconnecting"):
                await cli.request(srv.address, "echo", b"b")
            assert time.monotonic() - began < 0.1

        await asyncio.to_thread(fresh_nats_server.start)
        # Same server and client objects: both reconnect and resubscribe by themselves.
        assert await _request_until_ok(cli, srv.address, 15.0) == [b"back"]
        assert await (await cli.request(srv.address, "count", b"2")).collect() == [b"0", b"1"]


async def test_unreachable_server_fails_within_connect_timeout() -> None:
    config = NatsConfig(server=f"nats://127.0.0.1:{free_port()}", connect_timeout=0.5)
    async with NatsRpcClient(config) as cli:
        began = time.monotonic()
        with pytest.raises(ConnectionLost, match="NATS_SERVER") as info:
            await cli.request("nats:troupe.rpc.0123456789abcdef", "echo", b"")
        assert time.monotonic() - began < 2.0
        assert "DYN_NATS_CONNECT_TIMEOUT" in str(info.value)
    srv = NatsRpcServer(config)
    began = time.monotonic()
    with pytest.raises(ConnectionLost, match="NATS_SERVER"):
        await srv.start()
    assert time.monotonic() - began < 2.0
    await srv.close()


async def test_credentials_are_used_and_a_refusal_is_clear() -> None:
    with NatsServer(user="troupe", password="s3cret", jetstream=False) as broker:
        good = NatsConfig(
            server=broker.url, username="troupe", password="s3cret", connect_timeout=2.0
        )
        async with NatsRpcServer(good) as srv, NatsRpcClient(good) as cli:
            srv.add_endpoint("echo", echo)
            assert await (await cli.request(srv.address, "echo", b"ok")).collect() == [b"ok"]
        bad = NatsConfig(server=broker.url, username="troupe", password="nope", connect_timeout=1)
        async with NatsRpcClient(bad) as cli:
            with pytest.raises(TransportError, match="NATS_SERVER") as info:
                await cli.request("nats:troupe.rpc.x", "echo", b"")
            assert "nope" not in str(info.value)


# --- bad input -----------------------------------------------------------------------------------


def _fuzz_cases(rng: random.Random, n: int, max_payload: int) -> list[bytes]:
    valid = encode(Request(7, "echo", b"payload", None, {"k": "v"}, 0))
    frames = [
        valid,
        encode(Chunk(1, b"x")),
        encode(End(1)),
        encode(Error(1, "ValueError", "x")),
        encode(Cancel(12345)),
    ]
    odd_shapes: list[object] = [
        ["req"],
        ["req", 1],
        ["req", "id", 5, b"", None],
        ["req", 1, "echo", "not bytes"],
        ["req", 1.5, "echo", b""],
        ["req", 1, "echo", b"", "soon"],
        ["req", 1, "echo", b"", None, {"k": 1}],
        ["req", 1, "echo", b"", None, {}, "x"],
        ["nope", 1],
        {"req": 1},
        [],
        None,
        2**63,
        "req",
        [[["deep"]]],
    ]
    cases: list[bytes] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            cases.append(rng.randbytes(rng.randrange(1, 200)))
        elif kind == 1:
            cases.append(valid[: rng.randrange(1, len(valid))])
        elif kind == 2:
            cases.append(msgspec.msgpack.encode(rng.choice(odd_shapes)))
        elif kind == 3:
            flipped = bytearray(valid)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            cases.append(bytes(flipped))
        elif kind == 4:
            cases.append(rng.choice(frames))
        elif rng.random() < 0.02:
            cases.append(rng.randbytes(max_payload))  # as large as the broker lets through
        else:
            endpoint = rng.choice(["echo", "count", "nope", ""])
            ids: list[int | str] = [rng.randrange(-(2**63), 2**63), "str-id", ""]
            rid = rng.choice(ids)
            cases.append(encode(Request(rid, endpoint, rng.randbytes(rng.randrange(0, 8)))))
    return cases


async def test_fuzzed_messages_leave_the_worker_serving_others(
    config: NatsConfig, server: NatsRpcServer, client: NatsRpcClient
) -> None:
    rng = random.Random(20240604)
    raw = await nats.connect(config.server)
    replies: list[Msg] = []
    sentinel = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        if msg.subject.endswith(".sentinel"):
            sentinel.set()
        else:
            replies.append(msg)

    try:
        inbox = raw.new_inbox()
        await raw.subscribe(inbox + ".*", cb=on_reply)
        cases = _fuzz_cases(rng, 3000, raw.max_payload)

        async def fuzz() -> None:
            for i, data in enumerate(cases):
                subject = server.subject if i % 4 else server.subject + ".ctl"
                reply = f"{inbox}.{i}" if i % 3 else ""
                await raw.publish(subject, data, reply=reply)
                if i % 200 == 0:
                    await raw.flush()
            # The worker handles its subscription in order: once the sentinel is answered, every
            # fuzzed message before it has been dealt with.
            sentinel_request = encode(Request("sentinel", "echo", b""))
            await raw.publish(server.subject, sentinel_request, reply=inbox + ".sentinel")
            await asyncio.wait_for(sentinel.wait(), 20)

        async def legit() -> list[list[bytes]]:
            results = []
            for i in range(200):
                stream = await client.request(server.address, "echo", str(i).encode())
                results.append(await stream.collect())
            return results

        _, results = await asyncio.wait_for(asyncio.gather(fuzz(), legit()), 30)
        assert results == [[str(i).encode()] for i in range(200)]
        # The worker is still healthy and answers errors with the right types.
        assert await (await client.request(server.address, "count", b"2")).collect() == [
            b"0",
            b"1",
        ]
        with pytest.raises(UnknownEndpoint):
            await (await client.request(server.address, "nope", b"")).collect()
        with pytest.raises(RemoteError, match="ValueError"):
            await (await client.request(server.address, "count", b"xyz")).collect()
        # Some fuzzed requests were well-formed and got answers (errors or chunks); nothing hangs.
        assert replies
        for msg in replies:
            assert isinstance(decode(msg.data), Chunk | End | Error)
        await eventually_async(lambda: server.inflight == 0, what="fuzzed requests finished")
    finally:
        await raw.close()


async def test_garbage_on_a_client_inbox_is_ignored(
    config: NatsConfig, server: NatsRpcServer, client: NatsRpcClient
) -> None:
    gate = Gate()
    server.add_endpoint("gate", gate)
    stream = await client.request(server.address, "gate", b"")
    assert await anext(stream) == b"first"
    raw = await nats.connect(config.server)
    try:
        # Forge replies for the open stream's inbox: garbage is dropped, a bad id is ignored.
        inbox_subjects = [f"{client._inbox}{n}" for n in range(1, 5)]
        rng = random.Random(7)
        for _ in range(300):
            await raw.publish(rng.choice(inbox_subjects), rng.randbytes(rng.randrange(1, 64)))
        await raw.publish(inbox_subjects[0], encode(Chunk("not-an-int", b"x")))
        await raw.flush()
    finally:
        await raw.close()
    gate.release.set()
    assert [chunk async for chunk in stream] == [b"second"]


# --- callers that read no replies ----------------------------------------------------------------


async def test_a_caller_that_reads_no_replies_holds_a_bounded_share(
    config: NatsConfig, server: NatsRpcServer, client: NatsRpcClient
) -> None:
    release = asyncio.Event()

    async def hold(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        await release.wait()
        yield payload

    server.add_endpoint("hold", hold)
    runner = server._runner
    flood = 20_000
    raw = await nats.connect(config.server)
    answered: asyncio.Queue[Msg] = asyncio.Queue()

    async def publish(rid: int | str, reply: str) -> None:
        await raw.publish(server.subject, encode(Request(rid, "hold", b"x")), reply=reply)

    async def sentinel(inbox: str) -> Error:
        # The worker handles its subscription in order: once the sentinel is answered (refused:
        # its inbox is at its limit), every request published before it has been dealt with.
        await raw.subscribe(f"{inbox}.sentinel", cb=answered.put)
        await publish("sentinel", f"{inbox}.sentinel")
        frame = decode((await asyncio.wait_for(answered.get(), 30)).data)
        assert isinstance(frame, Error)
        return frame

    try:
        # One caller (one inbox, which nobody reads) floods a slow endpoint: it gets its share.
        for i in range(flood):
            await publish(i, f"_INBOX.silent.{i}")
        refusal = await sentinel("_INBOX.silent")
        assert refusal.kind == "Overloaded"
        assert server.inflight == runner.max_inflight_per_caller == 512
        refused = server.metrics.refused()
        assert refused == {"max_inflight_per_caller": flood - 512 + 1}
        # Others are served meanwhile.
        assert await (await client.request(server.address, "echo", b"hi")).collect() == [b"hi"]
        # A caller changing its inbox for every request meets the worker's total limit.
        for i in range(2_000):
            await publish(i, f"_INBOX.rotating{i}.{i}")
        await sentinel("_INBOX.silent")  # refused too: the worker is full
        assert server.inflight == runner.max_inflight == 1024
        assert server.metrics.refused()["max_inflight"] == 2_000 - 512 + 1
    finally:
        release.set()
        await raw.close()
    await eventually_async(lambda: server.inflight == 0, what="held requests finished")
    assert runner.callers == 0
