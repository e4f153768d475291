"""Raw peers for the fuzz suite: bytes sent straight at a server, bypassing troupe's clients.

One class per plane; the plane table in ``conftest.py`` says which one opens a peer to a server.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import zmq

from troupe.errors import ProtocolError
from troupe.messages import Chunk, End, Request, encode
from troupe.messages._frames import decode_message
from troupe.transports import InprocServer, Server


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


class InprocRawPeer(RawPeer):
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


class ZmqRawPeer(RawPeer):
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
                await asyncio.sleep(0.001)  # the send queue is full: retry (1 s in all)
        raise AssertionError("raw peer could not send for 1 s")

    async def roundtrip(self, request_id: int, timeout: float = 10.0) -> None:
        await self.send(encode(Request(request_id, "echo", b"")))
        async with asyncio.timeout(timeout):
            while True:
                while self._sock.poll(0):
                    if any(_ends(part, request_id) for part in self._sock.recv_multipart()):
                        return
                await asyncio.sleep(0.001)  # poll the socket until the deadline

    async def close(self) -> None:
        self._sock.close(0)
        await asyncio.to_thread(self._ctx.term)


class HttpRawPeer(RawPeer):
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


class NatsRawPeer(RawPeer):
    """Publishes bytes on the worker's subject, with replies to an inbox of its own.

    Args:
        nc: a connected nats-py client.
        subject: the worker's subject.
        port: the broker's port, for messages over its max_payload (sent on a raw socket).
    """

    def __init__(self, nc: Any, subject: str, port: int) -> None:
        self._nc = nc
        self._subject = subject
        self._port = port
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
        reader, writer = await asyncio.open_connection("127.0.0.1", self._port)
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
