"""The plane table: every transport the conformance and fuzz suites run against.

Adding a plane is one entry in ``PLANES``: how to build its settings (loopback only), how to
open a raw connection to a server for the fuzz suite (``_raw.py``), and which server port
variable the port-in-use check uses. :meth:`Plane.under_test` describes a plane to the
transport conformance kit (``troupe.testing.conformance``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from troupe.config import HttpConfig, NatsConfig, RequestPlaneConfig, TcpConfig
from troupe.testing.conformance import PortSetting, TransportUnderTest
from troupe.transports import (
    Client,
    InprocClient,
    InprocRegistry,
    NetworkManager,
    Server,
    TransportSettings,
)

from ._raw import HttpRawPeer, InprocRawPeer, NatsRawPeer, RawPeer, ZmqRawPeer

WORKER_SCRIPT = Path(__file__).with_name("_worker.py")
# The largest request the conformance planes accept (kept small so limit tests stay cheap).
TEST_LIMIT = 1024 * 1024


@dataclass
class Plane:
    """One transport under test.

    Attributes:
        name: the plane name (``PLANES`` key of the network manager).
        settings: loopback-only settings for servers and clients built by :meth:`server`.
        port_variable: the environment variable of the server port (port-in-use test).
        request_limit: the largest request its clients send (``None``: not enforced here).
        reply_limit: the largest chunk its servers send.
        raw: opens a :class:`RawPeer` to a started server (fuzz suite); ``None`` if not written.
        remote: whether workers can run in another process (subprocess tests).
        fuzz_cases: how many malformed inputs the fuzz suite sends.
        worker_args: extra arguments for ``_worker.py`` (e.g. the NATS URL).
    """

    name: str
    settings: TransportSettings
    port_variable: str | None = None
    request_limit: int | None = None
    reply_limit: int | None = None
    raw: Callable[[Server], Awaitable[RawPeer]] | None = None
    remote: bool = True
    fuzz_cases: int = 3000
    worker_args: list[str] = field(default_factory=list)
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def manager(self, settings: TransportSettings | None = None) -> NetworkManager:
        s = settings or self.settings
        manager = NetworkManager(s.request_plane, s.nats, s.inproc)
        self._closers.append(manager.close)
        return manager

    async def server(self, settings: TransportSettings | None = None) -> Server:
        """A started server on this plane (closed after the test)."""
        server = self.manager(settings).create_server(self.name)
        await server.start()
        self._closers.append(server.close)
        return server

    def client(self, settings: TransportSettings | None = None) -> Client:
        """A client for this plane (closed after the test)."""
        return self.manager(settings).client(self.name)

    def with_port(self, port: int) -> TransportSettings:
        """Settings whose server binds the given port."""
        rp = self.settings.request_plane
        if self.name == "tcp":
            return replace(self.settings, request_plane=replace(rp, tcp=replace(rp.tcp, port=port)))
        if self.name == "http":
            return replace(
                self.settings, request_plane=replace(rp, http=replace(rp.http, port=port))
            )
        raise AssertionError(f"plane {self.name} has no port")

    def with_request_timeout(self, seconds: float) -> TransportSettings:
        """Settings whose clients wait at most ``seconds`` for the next reply frame."""
        rp, nats = self.settings.request_plane, self.settings.nats
        if self.name == "tcp":
            tcp = replace(rp.tcp, request_timeout=seconds)
            return replace(self.settings, request_plane=replace(rp, tcp=tcp))
        if self.name == "http":
            http = replace(rp.http, request_timeout=seconds)
            return replace(self.settings, request_plane=replace(rp, http=http))
        if self.name == "nats":
            return replace(self.settings, nats=replace(nats, request_timeout=seconds))
        raise AssertionError(f"plane {self.name} has no request timeout setting")

    def timed_client(self, seconds: float) -> Client:
        """A client whose request timeout is ``seconds``."""
        registry = self.settings.inproc
        if registry is not None:  # inproc: the timeout is the registry's, for all its clients
            client = InprocClient(
                registry, max_message_size=registry.max_message_size, request_timeout=seconds
            )
            self._closers.append(client.close)
            return client
        return self.client(self.with_request_timeout(seconds))

    async def worker(self) -> WorkerProcess:
        """A worker process serving on this plane (``_worker.py``), ready."""
        worker = WorkerProcess(self.name, self.worker_args)
        try:
            await worker.ready()
        except BaseException:
            worker.close()
            raise
        return worker

    def under_test(self) -> TransportUnderTest:
        """This plane as the transport conformance kit's subject."""
        port = None
        if self.port_variable is not None:

            def on_port(number: int) -> Server:
                return self.manager(self.with_port(number)).create_server(self.name)

            port = PortSetting(self.port_variable, on_port)
        return TransportUnderTest(
            server=lambda: self.manager().create_server(self.name),
            client=self.client,
            timed_client=self.timed_client,
            request_limit=self.request_limit,
            reply_limit=self.reply_limit,
            port=port,
            worker=self.worker if self.remote else None,
        )

    async def aclose(self) -> None:
        for closer in reversed(self._closers):
            await closer()


def _loopback_plane_config(plane: str) -> RequestPlaneConfig:
    return RequestPlaneConfig(
        plane=plane if plane != "inproc" else "tcp",
        tcp=TcpConfig(host="127.0.0.1", max_message_size=TEST_LIMIT, request_timeout=10.0),
        http=HttpConfig(host="127.0.0.1", port=0),
    )


def _inproc(request: pytest.FixtureRequest) -> Plane:
    async def raw(server: Server) -> RawPeer:
        return InprocRawPeer(server)

    return Plane(
        "inproc",
        TransportSettings(
            _loopback_plane_config("inproc"),
            NatsConfig(),
            InprocRegistry(max_message_size=TEST_LIMIT),
        ),
        request_limit=TEST_LIMIT,
        reply_limit=TEST_LIMIT,
        raw=raw,
        remote=False,
    )


def _tcp(request: pytest.FixtureRequest) -> Plane:
    async def raw(server: Server) -> RawPeer:
        return ZmqRawPeer(server.address)

    return Plane(
        "tcp",
        TransportSettings(_loopback_plane_config("tcp")),
        "DYN_TCP_RPC_PORT",
        request_limit=TEST_LIMIT,
        reply_limit=TEST_LIMIT,
        raw=raw,
    )


def _http(request: pytest.FixtureRequest) -> Plane:
    from troupe.transports.http2 import DEFAULT_MAX_MESSAGE_SIZE  # noqa: PLC0415

    async def raw(server: Server) -> RawPeer:
        return HttpRawPeer(server.address)

    return Plane(
        "http",
        TransportSettings(_loopback_plane_config("http")),
        "DYN_HTTP_RPC_PORT",
        request_limit=DEFAULT_MAX_MESSAGE_SIZE,  # no DYN_HTTP_* variable sets it
        reply_limit=DEFAULT_MAX_MESSAGE_SIZE,
        raw=raw,
        # Each case is a whole HTTP/2 request (milliseconds of httpx); test_http2.py fuzzes more.
        fuzz_cases=2000,
    )


def _nats(request: pytest.FixtureRequest) -> Plane:
    import nats as nats_py  # only this row needs nats-py itself  # noqa: PLC0415

    from troupe.transports.nats import subject_of  # noqa: PLC0415

    server: Any = request.getfixturevalue("nats_server")
    nats = NatsConfig(server=server.url, connect_timeout=2.0, request_timeout=10.0)

    async def raw(target: Server) -> RawPeer:
        peer = NatsRawPeer(
            await nats_py.connect(server.url), subject_of(target.address), server.port
        )
        await peer.start()
        return peer

    return Plane(
        "nats",
        TransportSettings(_loopback_plane_config("nats"), nats),
        # The session's server keeps nats-server's default max_payload: 1 MiB.
        request_limit=TEST_LIMIT,
        reply_limit=TEST_LIMIT,
        raw=raw,
        worker_args=[server.url],
    )


PLANES: dict[str, Callable[[pytest.FixtureRequest], Plane]] = {
    "inproc": _inproc,
    "tcp": _tcp,
    "http": _http,
    "nats": _nats,
}


REMOTE_PLANES = tuple(name for name in PLANES if name != "inproc")
"""Planes whose workers can run in another process."""
PORTED_PLANES = ("tcp", "http")
"""Planes whose servers listen on a configurable port (the port-in-use test)."""


async def _harness(request: pytest.FixtureRequest, name: str) -> AsyncIterator[Plane]:
    harness = PLANES[name](request)
    try:
        yield harness
    finally:
        await harness.aclose()


@pytest.fixture(params=list(PLANES))
async def plane(request: pytest.FixtureRequest) -> AsyncIterator[Plane]:
    """Each plane in turn."""
    async for harness in _harness(request, request.param):
        yield harness


@pytest.fixture(params=list(REMOTE_PLANES))
async def remote_plane(request: pytest.FixtureRequest) -> AsyncIterator[Plane]:
    """Each plane whose workers can run in another process."""
    async for harness in _harness(request, request.param):
        assert harness.remote
        yield harness


@pytest.fixture(params=list(PORTED_PLANES))
async def ported_plane(request: pytest.FixtureRequest) -> AsyncIterator[Plane]:
    """Each plane whose server port is set by an environment variable."""
    async for harness in _harness(request, request.param):
        assert harness.port_variable is not None
        yield harness


# --- worker subprocesses -------------------------------------------------------------------------


class WorkerProcess:
    """A worker in a child process (``_worker.py``): serves test endpoints on one plane."""

    def __init__(self, plane: str, args: list[str]) -> None:
        env = dict(os.environ)  # already scrubbed of troupe variables by conftest._scrub_env
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), plane, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.address = ""

    async def ready(self, timeout: float = 20.0) -> str:
        """Wait for the worker's address line."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        if not line:
            raise AssertionError(f"worker exited early with {self.proc.wait()}")
        self.address = line.strip()
        return self.address

    def kill(self) -> None:
        """SIGKILL: the worker says no goodbye."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.to_thread(self.close)


@pytest.fixture
def spawn_worker() -> Iterator[Callable[[Plane], WorkerProcess]]:
    """Start worker processes; every one is killed and reaped after the test."""
    workers: list[WorkerProcess] = []

    def spawn(plane: Plane) -> WorkerProcess:
        worker = WorkerProcess(plane.name, plane.worker_args)
        workers.append(worker)
        return worker

    yield spawn
    for worker in workers:
        worker.close()
