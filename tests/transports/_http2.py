"""Helpers of the HTTP/2 plane's tests (``test_http2*.py``): a loopback server and a client as
fixtures, handlers, and the plane's running tasks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from troupe import RequestContext
from troupe.config import HttpConfig
from troupe.transports.http2 import Http2Client, Http2Server

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


def our_tasks() -> list[str]:
    """The names of the http2 plane's running tasks."""
    return sorted(
        t.get_name()
        for t in asyncio.all_tasks()
        if t.get_name().startswith("http2-") and not t.done()
    )
