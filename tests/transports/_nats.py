"""Helpers of the NATS request plane's tests (``test_nats_plane*.py``): handlers, and a server,
a client and their settings as fixtures (on the session's nats-server, or a small one)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from troupe import RequestContext
from troupe.config import NatsConfig
from troupe.testing import NatsServer
from troupe.transports.nats import NatsRpcClient, NatsRpcServer


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
