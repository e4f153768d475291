"""The in-process transport: explicit registries, names, limits, dropped callers."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest

from troupe.errors import ConfigError, ConnectionLost, MessageTooLarge, TransportClosed
from troupe.transports import InprocClient, InprocRegistry, InprocServer, RequestContext


async def echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield payload


async def test_names_are_per_registry_and_released_on_close() -> None:
    one, two = InprocRegistry(), InprocRegistry()
    a = InprocServer(one, "w")
    b = InprocServer(two, "w")  # same name, other registry: no clash
    await a.start()
    await b.start()
    assert a.address == b.address == "inproc://w"
    clash = InprocServer(one, "w")
    with pytest.raises(ConfigError, match="inproc name"):
        await clash.start()
    await a.close()
    assert "w" not in one
    await clash.start()
    assert one.lookup("w") is clash
    await clash.close()
    await b.close()


async def test_generated_names_are_unique() -> None:
    registry = InprocRegistry()
    servers = [InprocServer(registry) for _ in range(3)]
    for server in servers:
        await server.start()
    assert len({server.address for server in servers}) == 3
    for server in servers:
        await server.close()


async def test_unknown_name_and_closed_client() -> None:
    registry = InprocRegistry()
    client = InprocClient(registry)
    with pytest.raises(ConnectionLost, match="inproc://ghost"):
        await client.request("inproc://ghost", "echo", b"")
    await client.close()
    with pytest.raises(TransportClosed):
        await client.request("inproc://ghost", "echo", b"")


async def test_reply_over_the_limit_is_an_error() -> None:
    registry = InprocRegistry(max_message_size=1000)
    server = InprocServer(registry, max_message_size=1000)

    async def big(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"x" * 2000

    server.add_endpoint("big", big)
    await server.start()
    client = InprocClient(registry, max_message_size=1000)
    with pytest.raises(MessageTooLarge):
        await (await client.request(server.address, "big", b"")).collect()
    await server.close()


async def test_a_dropped_stream_stops_the_handler() -> None:
    registry = InprocRegistry()
    server = InprocServer(registry)
    stopped = asyncio.Event()
    reasons: list[str | None] = []
    go = asyncio.Event()

    async def ticker(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await go.wait()
            while True:
                yield b"more"
        finally:
            reasons.append(ctx.stop_reason)
            stopped.set()

    server.add_endpoint("ticker", ticker)
    await server.start()
    client = InprocClient(registry)
    stream = await client.request(server.address, "ticker", b"")
    assert await anext(stream) == b"first"
    del stream
    gc.collect()
    go.set()
    await asyncio.wait_for(stopped.wait(), 5)
    assert reasons == ["disconnected"]
    await server.close()
