"""Fixtures of the frontend tests: workers and a frontend in this process, on shared memory
discovery and the TCP plane on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from troupe import Config, Runtime
from troupe.config import DiscoveryConfig, LogConfig, RequestPlaneConfig, TcpConfig
from troupe.discovery import MemoryKvServer
from troupe.frontend import Frontend, FrontendSettings
from troupe.testing import eventually_async

from ._http import FAST

PLANE = RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1", connect_timeout=0.5))
CONFIG = Config(
    discovery=DiscoveryConfig(kv_store="memory"),
    request_plane=PLANE,
    log=LogConfig(level="error"),
)


@pytest.fixture
def kv() -> MemoryKvServer:
    return MemoryKvServer()


class Workers:
    """Starts worker runtimes on the shared memory store; closes them all at the end."""

    def __init__(self, kv: MemoryKvServer) -> None:
        self._kv = kv
        self.runtimes: list[Runtime] = []

    async def serve(
        self,
        endpoint: str,
        handler: Callable[..., Any],
        model: str | None = "mock",
        **kwargs: Any,
    ) -> Runtime:
        """A new runtime (own instance id and lease) serving ``handler``."""

        def start() -> Runtime:
            rt = Runtime(CONFIG, handle_signals=False, memory_server=self._kv).start()
            self.runtimes.append(rt)
            rt.serve(endpoint, handler, metadata={"model": model} if model else None, **kwargs)
            return rt

        return await asyncio.to_thread(start)

    async def stop(self, rt: Runtime) -> None:
        await asyncio.to_thread(rt.close)

    def close(self) -> None:
        for rt in self.runtimes:
            rt.close()


@pytest.fixture
def workers(kv: MemoryKvServer) -> Iterator[Workers]:
    box = Workers(kv)
    try:
        yield box
    finally:
        box.close()


@pytest.fixture
def settings() -> FrontendSettings:
    return FrontendSettings(host="127.0.0.1", port=0, grace=1.0, instance_wait=0.3)


@contextlib.asynccontextmanager
async def running_frontend(
    kv: MemoryKvServer, settings: FrontendSettings, **changes: Any
) -> AsyncIterator[Frontend]:
    """A frontend (in its own runtime) with ``settings`` and ``changes`` to them."""
    rt = Runtime(CONFIG, handle_signals=False, memory_server=kv).start()
    try:
        async with Frontend(rt, dataclasses.replace(settings, **changes)) as fe:
            yield fe
    finally:
        await asyncio.to_thread(rt.close)


@pytest.fixture
async def frontend(kv: MemoryKvServer, settings: FrontendSettings) -> AsyncIterator[Frontend]:
    async with running_frontend(kv, settings) as fe:
        yield fe


@pytest.fixture
async def http(frontend: Frontend) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=frontend.url, limits=limits, timeout=10) as client:
        yield client


@pytest.fixture
async def mock(frontend: Frontend, workers: Workers) -> None:
    """The fast mock engine serves model ``mock``, and the frontend lists it."""
    await workers.serve("demo.mocker.generate", FAST, model="mock")
    await wait_for_model(frontend, "mock")


async def wait_for_model(fe: Frontend, model: str, *, present: bool = True) -> None:
    await eventually_async(
        lambda: (fe.registry.get(model) is not None) == present,
        timeout=5,
        what=f"model {model} {'listed' if present else 'gone'}",
    )
