"""A bare HTTP/2 caller (prior knowledge, on ``h2``) for tests that misbehave on purpose.

It grants no flow-control window beyond what it is told (``window=0``: the server may send no
DATA at all), never acknowledges what it receives unless :meth:`RawH2.grant` says so, and can
drop its TCP connection without a GOAWAY (:meth:`RawH2.abort`).
"""

from __future__ import annotations

import asyncio
import contextlib

import h2.config
import h2.connection
import h2.events
import h2.settings


class RawH2:
    """One HTTP/2 connection to ``127.0.0.1:port``; use :meth:`open`."""

    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.status: dict[int, int] = {}
        self.body: dict[int, bytearray] = {}
        self.ended: dict[int, asyncio.Event] = {}
        self.headed: dict[int, asyncio.Event] = {}
        self.settled = asyncio.Event()  # the server's SETTINGS arrived
        self.closed = asyncio.Event()  # the server closed the connection

    @classmethod
    async def open(cls, port: int, *, window: int = 65_535) -> RawH2:
        """Connect and send the preface, with ``window`` as every stream's initial window."""
        peer = cls()
        peer._reader, peer._writer = await asyncio.open_connection("127.0.0.1", port)
        codes = h2.settings.SettingCodes
        peer.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={codes.INITIAL_WINDOW_SIZE: window}
        )
        peer.conn.initiate_connection()
        peer._flush()
        peer._task = asyncio.create_task(peer._read(), name="test-raw-h2-read")
        await asyncio.wait_for(peer.settled.wait(), 5)
        return peer

    def request(self, path: str, body: bytes = b"", *, end: bool = True) -> int:
        """Send ``POST path`` with ``body`` (all of it must fit the server's window)."""
        sid = self.conn.get_next_available_stream_id()
        self.ended[sid] = asyncio.Event()
        self.headed[sid] = asyncio.Event()
        self.body[sid] = bytearray()
        headers = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "t")]
        self.conn.send_headers(sid, headers, end_stream=end and not body)
        if body:
            self.conn.send_data(sid, body, end_stream=end)
        self._flush()
        return sid

    def send(self, sid: int, data: bytes, *, end: bool = False) -> None:
        """More of stream ``sid``'s body."""
        self.conn.send_data(sid, data, end_stream=end)
        self._flush()

    def grant(self, sid: int, size: int) -> None:
        """Open ``size`` more bytes of window on stream ``sid`` and on the connection."""
        self.conn.increment_flow_control_window(size, stream_id=sid)
        self.conn.increment_flow_control_window(size)
        self._flush()

    async def response(self, sid: int, timeout: float = 5.0) -> tuple[int, bytes]:
        """Wait for stream ``sid`` to end; its status and body."""
        await asyncio.wait_for(self.ended[sid].wait(), timeout)
        return self.status.get(sid, 0), bytes(self.body[sid])

    def abort(self) -> None:
        """Drop the TCP connection at once: no GOAWAY, no FIN handshake of HTTP/2."""
        assert self._writer is not None
        self._writer.transport.abort()

    async def close(self) -> None:
        """Close the socket (no GOAWAY) and stop reading."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait((self._task,))

    def _flush(self) -> None:
        assert self._writer is not None
        data = self.conn.data_to_send()
        if data:
            self._writer.write(data)

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while data := await self._reader.read(65_536):
                for event in self.conn.receive_data(data):
                    self._on(event)
                self._flush()
        except OSError:
            pass
        finally:
            self.closed.set()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settled.set()
        elif isinstance(event, h2.events.ResponseReceived):
            headers = dict(event.headers or [])
            self.status[event.stream_id] = int(headers[b":status"])
            self.headed[event.stream_id].set()
        elif isinstance(event, h2.events.DataReceived):
            self.body[event.stream_id] += event.data  # not acknowledged: grant() does that
        elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
            self.ended[event.stream_id].set()
