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
reads either form, and hands back a frame it cannot read as an :class:`Undecodable` (with the
request id when one can be recovered) so that one bad frame costs only its own request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, TypeAlias, cast

import msgspec

from troupe.errors import InvalidRequest, MessageTooLarge, ProtocolError

__all__ = [
    "BATCH_MAX_BYTES",
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
    "Undecodable",
    "decode",
    "decode_message",
    "encode",
    "encode_batch",
    "encode_framed",
    "encode_request",
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
        received: how many chunks of this request's answer the caller already holds from
            earlier attempts: a handler that resumes skips them. Added after wire version 1
            was fixed; workers that predate it ignore the trailing field.
    """

    id: RequestId
    endpoint: str
    payload: bytes
    deadline: float | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    attempt: int = 0
    received: int = 0


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
        traceback: the handler's traceback as text, sent only by a worker logging at debug
            level (``""`` otherwise). Added after wire version 1 was fixed: a peer that
            predates it ignores the trailing field, and a frame without it decodes as ``""``.
    """

    id: RequestId
    kind: str
    message: str
    traceback: str = ""


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
_raw_batch_decoder: Final = msgspec.msgpack.Decoder(list[msgspec.Raw])
_DECODE_ERRORS: Final = (ValueError, TypeError, RecursionError, OverflowError, MemoryError)

# A batch is this byte (never used by msgpack) followed by a msgpack array of encoded frames.
_BATCH_MARKER: Final = 0xC1
_MAX_BATCH: Final = 0xFFFF
BATCH_OVERHEAD: Final = 4
"""Bytes :func:`encode_batch` adds to the frames' own (a marker and an array header)."""
BATCH_MAX_BYTES: Final = 64 * 1024
"""The largest batch a transport builds, whatever its own message size limit.

A batch is an optimisation the peer did not ask for: it must never be refused where the frames
it carries, sent one by one, would have been accepted. Every peer accepts messages of this size
unless its own limit is smaller, and a transport whose own limit is smaller does not batch.
"""


class Undecodable:
    """A frame of a message that :func:`decode_message` could not read.

    Attributes:
        error: why it could not be read.
        tag: the frame's tag (``"req"``, ``"chunk"``...) when its first element is a string.
        id: the request id (the second element) when it is an int or a string, else ``None``:
            a transport may answer (or fail) that request instead of leaving it to time out.
    """

    __slots__ = ("error", "id", "tag")

    def __init__(self, error: ProtocolError, tag: str | None, id: RequestId | None) -> None:
        self.error = error
        self.tag = tag
        self.id = id

    def __repr__(self) -> str:
        return f"Undecodable(tag={self.tag!r}, id={self.id!r}, error={str(self.error)!r})"

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview, error: ProtocolError) -> Undecodable:
        """Describe the undecodable frame ``data``, recovering its tag and id if it has them."""
        tag: str | None = None
        rid: RequestId | None = None
        try:
            head = msgspec.msgpack.decode(data)
        except _DECODE_ERRORS:
            return cls(error, None, None)
        if type(head) is list and head and type(head[0]) is str:
            tag = head[0]
            if len(head) > 1 and type(head[1]) in (int, str):
                rid = head[1]
        return cls(error, tag, rid)


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
    except _DECODE_ERRORS as exc:
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


def decode_message(data: bytes) -> list[Frame | Undecodable]:
    """The frames of one message: a single frame (:func:`encode`) or a batch (:func:`encode_batch`).

    A frame that is not valid comes back as an :class:`Undecodable` in its place; the frames
    around it are read as usual (a bad request in a batch costs no other request).

    Raises:
        ProtocolError: a batch whose layout is broken (not an array of msgpack values,
            truncated): none of its frames can be told apart.
    """
    if not data or data[0] != _BATCH_MARKER:
        try:
            return [decode(data)]
        except ProtocolError as exc:
            return [Undecodable.of(data, exc)]
    body = memoryview(data)[1:]
    try:
        good: list[Frame] = _batch_decoder.decode(body)
    except _DECODE_ERRORS:
        pass  # one frame or the layout is bad: look at them one by one (rare; slower)
    else:
        return cast("list[Frame | Undecodable]", good)  # a fresh list: widening is safe
    try:
        raws = _raw_batch_decoder.decode(body)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"undecodable batch of frames ({len(data)} bytes): {exc}") from exc
    frames: list[Frame | Undecodable] = []
    for raw in raws:
        try:
            frames.append(decode(raw))
        except ProtocolError as exc:
            frames.append(Undecodable.of(raw, exc))
    return frames


def encode_request(
    request_id: RequestId,
    endpoint: str,
    payload: bytes,
    *,
    deadline: float | None = None,
    headers: Mapping[str, str] | None = None,
    attempt: int = 0,
    received: int = 0,
) -> bytes:
    """Encode a :class:`Request` from a caller's arguments, refusing what its worker could not
    decode (such a request would be dropped there and its caller left waiting).

    Raises:
        InvalidRequest: ``endpoint`` is not a string, ``payload`` not bytes, ``headers`` not a
            mapping of strings to strings, ``deadline`` not a number or ``None``, ``attempt``
            not an int, ``received`` not an int >= 0, or a string is not encodable as UTF-8
            (``param`` names the argument).
    """
    if type(endpoint) is not str:
        raise InvalidRequest(
            f"endpoint must be a str, not {type(endpoint).__name__}", param="endpoint"
        )
    if type(payload) is not bytes and not isinstance(payload, bytes | bytearray | memoryview):
        raise InvalidRequest(
            f"payload must be bytes, not {type(payload).__name__}", param="payload"
        )
    if deadline is not None and (type(deadline) is bool or not isinstance(deadline, float | int)):
        raise InvalidRequest(
            f"deadline must be a number or None, not {type(deadline).__name__}", param="deadline"
        )
    if type(attempt) is bool or not isinstance(attempt, int):
        raise InvalidRequest(
            f"attempt must be an int, not {type(attempt).__name__}", param="attempt"
        )
    if type(received) is not int or received < 0:
        raise InvalidRequest(f"received must be an int >= 0, not {received!r}", param="received")
    fields: dict[str, str] = {}
    if headers:
        fields = dict(headers)
        for key, value in fields.items():
            if type(key) is not str or type(value) is not str:
                raise InvalidRequest(
                    f"headers must map str to str, not {type(key).__name__} to "
                    f"{type(value).__name__} (at {key!r})",
                    param="headers",
                )
    try:
        return _encoder.encode(
            Request(request_id, endpoint, payload, deadline, fields, attempt, received)
        )
    except (msgspec.EncodeError, UnicodeEncodeError, OverflowError) as exc:
        raise InvalidRequest(f"the request cannot be encoded: {exc}") from exc


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
