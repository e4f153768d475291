"""The NATS request plane: what only NATS shows (addresses, max_payload, instances going away,
probes, the control subject). Broker outages and hostile input are in
``test_nats_plane_faults.py``.

The shared semantics (streaming, cancellation, deadlines, errors, a SIGKILLed worker) are in the
conformance suite; these tests use real nats-servers started by the ``troupe.testing`` fixtures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.msg import Msg

from troupe import RequestContext
from troupe.config import NatsConfig, RequestPlaneConfig
from troupe.errors import (
    ConfigError,
    ConnectionLost,
    MessageTooLarge,
    StreamBroken,
    TransportClosed,
    TransportError,
)
from troupe.messages import Cancel, decode
from troupe.testing import NatsServer
from troupe.transports import NetworkManager
from troupe.transports._manager import plane_of
from troupe.transports.nats import NatsRpcClient, NatsRpcServer, subject_of

from . import _nats
from ._nats import Gate, echo
from .conftest import WorkerProcess

# The plane's fixtures (pytest finds fixtures among a module's names).
config = _nats.config
server = _nats.server
client = _nats.client
small_nats = _nats.small_nats

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
        # <inbox>.<id>.<token>, with the request's cancel key in a header.
        assert seen[0].reply.split(".")[-2] == str(frame.id)
        assert seen[0].headers is not None
        assert seen[0].headers.get("Troupe-Cancel-Key")
    finally:
        await spy.close()
