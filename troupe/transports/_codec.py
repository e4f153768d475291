"""The request plane's wire messages and their codec, without any I/O.

Every transport carries the same exchange: a :class:`Request`, then zero or more :class:`Chunk`
frames, then :class:`End` or :class:`Error` (or a last ``Chunk`` with ``end=True`` instead of
``Chunk`` + ``End``); the caller may send :class:`Cancel` at any time. The
frames are frozen, tagged ``msgspec`` structs encoded as msgpack arrays (``array_like``: about a
third smaller and faster than maps). Trailing fields may be added later with defaults; decoders
ignore extra trailing elements, so old peers keep working.

:func:`decode` turns any bytes into a frame or a :class:`~troupe.errors.ProtocolError`, never a
``msgspec`` exception. Transports that carry frames on a byte stream (HTTP/2 bodies) frame them
with a 4-byte big-endian length prefix: :func:`encode_framed` writes one, :class:`FrameBuffer`
reads them back from arbitrary slices of the stream. Transports that carry messages (ZeroMQ)
may put several encoded frames in one message with :func:`encode_batch`; :func:`decode_message`
reads either form.
"""

from __future__ import annotations

from typing import Final, TypeAlias

import msgspec

from troupe.errors import MessageTooLarge, ProtocolError

__all__ = [
    "BATCH_OVERHEAD",
    "PREFIX_SIZE",
    "WIRE_VERSION",
    "Cancel",
    "Chunk",
    "End",
    "Error",
    "Frame",
    "FrameBuffer",
    "Reply",
    "Request",
    "RequestId",
    "decode",
    "decode_message",
    "encode",
    "encode_batch",
    "encode_framed",
]

WIRE_VERSION: Final = 1
"""The version of the exchange this troupe speaks, published in every instance record (``wire``).

Bump it with any change an older peer would misread (it hangs or drops frames rather than
failing): routers do not send requests to instances of another version. 1: the one-frame reply
(``Chunk(end=True)``) and ZeroMQ batches; records written before it carry none and count as 0.
"""

RequestId: TypeAlias = int | str
"""A request id: unique per connection (per caller for connectionless planes)."""


class Request(msgspec.Struct, frozen=True, tag="req", array_like=True):
    """Start a request: call ``endpoint`` with ``payload``.

    Attributes:
        id: chosen by the caller, echoed in every reply frame.
        endpoint: the endpoint name the worker serves.
        payload: the request body, opaque to the transport.
        deadline: UNIX epoch seconds after which the answer is useless (crosses processes, so
            wall-clock time, not a monotonic clock); ``None`` for no deadline.
        headers: free-form string metadata (tracing ids and the like).
        attempt: 0 for the first try, incremented by callers that re-send a request.
    """

    id: RequestId
    endpoint: str
    payload: bytes
    deadline: float | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    attempt: int = 0


class Chunk(msgspec.Struct, frozen=True, tag="chunk", array_like=True, omit_defaults=True):
    """One item of the response stream, in order.

    Attributes:
        end: the stream ends with this item, as if an :class:`End` followed (a one-chunk reply
            travels as one frame). Omitted on the wire when false.
    """

    id: RequestId
    data: bytes
    end: bool = False


class End(msgspec.Struct, frozen=True, tag="end", array_like=True):
    """The response stream finished normally."""

    id: RequestId


class Error(msgspec.Struct, frozen=True, tag="err", array_like=True):
    """The request failed; ends the response stream.

    Attributes:
        kind: the exception class name (``"Overloaded"``, ``"ValueError"``, ...).
        message: the exception's message.
    """

    id: RequestId
    kind: str
    message: str


class Cancel(msgspec.Struct, frozen=True, tag="cancel", array_like=True):
    """Sent by the caller: stop working on request ``id``; no reply is expected."""

    id: RequestId


Frame: TypeAlias = Request | Chunk | End | Error | Cancel
"""Every message of the request plane."""

Reply: TypeAlias = Chunk | End | Error
"""The frames a worker sends back for a request."""

PREFIX_SIZE: Final = 4
"""Bytes of the big-endian length prefix used by :func:`encode_framed` and :class:`FrameBuffer`."""

_MAX_PREFIXED: Final = 2**32 - 1

# One long-lived encoder and decoder: building them per message costs more than encoding.
_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Frame)
_batch_decoder: Final = msgspec.msgpack.Decoder(list[Frame])

# A batch is this byte (never used by msgpack) followed by a msgpack array of encoded frames.
_BATCH_MARKER: Final = 0xC1
_MAX_BATCH: Final = 0xFFFF
BATCH_OVERHEAD: Final = 4
"""Bytes :func:`encode_batch` adds to the frames' own (a marker and an array header)."""


def encode(frame: Frame) -> bytes:
    """Encode one frame as msgpack."""
    return _encoder.encode(frame)


def decode(data: bytes | bytearray | memoryview) -> Frame:
    """Decode one frame.

    Raises:
        ProtocolError: the bytes are not exactly one valid frame (garbage, truncated input,
            unknown tag, wrong field types).
    """
    try:
        frame: Frame = _decoder.decode(data)
    # msgspec.DecodeError and ValidationError are ValueErrors, and so is the UnicodeDecodeError
    # that invalid UTF-8 in a string field raises.
    except (ValueError, TypeError, RecursionError, OverflowError, MemoryError) as exc:
        raise ProtocolError(f"undecodable request-plane frame ({len(data)} bytes): {exc}") from exc
    return frame


def encode_batch(frames: list[bytes]) -> bytes:
    """Several encoded frames as one message, for :func:`decode_message`: one send, one receive
    and one decode call for the lot instead of one each.

    Args:
        frames: frames from :func:`encode`, at most 65,535 of them.
    """
    count = len(frames)
    if count < 16:
        header = bytes((_BATCH_MARKER, 0x90 | count))
    elif count <= _MAX_BATCH:
        header = bytes((_BATCH_MARKER, 0xDC)) + count.to_bytes(2, "big")
    else:
        raise ValueError(f"a batch holds at most {_MAX_BATCH} frames, not {count}")
    return b"".join([header, *frames])


def decode_message(data: bytes) -> list[Frame]:
    """The frames of one message: a single frame (:func:`encode`) or a batch (:func:`encode_batch`).

    Raises:
        ProtocolError: the message, or any frame of the batch, is not valid (the whole batch
            is refused: batches come from troupe's own encoder).
    """
    if not data or data[0] != _BATCH_MARKER:
        return [decode(data)]
    try:
        frames: list[Frame] = _batch_decoder.decode(memoryview(data)[1:])
    except (ValueError, TypeError, RecursionError, OverflowError, MemoryError) as exc:
        raise ProtocolError(f"undecodable batch of frames ({len(data)} bytes): {exc}") from exc
    return frames


def encode_framed(frame: Frame) -> bytes:
    """Encode one frame preceded by its 4-byte big-endian length.

    Raises:
        MessageTooLarge: the encoded frame does not fit a 4-byte length (4 GiB).
    """
    body = _encoder.encode(frame)
    if len(body) > _MAX_PREFIXED:
        raise MessageTooLarge(len(body), _MAX_PREFIXED)
    return len(body).to_bytes(PREFIX_SIZE, "big") + body


class FrameBuffer:
    """Reassembles length-prefixed frames from a byte stream fed in arbitrary slices.

    Sans-IO: feed it what the socket or body produced; it returns every frame completed so far.
    A malformed stream cannot be resynchronised, so after the first error the buffer stays
    failed and every later :meth:`feed` raises the same error.

    Args:
        max_size: the largest frame body accepted, in bytes. A prefix announcing more fails at
            once, before the body is buffered.
    """

    __slots__ = ("_buf", "_failure", "_max_size")

    def __init__(self, max_size: int) -> None:
        if max_size <= 0:
            raise ValueError("max_size must be positive")
        self._max_size = max_size
        self._buf = bytearray()
        self._failure: ProtocolError | MessageTooLarge | None = None

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add bytes from the stream; return the frames they complete, in order.

        Raises:
            MessageTooLarge: a length prefix announces more than ``max_size`` bytes.
            ProtocolError: a complete frame body is not a valid frame.
        """
        if self._failure is not None:
            raise self._failure
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        start = 0
        try:
            while len(buf) - start >= PREFIX_SIZE:
                size = int.from_bytes(buf[start : start + PREFIX_SIZE], "big")
                if size > self._max_size:
                    self._failure = MessageTooLarge(size, self._max_size)
                    raise self._failure
                end = start + PREFIX_SIZE + size
                if len(buf) < end:
                    break
                try:
                    # A copied slice, not a memoryview: a view kept alive by a traceback would
                    # stop the buffer from being trimmed below.
                    frames.append(decode(buf[start + PREFIX_SIZE : end]))
                except ProtocolError as exc:
                    self._failure = exc
                    raise
                start = end
        finally:
            if start:
                del buf[:start]
        return frames

    def close(self) -> None:
        """Declare the end of the stream.

        Raises:
            ProtocolError: the stream stopped inside a frame (truncated).
        """
        if self._failure is not None:
            raise self._failure
        if self._buf:
            raise ProtocolError(f"stream ended inside a frame ({len(self._buf)} bytes left over)")
