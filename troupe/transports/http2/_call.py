"""The caller's side of one HTTP/2 request: the sink its connection feeds the response into.

``_Call`` turns a response body into the frames of the request's
:class:`~troupe.transports.ResponseStream`; ``_IGNORE`` drops the answers to cancel messages.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, Final, TypeAlias

from troupe.errors import (
    MessageTooLarge,
    ProtocolError,
    StreamBroken,
    TransportError,
    TroupeError,
    UnknownEndpoint,
)
from troupe.messages._frames import Chunk, End, Error, FrameBuffer
from troupe.transports._base import ResponseStream
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


class _Call(_Sink):
    """The caller's side of one request: turns its response body into the stream's frames.

    It holds its :class:`ResponseStream` weakly, like the other planes: a stream the caller drops
    without closing is cancelled when its next frame arrives.
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
        "started",
        "status",
        "stream_id",
        "stream_ref",
        "uploaded",
    )

    def __init__(
        self,
        request_id: str,
        address: str,
        endpoint: str,
        *,
        started: asyncio.Future[None],
        max_size: int,
        cancel_path: bytes,
    ) -> None:
        self.request_id = request_id
        self.address = address
        self.endpoint = endpoint
        self.stream_ref: weakref.ref[ResponseStream] | None = None
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

    def _stream(self) -> ResponseStream | None:
        ref = self.stream_ref
        return None if ref is None else ref()

    def fail(self, exc: TroupeError) -> None:
        """Report ``exc`` to whoever waits: the ``request`` call, else the stream's reader."""
        if not self.started.done():
            self.error = exc
            self.started.set_result(None)
        stream = self._stream()
        if stream is not None:
            stream.fail(exc)

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
        stream = self._stream()
        if stream is None:
            self.cancel()  # dropped without being closed: nobody reads this any more
            return
        if stream.finished:
            return  # abandoned or failed: the rest is only drained
        try:
            received = self.frames.feed(data)
        except (ProtocolError, MessageTooLarge) as exc:
            exc.address = self.address
            stream.fail(exc)
            return
        for frame in received:
            if type(frame) is Chunk or type(frame) is End or type(frame) is Error:
                stream.deliver(frame)
            else:
                message = f"unexpected {type(frame).__name__} frame in a response"
                stream.fail(ProtocolError(message, address=self.address))

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
        """The caller gave up (the stream's ``cancel`` callback): tell the worker; never blocks."""
        if not self.cancelled and self.conn is not None:
            self.cancelled = True
            self.conn.cancel(self)

    def stop_reset_timer(self) -> None:
        """Forget the pending reset of an abandoned stream."""
        if self.reset_timer is not None:
            self.reset_timer.cancel()
            self.reset_timer = None
