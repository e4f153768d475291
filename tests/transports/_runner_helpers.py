"""Helpers of the RequestRunner tests (``test_runner*.py``): sinks that play the caller,
handlers that hold requests, and troupe's log captured as JSON lines."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from typing import Any

from troupe import RequestContext
from troupe._support._logging import configure_logging
from troupe.config import LogConfig
from troupe.messages import Chunk, Error, Reply, Request
from troupe.testing import eventually_async
from troupe.transports import RequestRunner


class Sink:
    """Collects reply frames; ``accept=False`` plays a caller that went away."""

    def __init__(self, accept: bool = True) -> None:
        self.frames: list[Reply] = []
        self.accept = accept
        self.done = asyncio.Event()

    async def __call__(self, frame: Reply) -> bool:
        self.frames.append(frame)
        if not isinstance(frame, Chunk) or frame.end:
            self.done.set()
        return self.accept


class HeldSend(Sink):
    """A sink whose send of the chunk ``held`` waits for room that never comes (back-pressure)."""

    def __init__(self, held: bytes) -> None:
        super().__init__()
        self.held = held
        self.waiting = asyncio.Event()

    async def __call__(self, frame: Reply) -> bool:
        await super().__call__(frame)
        if isinstance(frame, Chunk) and frame.data == self.held:
            self.waiting.set()
            await asyncio.Event().wait()
        return self.accept


class Held:
    """A handler that waits for :attr:`release` before its one chunk."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        await self.release.wait()
        yield payload


async def wait_idle(runner: RequestRunner) -> None:
    """Wait until the runner holds no request (fail after 5 s)."""
    await eventually_async(lambda: runner.inflight == 0, what="the runner became idle")


def log_to(level: str) -> io.StringIO:
    """Troupe's log, as JSON lines, at ``level`` (conftest's autouse fixture undoes it)."""
    stream = io.StringIO()
    configure_logging(LogConfig(level=level, json=True), stream=stream)
    return stream


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def failures_logged(stream: io.StringIO) -> list[dict[str, Any]]:
    return [line for line in log_lines(stream) if line["logger"] == "troupe.transports.failures"]


async def boom(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    """A handler that fails before its first chunk."""
    raise ValueError("boom")
    yield b""


async def fail(runner: RequestRunner, key: object, rid: int, endpoint: str = "ep") -> Error:
    """Dispatch a request that fails; return its one Error frame."""
    sink = Sink()
    runner.dispatch(key, Request(rid, endpoint, b""), sink)
    await asyncio.wait_for(sink.done.wait(), 5)
    [frame] = sink.frames
    assert isinstance(frame, Error)
    return frame
