"""One HTTP/2 connection from a caller to one worker: an :class:`asyncio.Protocol` driving ``h2``.

Every frame is handled as it arrives, DATA is acknowledged at once, an abandoned response is
cancelled and drained (or reset), and bodies are sent frame by frame from a ``memoryview``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from troupe.errors import ConnectionLost, StreamBroken, TlsError, TransportClosed, TransportError
from troupe.messages._frames import Cancel, encode
from troupe.transports.http2._call import _IGNORE, _Call, _Failure, _Sink
from troupe.transports.http2._tls import lost
from troupe.transports.http2._wire import FRAMES_CONTENT_TYPE

if TYPE_CHECKING:
    from troupe.transports.http2._client import _Pool


# Flow-control windows the caller grants: RFC 9113's default, and the large one used when
# DYN_HTTP2_ADAPTIVE_WINDOW is on (h2 cannot size windows by measured bandwidth-delay product).
_DEFAULT_WINDOW: Final = 65_535
_LARGE_WINDOW: Final = 16 * 1024 * 1024
# Seconds a worker may keep sending after a Cancel before the caller resets the stream.
_DRAIN_LIMIT: Final = 5.0
_PING_DATA: Final = b"troupe\x00\x00"


_CONNECTING: Final = "connecting"
_OPEN: Final = "open"
_DRAINING: Final = "draining"  # GOAWAY received or closing: no new streams, open ones finish
_CLOSED: Final = "closed"


# The caller speaks HTTP/2 through a small protocol class on ``h2`` (the sans-IO HTTP/2 state
# machine that httpx uses too) instead of httpx/httpcore. httpcore lets each open response read
# the socket in turn behind one FIFO lock, so once two idle streams are open the frames of a third
# stay parked until more traffic arrives: a new request's headers can wait forever (reproduced
# with plain httpx + hypercorn; see docs/request-planes.md). Here one protocol object per
# connection reads every frame as it arrives and hands it to its request at once.


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection to one worker (``host:port``), carrying many requests.

    Every frame is read in :meth:`data_received` and handed to its stream's sink at once. Received
    DATA is acknowledged immediately (the caller buffers it), so flow control never stalls a
    response, and a request abandoned by its caller is drained rather than left to eat the window.
    """

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self.authority = pool.authority
        self._settings = pool.settings
        self.loop = asyncio.get_running_loop()
        self.state = _CONNECTING
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.ready.add_done_callback(_consume_exception)
        self.gone: asyncio.Future[None] = self.loop.create_future()
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self._transport: asyncio.Transport | None = None
        self._sinks: dict[int, _Sink] = {}
        self.reserved = 0  # requests waiting for this connection to open
        self._window_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._failure: _Failure | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"<HTTP/2 connection to {self.authority} {self.state} streams={len(self._sinks)}>"

    # --- capacity --------------------------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether another request may be started here."""
        if self.state not in (_OPEN, _CONNECTING):
            return False
        limit = min(self._settings.max_concurrent_streams, self._remote_limit())
        return len(self._sinks) + self.reserved < limit

    def _remote_limit(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    @property
    def idle(self) -> bool:
        """Open and carrying no request."""
        return self.state == _OPEN and not self._sinks and not self.reserved

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass, hence no isinstance).
        stream_transport = cast(asyncio.Transport, transport)
        if self.state != _CONNECTING:  # closed while connecting
            stream_transport.abort()
            return
        self._transport = stream_transport
        if self._pool.tls is not None:
            ssl_object = stream_transport.get_extra_info("ssl_object")
            alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            if alpn != "h2":
                error = TlsError(f"{self.authority} did not agree to HTTP/2 over TLS (ALPN h2)")
                self.ready.set_exception(error)
                self.abort((TlsError, str(error)))
                return
        settings = self._settings
        window = _LARGE_WINDOW if settings.adaptive_window else _DEFAULT_WINDOW
        codes = h2.settings.SettingCodes
        h2c = self._h2
        h2c.initiate_connection()
        h2c.update_settings(
            {
                codes.ENABLE_PUSH: 0,
                codes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                codes.INITIAL_WINDOW_SIZE: window,
                codes.MAX_FRAME_SIZE: settings.max_frame_size,
            }
        )
        if window > _DEFAULT_WINDOW:
            h2c.increment_flow_control_window(window - _DEFAULT_WINDOW)
        self._flush()
        # Requests wait for the worker's SETTINGS (its stream limit): h2 treats streams beyond
        # an advertised limit as a connection error, which would fail every request at once.

    def _on_settings(self) -> None:
        """The worker's first SETTINGS arrived: the connection is ready for requests."""
        self.state = _OPEN
        if not self.ready.done():
            self.ready.set_result(None)
        self._ping_timer = self.loop.call_later(self._settings.keep_alive_interval, self._ping)

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.abort((StreamBroken, f"HTTP/2 protocol error from {self.authority}: {exc}"))
            return
        sinks = self._sinks
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                assert isinstance(event, h2.events.DataReceived)
                sid = event.stream_id or 0
                if event.flow_controlled_length:
                    self._h2.acknowledge_received_data(event.flow_controlled_length, sid)
                sink = sinks.get(sid)
                if sink is not None and event.data:
                    sink.on_data(event.data)
            elif kind is h2.events.ResponseReceived:
                assert isinstance(event, h2.events.ResponseReceived)
                sink = sinks.get(event.stream_id or 0)
                if sink is not None:
                    sink.on_headers(*_status_and_type(event.headers or ()))
            elif kind is h2.events.StreamEnded:
                assert isinstance(event, h2.events.StreamEnded)
                sink = sinks.pop(event.stream_id or 0, None)
                if sink is not None:
                    sink.on_end()
            elif kind is h2.events.StreamReset:
                assert isinstance(event, h2.events.StreamReset)
                sink = sinks.pop(event.stream_id or 0, None)
                if sink is not None:
                    sink.on_broken(self._reset_failure(event))
            elif kind is h2.events.WindowUpdated:
                self._wake_senders()
            elif kind is h2.events.RemoteSettingsChanged:
                if self.state == _CONNECTING and self._transport is not None:
                    self._on_settings()
                self._wake_senders()
            elif kind is h2.events.PingAckReceived:
                self._on_pong()
            elif kind is h2.events.ConnectionTerminated:
                assert isinstance(event, h2.events.ConnectionTerminated)
                self._on_goaway(event)
        self._flush()
        self._maybe_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pool.tls is not None and self.state == _CONNECTING and self._failure is None:
            # Lost between the TLS handshake and the worker's SETTINGS (see _tls.dropped).
            error = lost(exc, self.authority, has_client_cert=self._pool.client_cert)
            if not self.ready.done():
                self.ready.set_exception(error)
            self._failure = (TlsError, str(error))
        detail = f": {exc}" if exc is not None else " (closed by the worker)"
        self._fail_all(
            self._failure or (StreamBroken, f"connection to {self.authority} lost{detail}")
        )
        self._transport = None
        self._pool.forget(self)
        self._gone()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake(self._write_waiter)
        self._write_waiter = None

    # --- sending ---------------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)

    def _open_stream(self, sink: _Sink, path: bytes, size: int) -> int:
        """Send the headers of a new POST stream; its body follows.

        Raises:
            ConnectionLost: the connection cannot take a new stream.
        """
        if self.state != _OPEN:
            raise self._unavailable()
        h2c = self._h2
        try:
            sid = h2c.get_next_available_stream_id()
            h2c.send_headers(
                sid,
                [
                    (b":method", b"POST"),
                    (b":scheme", b"http" if self._pool.tls is None else b"https"),
                    (b":authority", self.authority.encode()),
                    (b":path", path),
                    (b"content-type", FRAMES_CONTENT_TYPE),
                    (b"content-length", b"%d" % size),
                ],
            )
        except h2.exceptions.NoAvailableStreamIDError:
            self.close()  # stream ids used up: retire this connection
            raise self._unavailable() from None
        except h2.exceptions.TooManyStreamsError:
            raise self._unavailable() from None
        self._sinks[sid] = sink
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        return sid

    def _unavailable(self) -> TransportError:
        kind, message = self._failure or (
            ConnectionLost,
            f"HTTP/2 connection to {self.authority} is closing",
        )
        return kind(message)

    def _send_some(self, sid: int, body: memoryview) -> int:
        """Send as much of ``body`` as flow control allows now; returns the bytes sent."""
        h2c = self._h2
        sent = 0
        total = len(body)
        while sent < total:
            room = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
            if room <= 0:
                break
            piece = body[sent : sent + room]
            sent += len(piece)
            h2c.send_data(sid, piece.tobytes(), end_stream=sent == total)
        self._flush()
        return sent

    async def send_request(self, call: _Call, path: bytes, body: bytes) -> None:
        """Open a stream for ``call`` and upload ``body``, waiting for flow-control window.

        Raises:
            ConnectionLost: the connection cannot take new streams.
        """
        sid = self._open_stream(call, path, len(body))
        call.conn = self
        call.stream_id = sid
        if not body:
            self._h2.end_stream(sid)
            self._flush()
            call.uploaded = True
            return
        view = memoryview(body)
        offset = 0
        while True:
            try:
                offset += self._send_some(sid, view[offset:])
            except h2.exceptions.StreamClosedError:
                return  # reset meanwhile: the call has heard already
            if offset >= len(view):
                call.uploaded = True
                return
            if sid not in self._sinks:  # answered or failed before the whole body left
                self.reset(sid)
                return
            if self._write_paused:
                if self._write_waiter is None or self._write_waiter.done():
                    self._write_waiter = self.loop.create_future()
                await self._write_waiter
            else:
                if self._window_waiter is None or self._window_waiter.done():
                    self._window_waiter = self.loop.create_future()
                await self._window_waiter

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_senders(self) -> None:
        self._wake(self._window_waiter)
        self._window_waiter = None

    # --- cancelling ------------------------------------------------------------------------------

    def cancel(self, call: _Call) -> None:
        """Ask the worker to stop ``call`` with a ``Cancel`` message; its response is drained.

        Before the whole body is sent, or when no cancel can be sent here, the stream is reset
        instead: the worker sees the stream go away, which stops the request too.
        """
        sid = call.stream_id
        if sid not in self._sinks:
            return
        if not call.uploaded or not self.has_room():
            self.reset(sid)
            return
        try:
            self.send_message(_IGNORE, call.cancel_path, encode(Cancel(call.request_id)))
        except TransportError:
            self.reset(sid)
            return
        # A worker that does not end the response soon after is cut off.
        call.reset_timer = self.loop.call_later(_DRAIN_LIMIT, self.reset, sid)

    def send_message(self, sink: _Sink, path: bytes, body: bytes) -> None:
        """Send a small POST whose answer goes to ``sink``; never waits.

        Raises:
            ConnectionLost: the connection cannot take it now.
        """
        sid = self._open_stream(sink, path, len(body))
        if self._send_some(sid, memoryview(body)) < len(body):
            self.reset(sid)  # no window even for a few bytes: the worker is not reading
            raise self._unavailable()

    def reset(self, sid: int) -> None:
        """Reset stream ``sid`` (RST_STREAM CANCEL) and forget it."""
        sink = self._sinks.pop(sid, None)
        if isinstance(sink, _Call):
            sink.stop_reset_timer()
        if self.state == _CLOSED or self._transport is None:
            return
        try:
            self._h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.StreamClosedError:
            pass  # it ended meanwhile
        self._flush()
        self._maybe_idle()

    # --- keep-alive, idling, closing -------------------------------------------------------------

    def _ping(self) -> None:
        self._ping_timer = None
        if self.state not in (_OPEN, _DRAINING):
            return
        if not self._sinks:  # no keep-alive pings while idle (hyper's default as well)
            self._ping_timer = self.loop.call_later(self._settings.keep_alive_interval, self._ping)
            return
        self._h2.ping(_PING_DATA)
        self._flush()
        self._pong_timer = self.loop.call_later(self._settings.keep_alive_timeout, self._no_pong)

    def _on_pong(self) -> None:
        if self._pong_timer is not None:
            self._pong_timer.cancel()
            self._pong_timer = None
            self._ping_timer = self.loop.call_later(self._settings.keep_alive_interval, self._ping)

    def _no_pong(self) -> None:
        self._pong_timer = None
        timeout = self._settings.keep_alive_timeout
        message = f"{self.authority} did not answer a keep-alive ping within {timeout:g} s"
        self.abort((StreamBroken, message))

    def _maybe_idle(self) -> None:
        if self._sinks or self.reserved or self.state == _CLOSED:
            return
        if self.state == _DRAINING:
            self.close()
        elif self._idle_timer is None:
            if self._pool.idle_count() > self._settings.pool_max_idle_per_host:
                self.close()
            else:
                self._idle_timer = self.loop.call_later(
                    self._settings.pool_idle_timeout, self.close
                )

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        """The worker is going away: streams it never saw fail with ConnectionLost (retryable)."""
        self.state = _DRAINING
        self._pool.forget(self)
        last = event.last_stream_id or 0
        message = f"{self.authority} closed the connection before the request reached it"
        for sid in [sid for sid in self._sinks if sid > last]:
            self._sinks.pop(sid).on_broken((ConnectionLost, message))

    def _reset_failure(self, event: h2.events.StreamReset) -> _Failure:
        code = event.error_code
        if code == h2.errors.ErrorCodes.REFUSED_STREAM:
            return ConnectionLost, f"{self.authority} refused the request"
        return StreamBroken, f"{self.authority} reset the stream ({code!r})"

    def _fail_all(self, failure: _Failure) -> None:
        if self._failure is None:
            self._failure = failure
        for timer in (self._idle_timer, self._ping_timer, self._pong_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._ping_timer = self._pong_timer = None
        if not self.ready.done():
            kind, message = failure
            # Nothing was sent yet: the request may safely go elsewhere.
            self.ready.set_exception(
                (TransportClosed if kind is TransportClosed else ConnectionLost)(message)
            )
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink.on_broken(failure)
        self._wake_senders()
        self._wake(self._write_waiter)
        self._write_waiter = None

    def close(self) -> None:
        """Close politely: GOAWAY, then the socket. Streams still open fail."""
        if self.state == _CLOSED or self._closing:
            return
        self._closing = True
        self.state = _DRAINING
        self._pool.forget(self)
        transport = self._transport
        if transport is None:
            self._fail_all(self._failure or (ConnectionLost, "connection closed"))
            self._gone()
            return
        try:
            self._h2.close_connection()
            self._flush()
        except h2.exceptions.ProtocolError:
            pass
        transport.close()

    def _gone(self) -> None:
        self.state = _CLOSED
        if not self.gone.done():
            self.gone.set_result(None)

    def abort(self, failure: _Failure) -> None:
        """Drop the connection at once: every open stream fails with ``failure`` now."""
        self.state = _DRAINING
        self._pool.forget(self)
        self._fail_all(failure)
        transport = self._transport
        if transport is not None:
            transport.abort()
        else:
            self._gone()


def _consume_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _status_and_type(headers: Iterable[tuple[bytes | str, bytes | str]]) -> tuple[int, bytes]:
    status = 0
    content_type = b""
    for name, value in headers:
        raw = value if isinstance(value, bytes) else value.encode()
        if name == b":status":
            status = int(raw)
        elif name == b"content-type":
            content_type = raw
    return status, content_type
