"""The plane table: every transport the conformance and fuzz suites run against.

Adding a plane is one entry in ``PLANES``: how to build its settings (loopback only), how to
open a raw connection to a server for the fuzz suite, and which server port variable the
port-in-use test checks. A plane whose module is not written yet is skipped, not failed.
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
import zmq

from troupe.config import HttpConfig, NatsConfig, RequestPlaneConfig, TcpConfig
from troupe.errors import ProtocolError
from troupe.messages import Chunk, End, Request, encode
from troupe.messages._frames import decode_message
from troupe.transports import (
    Client,
    InprocRegistry,
    InprocServer,
    NetworkManager,
    Server,
    TransportSettings,
)

WORKER_SCRIPT = Path(__file__).with_name("_worker.py")
# The largest request the conformance planes accept (kept small so limit tests stay cheap).
TEST_LIMIT = 1024 * 1024


class RawPeer:
    """Sends bytes straight at a server, bypassing the client (fuzz suite)."""

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def send_parts(self, parts: list[bytes]) -> None:
        """Send several frames as one transport message, where the transport has such a thing."""
        for part in parts:
            await self.send(part)

    async def roundtrip(self, request_id: int, timeout: float = 10.0) -> None:
        """Send a valid echo request and wait for its End: everything sent before was read."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


def _ends(data: bytes, request_id: int) -> bool:
    try:
        frames = decode_message(data)  # one frame, or a batch of them (tcp)
    except ProtocolError:
        return False
    return any(
        (isinstance(frame, End) or (isinstance(frame, Chunk) and frame.end))
        and frame.id == request_id
        for frame in frames
    )


class _InprocRawPeer(RawPeer):
    def __init__(self, server: Server) -> None:
        assert isinstance(server, InprocServer)
        self._server = server
        self.replies: list[bytes] = []
        self._arrived = asyncio.Event()

    def _reply(self, data: bytes) -> bool:
        self.replies.append(data)
        self._arrived.set()
        return True

    async def send(self, data: bytes) -> None:
        self._server.feed(data, self, self._reply)

    async def roundtrip(self, request_id: int, timeout: float = 10.0) -> None:
        await self.send(encode(Request(request_id, "echo", b"")))
        async with asyncio.timeout(timeout):
            while not any(_ends(reply, request_id) for reply in self.replies):
                self._arrived.clear()
                await self._arrived.wait()

    async def close(self) -> None:
        return None


class _ZmqRawPeer(RawPeer):
    """A plain DEALER socket used from the test's loop thread only."""

    def __init__(self, address: str) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        self._sock.connect(address)

    async def send(self, data: bytes) -> None:
        await self.send_parts([data])

    async def send_parts(self, parts: list[bytes]) -> None:
        for _ in range(1000):
            try:
                self._sock.send_multipart(parts, zmq.NOBLOCK)
                return
            except zmq.Again:
                await asyncio.sleep(0.001)
        raise AssertionError("raw peer could not send for 1 s")

    async def roundtrip(self, request_id: int, timeout: float = 10.0) -> None:
        await self.send(encode(Request(request_id, "echo", b"")))
        async with asyncio.timeout(timeout):
            while True:
                while self._sock.poll(0):
                    if any(_ends(part, request_id) for part in self._sock.recv_multipart()):
                        return
                await asyncio.sleep(0.001)

    async def close(self) -> None:
        self._sock.close(0)
        await asyncio.to_thread(self._ctx.term)


class _HttpRawPeer(RawPeer):
    """POSTs arbitrary bodies at the worker's endpoint route over HTTP/2."""

    def __init__(self, address: str) -> None:
        import httpx  # noqa: PLC0415 - only the http plane needs it

        self._url = address + "/fuzz"
        self._http = httpx.AsyncClient(http1=False, http2=True, timeout=10.0, trust_env=False)

    async def send(self, data: bytes) -> None:
        response = await self._http.post(self._url, content=data)
        assert response.status_code < 500, response.status_code

    async def roundtrip(self, request_id: int, timeout: float = 10.0) -> None:
        response = await self._http.post(
            self._url, content=encode(Request(request_id, "echo", b"")), timeout=timeout
        )
        assert response.status_code == 200

    async def close(self) -> None:
        await self._http.aclose()


@dataclass
class Plane:
    """One transport under test.

    Attributes:
        name: the plane name (``PLANES`` key of the network manager).
        settings: loopback-only settings for servers and clients built by :meth:`server`.
        port_variable: the environment variable of the server port (port-in-use test).
        request_limit: the largest request its clients send (``None``: not enforced here).
        raw: opens a :class:`RawPeer` to a started server (fuzz suite); ``None`` if not written.
        remote: whether workers can run in another process (subprocess tests).
        fuzz_cases: how many malformed inputs the fuzz suite sends.
        worker_args: extra arguments for ``_worker.py`` (e.g. the NATS URL).
    """

    name: str
    settings: TransportSettings
    port_variable: str | None = None
    request_limit: int | None = None
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
        return _InprocRawPeer(server)

    return Plane(
        "inproc",
        TransportSettings(
            _loopback_plane_config("inproc"),
            NatsConfig(),
            InprocRegistry(max_message_size=TEST_LIMIT),
        ),
        request_limit=TEST_LIMIT,
        raw=raw,
        remote=False,
    )


def _tcp(request: pytest.FixtureRequest) -> Plane:
    async def raw(server: Server) -> RawPeer:
        return _ZmqRawPeer(server.address)

    return Plane(
        "tcp",
        TransportSettings(_loopback_plane_config("tcp")),
        "DYN_TCP_RPC_PORT",
        request_limit=TEST_LIMIT,
        raw=raw,
    )


def _http(request: pytest.FixtureRequest) -> Plane:
    from troupe.transports.http2 import DEFAULT_MAX_MESSAGE_SIZE  # noqa: PLC0415

    async def raw(server: Server) -> RawPeer:
        return _HttpRawPeer(server.address)

    return Plane(
        "http",
        TransportSettings(_loopback_plane_config("http")),
        "DYN_HTTP_RPC_PORT",
        request_limit=DEFAULT_MAX_MESSAGE_SIZE,  # no DYN_HTTP_* variable sets it
        raw=raw,
        # Each case is a whole HTTP/2 request (milliseconds of httpx); test_http2.py fuzzes more.
        fuzz_cases=2000,
    )


def _nats(request: pytest.FixtureRequest) -> Plane:
    import nats as nats_py  # only this row needs nats-py itself  # noqa: PLC0415

    from troupe.transports.nats import subject_of  # noqa: PLC0415

    server: Any = request.getfixturevalue("nats_server")
    nats = NatsConfig(server=server.url, connect_timeout=2.0, request_timeout=10.0)

    class NatsRawPeer(RawPeer):
        """Publishes bytes on the worker's subject, with replies to an inbox of its own."""

        def __init__(self, nc: Any, subject: str) -> None:
            self._nc = nc
            self._subject = subject
            self._inbox = nc.new_inbox()
            self._sent = 0
            self.replies: list[bytes] = []
            self._arrived = asyncio.Event()

        async def start(self) -> None:
            async def on_reply(msg: Any) -> None:
                self.replies.append(msg.data)
                self._arrived.set()

            await self._nc.subscribe(self._inbox + ".*", cb=on_reply)

        async def send(self, data: bytes) -> None:
            self._sent += 1
            if len(data) > self._nc.max_payload:
                await self._send_oversized(data)
                return
            reply = f"{self._inbox}.{self._sent}" if self._sent % 3 else ""
            await self._nc.publish(self._subject, data, reply=reply)

        async def _send_oversized(self, data: bytes) -> None:
            # nats-py refuses to publish it, so speak the protocol on a socket of its own: the
            # broker answers -ERR and drops that connection; the worker never sees the message.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                await reader.readline()  # INFO
                head = f"CONNECT {{}}\r\nPUB {self._subject} {len(data)}\r\n".encode()
                with contextlib.suppress(OSError):
                    writer.write(head + data + b"\r\n")
                    await writer.drain()
                    await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        async def roundtrip(self, request_id: int, timeout: float = 10.0) -> None:
            await self._nc.publish(
                self._subject,
                encode(Request(request_id, "echo", b"")),
                reply=f"{self._inbox}.rt{request_id}",
            )
            async with asyncio.timeout(timeout):
                while not any(_ends(reply, request_id) for reply in self.replies):
                    self._arrived.clear()
                    await self._arrived.wait()

        async def close(self) -> None:
            await self._nc.close()

    async def raw(target: Server) -> RawPeer:
        peer = NatsRawPeer(await nats_py.connect(server.url), subject_of(target.address))
        await peer.start()
        return peer

    return Plane(
        "nats",
        TransportSettings(_loopback_plane_config("nats"), nats),
        # The session's server keeps nats-server's default max_payload: 1 MiB.
        request_limit=TEST_LIMIT,
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
