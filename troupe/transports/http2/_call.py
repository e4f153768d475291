"""The caller's side of one HTTP/2 request: the sink its connection feeds the response into.

``_Call`` turns a response body into reply frames and hands them to the client's
:class:`~troupe.transports._session.CallerSession`, which delivers them to the request's stream
(:class:`_Http2Stream`); ``_IGNORE`` drops the answers to cancel messages.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from troupe.errors import (
    MessageTooLarge,
    ProtocolError,
    StreamBroken,
    TransportError,
    TroupeError,
    UnknownEndpoint,
)
from troupe.messages._frames import Chunk, End, Error, FrameBuffer
from troupe.transports._session import CallerSession, SessionStream
from troupe.transports.http2._wire import FRAMES_CONTENT_TYPE

# Bytes of a non-frame error body kept for the error message.
_ERROR_BODY_PREVIEW: Final = 512


if TYPE_CHECKING:
    from troupe.transports.http2._connection import _Connection

_Failure: TypeAlias = tuple[type[TransportError], str]
"""How a stream failed: the error class (built with the caller's address) and its message."""


class _Sink:
    """What a connection feeds the frames of one HTTP/2 stream into (a no-op by default)."""

    __slots__ = ()

    def on_headers(self, status: int, content_type: bytes) -> None:
        """The response headers arrived."""

    def on_data(self, data: bytes) -> None:
        """A piece of the response body arrived."""

    def on_end(self) -> None:
        """The response body ended."""

    def on_broken(self, failure: _Failure) -> None:
        """The stream failed (reset, connection lost, client closed)."""


_IGNORE: Final = _Sink()
"""The sink of cancel messages: their ``204`` answer is read and dropped."""


class _Http2Stream(SessionStream):
    """A stream that knows its call (which sends its ``Cancel`` on the call's connection)."""

    __slots__ = ("call",)

    call: _Call


class _Call(_Sink):
    """The caller's side of one request: turns its response body into reply frames.

    Its stream is found through the session, which holds it weakly, like the other planes: a
    stream the caller drops without closing is cancelled when its next frame arrives.
    """

    __slots__ = (
        "address",
        "cancel_path",
        "cancelled",
        "conn",
        "endpoint",
        "error",
        "framed",
        "frames",
        "preview",
        "request_id",
        "reset_timer",
        "session",
        "started",
        "status",
        "stream_id",
        "uploaded",
    )

    def __init__(
        self,
        request_id: str,
        address: str,
        endpoint: str,
        *,
        session: CallerSession[Any],
        started: asyncio.Future[None],
        max_size: int,
        cancel_path: bytes,
    ) -> None:
        self.request_id = request_id
        self.address = address
        self.endpoint = endpoint
        self.session = session
        self.started = started  # resolved once the response headers arrived, or on failure
        self.cancel_path = cancel_path
        self.error: TroupeError | None = None
        self.frames = FrameBuffer(max_size)
        self.framed = False
        self.status = 0
        self.preview = b""
        self.conn: _Connection | None = None
        self.stream_id = 0
        self.uploaded = False
        self.cancelled = False
        self.reset_timer: asyncio.TimerHandle | None = None

    def _stream(self) -> SessionStream | None:
        stream: SessionStream | None = self.session.get(self.request_id)
        return stream

    def fail(self, exc: TroupeError) -> None:
        """Report ``exc`` to whoever waits: the ``request`` call, else the stream's reader."""
        if not self.started.done():
            self.error = exc
            self.started.set_result(None)
        stream = self._stream()
        if stream is not None:
            stream.fail(exc)
        else:
            self.session.forget(self.request_id)  # dropped unclosed: nothing more comes for it

    def on_headers(self, status: int, content_type: bytes) -> None:
        self.status = status
        if content_type == FRAMES_CONTENT_TYPE:
            self.framed = True
            if not self.started.done():
                self.started.set_result(None)

    def on_data(self, data: bytes) -> None:
        if not self.framed:
            if len(self.preview) < _ERROR_BODY_PREVIEW:
                self.preview += data[: _ERROR_BODY_PREVIEW - len(self.preview)]
            return
        session = self.session
        rid = self.request_id
        if rid not in session:
            return  # finished, abandoned or failed: the rest is only drained
        try:
            received = self.frames.feed(data)
        except (ProtocolError, MessageTooLarge) as exc:
            exc.address = self.address
            self.fail(exc)
            return
        for frame in received:
            if type(frame) is Chunk or type(frame) is End or type(frame) is Error:
                # The body is this request's, whatever id its frames carry.
                if session.receive(frame, rid) is not None:
                    self.cancel()  # dropped without being closed: nobody reads this any more
                    return
            else:
                message = f"unexpected {type(frame).__name__} frame in a response"
                self.fail(ProtocolError(message, address=self.address))
                return

    def on_end(self) -> None:
        self.stop_reset_timer()
        address = self.address
        if not self.framed:
            # Not a frame stream: a proxy, a wrong root path, or not a troupe worker at all.
            if self.status == 404:
                self.fail(UnknownEndpoint(self.endpoint, address=address))
            else:
                text = self.preview.decode("utf-8", "replace")
                message = f"HTTP {self.status} from {address}: {text}"
                self.fail(ProtocolError(message, address=address))
            return
        stream = self._stream()
        if stream is None or stream.finished:
            self.session.forget(self.request_id)  # dropped unclosed: nothing more comes for it
            return
        try:
            self.frames.close()
        except ProtocolError as exc:
            exc.address = address
            stream.fail(exc)
            return
        message = f"response from {address} ended before the request finished"
        stream.fail(StreamBroken(message, address=address))

    def on_broken(self, failure: _Failure) -> None:
        self.stop_reset_timer()
        kind, message = failure
        self.fail(kind(message, address=self.address))

    def cancel(self) -> None:
        """The caller gave up, or nobody reads the stream any more: tell the worker (once);
        never blocks."""
        if not self.cancelled and self.conn is not None:
            self.cancelled = True
            self.conn.cancel(self)

    def stop_reset_timer(self) -> None:
        """Forget the pending reset of an abandoned stream."""
        if self.reset_timer is not None:
            self.reset_timer.cancel()
            self.reset_timer = None
