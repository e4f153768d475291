"""The NATS request plane under faults: the broker going away and coming back, bad
credentials, garbage on its subjects and inboxes, and callers that read no replies."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from troupe import RequestContext
from troupe.config import NatsConfig
from troupe.errors import (
    ConnectionLost,
    RemoteError,
    StreamBroken,
    TransportError,
    UnknownEndpoint,
)
from troupe.messages import Cancel, Chunk, End, Error, Request, decode, encode
from troupe.testing import NatsServer, eventually_async, free_port
from troupe.transports import Client
from troupe.transports.nats import NatsRpcClient, NatsRpcServer

from . import _nats
from ._nats import Gate, count, echo

# The plane's fixtures (pytest finds fixtures among a module's names).
config = _nats.config
server = _nats.server
client = _nats.client


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
