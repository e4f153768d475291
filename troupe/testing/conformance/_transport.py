"""The transport kit's subject: :class:`TransportUnderTest` (how to build the servers and
clients of the transport checked, and what it supports), and the per-check session that builds
them and closes them again.

The checks themselves live in :mod:`troupe.testing.conformance._transport_calls` (streaming,
errors, deadlines, limits) and :mod:`troupe.testing.conformance._transport_stops`
(cancellation, timeouts, closing, ports, a killed worker).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from troupe.testing.conformance._check import Check
from troupe.transports import Client, Handler, RequestContext, Server

__all__ = [
    "WORKER_ENDPOINTS",
    "PortSetting",
    "TransportSession",
    "TransportUnderTest",
    "WorkerProcess",
    "transport_check",
]


class WorkerProcess(Protocol):
    """A worker in another process that serves :data:`WORKER_ENDPOINTS` on the transport."""

    @property
    def address(self) -> str:
        """The address its server reports."""
        ...

    def kill(self) -> None:
        """Kill the process at once (SIGKILL): it says no goodbye on the wire."""
        ...

    async def aclose(self) -> None:
        """Stop the process if it still runs, and reap it. Idempotent."""
        ...


@dataclass(frozen=True)
class PortSetting:
    """How the transport's servers are given a port (the port-in-use check).

    Attributes:
        variable: the environment variable that sets the port; a server that cannot bind it
            must raise :class:`~troupe.errors.ConfigError` naming it.
        server: builds a new, unstarted server that will bind the given port.
    """

    variable: str
    server: Callable[[int], Server]


@dataclass(frozen=True)
class TransportUnderTest:
    """The transport a kit checks: factories of its servers and clients, and what it supports.

    Each check builds the servers and clients it needs with these factories and closes them when
    it ends. The optional attributes turn on the checks that need them (see ``Check.needs``).

    Attributes:
        server: builds a new, unstarted server that listens on an address of its own.
        client: builds a new client that reaches those servers.
        timed_client: builds a client whose request timeout (the longest wait for the next
            reply frame) is the given number of seconds.
        request_limit: the largest payload its clients send; one byte more is refused with
            ``MessageTooLarge`` before anything is sent.
        reply_limit: the largest chunk its servers send; a handler that yields more ends its
            stream with ``MessageTooLarge``.
        port: how its servers are given a port, for a transport configured by port.
        worker: starts a worker process serving :data:`WORKER_ENDPOINTS` and waits until it
            serves.
    """

    server: Callable[[], Server]
    client: Callable[[], Client]
    timed_client: Callable[[float], Client] | None = None
    request_limit: int | None = None
    reply_limit: int | None = None
    port: PortSetting | None = None
    worker: Callable[[], Awaitable[WorkerProcess]] | None = None


async def _echo(payload: bytes, ctx: RequestContext) -> bytes:
    return payload


async def _forever(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield b"first"
    await asyncio.Event().wait()


WORKER_ENDPOINTS: dict[str, Handler] = {"echo": _echo, "forever": _forever}
"""What a :class:`WorkerProcess` serves: ``echo`` answers its payload; ``forever`` yields
``b"first"`` and then nothing until it is stopped."""


class TransportSession:
    """What one check builds of the transport; everything is closed when the check ends."""

    def __init__(self, subject: TransportUnderTest, stack: contextlib.AsyncExitStack) -> None:
        self.subject = subject
        self._stack = stack

    def unstarted_server(self) -> Server:
        """A new server, not started (closed when the check ends)."""
        server = self.subject.server()
        self._stack.push_async_callback(server.close)
        return server

    async def server(self, **endpoints: Handler) -> Server:
        """A started server serving ``endpoints`` (name=handler)."""
        server = self.unstarted_server()
        for name, handler in endpoints.items():
            server.add_endpoint(name, handler)
        await server.start()
        return server

    def client(self) -> Client:
        """A new client."""
        client = self.subject.client()
        self._stack.push_async_callback(client.close)
        return client

    def timed_client(self, request_timeout: float) -> Client:
        """A new client with the given request timeout."""
        assert self.subject.timed_client is not None
        client = self.subject.timed_client(request_timeout)
        self._stack.push_async_callback(client.close)
        return client

    def port_server(self, port: int) -> Server:
        """A new, unstarted server for ``port``."""
        assert self.subject.port is not None
        server = self.subject.port.server(port)
        self._stack.push_async_callback(server.close)
        return server

    async def worker(self) -> WorkerProcess:
        """A worker process, serving."""
        assert self.subject.worker is not None
        worker = await self.subject.worker()
        self._stack.push_async_callback(worker.aclose)
        return worker


def transport_check(
    *needs: str,
) -> Callable[[Callable[[TransportSession], Awaitable[None]]], Check[TransportUnderTest]]:
    """Make a :class:`Check` of an async function of a :class:`TransportSession`; its name is
    the function's, its doc the docstring's first line."""

    def wrap(func: Callable[[TransportSession], Awaitable[None]]) -> Check[TransportUnderTest]:
        async def run(subject: TransportUnderTest) -> None:
            async with contextlib.AsyncExitStack() as stack:
                await func(TransportSession(subject, stack))

        doc = (func.__doc__ or "").strip().split("\n")[0]
        return Check(func.__name__, doc, needs, run)

    return wrap


async def collect(client: Client, address: str, endpoint: str, payload: bytes) -> list[bytes]:
    """Send one request and read its whole answer."""
    return await (await client.request(address, endpoint, payload)).collect()


class Blocker:
    """A handler that yields one chunk, then waits until it is stopped; records what it saw."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.cancelled_at = 0.0
        self.stopped_seen = False
        self.reason: str | None = None

    async def __call__(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        self.started.set()
        yield b"first"
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled_at = asyncio.get_running_loop().time()
            self.stopped_seen = ctx.is_stopped()
            self.reason = ctx.stop_reason
            self.cancelled.set()
            raise


async def echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    """Yields its payload."""
    yield payload
