"""A handler that raises: its caller gets a typed error naming the exception on every plane, and
through ``Router.generate``; the worker logs the traceback (and, at debug level, sends it)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from troupe import Config, RequestContext, Runtime
from troupe._support._logging import configure_logging
from troupe.config import (
    DiscoveryConfig,
    HttpConfig,
    LogConfig,
    NatsConfig,
    RequestPlaneConfig,
    TcpConfig,
)
from troupe.errors import RemoteError

from .conftest import Plane


async def boom(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    raise ValueError("boom")
    yield b""


@pytest.mark.parametrize("level", ["debug", "info"])
async def test_the_caller_gets_the_remote_type_and_message_on_every_plane(
    plane: Plane, level: str
) -> None:
    log = io.StringIO()
    configure_logging(LogConfig(level=level, json=True), stream=log)
    server = await plane.server()
    server.add_endpoint("boom", boom)
    client = plane.client()
    with pytest.raises(RemoteError) as info:
        await (await client.request(server.address, "boom", b"")).collect()
    error = info.value
    assert (error.kind, error.remote_message) == ("ValueError", "boom")
    assert (error.endpoint, error.address) == ("boom", server.address)
    assert str(error) == f"handler raised ValueError: boom (boom at {server.address})"
    if level == "debug":
        assert "in boom" in error.remote_traceback
        assert error.remote_traceback.rstrip().endswith("ValueError: boom")
    else:
        assert error.remote_traceback == ""
    logged = [
        json.loads(line)
        for line in log.getvalue().splitlines()
        if '"troupe.transports.failures"' in line
    ]
    assert [(line["endpoint"], line["error"]) for line in logged] == [("boom", "ValueError: boom")]
    assert 'raise ValueError("boom")' in logged[0]["exception"]


@pytest.fixture(params=["tcp", "http", "nats"])
def config(request: pytest.FixtureRequest) -> Config:
    nats = NatsConfig()
    if request.param == "nats":
        nats = NatsConfig(server=request.getfixturevalue("nats_server").url)
    return Config(
        discovery=DiscoveryConfig(kv_store="memory"),
        request_plane=RequestPlaneConfig(
            plane=request.param,
            tcp=TcpConfig(host="127.0.0.1"),
            http=HttpConfig(host="127.0.0.1", port=0),
        ),
        nats=nats,
        log=LogConfig(level="debug"),
    )


def test_router_generate_raises_the_remote_error(config: Config) -> None:
    async def handler(request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
        yield {"first": request}
        raise ValueError(f"boom on {request}")

    with Runtime(config, handle_signals=False) as rt:
        rt.serve("demo.backend.boom", handler)
        router = rt.router("demo.backend.boom")
        router.wait_for_instances_sync(timeout=10)
        got: list[Any] = []
        with pytest.raises(RemoteError) as info:
            got.extend(router.generate_sync("sync"))
        assert got == [{"first": "sync"}]
        assert (info.value.kind, info.value.remote_message) == ("ValueError", "boom on sync")
        assert info.value.endpoint == "demo.backend.boom"
        assert str(info.value).startswith("handler raised ValueError: boom on sync (")
        assert "in handler" in info.value.remote_traceback

        async def bridged() -> None:
            with pytest.raises(RemoteError, match="handler raised ValueError: boom on async"):
                async for _ in router.generate("async"):
                    pass

        asyncio.run(bridged())
