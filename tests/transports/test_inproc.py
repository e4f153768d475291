"""The in-process transport: explicit registries, names, limits, dropped callers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from troupe import RequestContext
from troupe.errors import ConfigError, ConnectionLost, TransportClosed
from troupe.transports import InprocClient, InprocRegistry, InprocServer


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
