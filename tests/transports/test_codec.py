"""The sans-IO codec: frames round-trip; garbage, truncation and wrong types are ProtocolErrors."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe.errors import InvalidRequest, MessageTooLarge, ProtocolError
from troupe.messages import (
    Cancel,
    Chunk,
    End,
    Error,
    Frame,
    FrameBuffer,
    Request,
    decode,
    encode,
    encode_framed,
)
from troupe.messages._frames import Undecodable, decode_message, encode_batch, encode_request

SAMPLES: list[Frame] = [
    Request(1, "generate", b"payload"),
    Request("req-7", "ns.comp.ep", b"", 1_700_000_000.25, {"trace": "x"}, 3),
    Chunk(1, b"\x00\xff" * 10),
    End(2),
    Error(3, "ValueError", "bad input"),
    Cancel("abc"),
]

ids = st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), st.text(max_size=20))
frames = st.one_of(
    st.builds(
        Request,
        ids,
        st.text(max_size=30),
        st.binary(max_size=200),
        st.one_of(st.none(), st.floats(allow_nan=False)),
        st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4),
        st.integers(min_value=0, max_value=2**31),
    ),
    st.builds(Chunk, ids, st.binary(max_size=200)),
    st.builds(End, ids),
    st.builds(Error, ids, st.text(max_size=20), st.text(max_size=50)),
    st.builds(Cancel, ids),
)


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_round_trip(frame: Frame) -> None:
    assert decode(encode(frame)) == frame


def test_request_defaults_and_compact_encoding() -> None:
    request = decode(encode(Request(5, "ep", b"x")))
    assert isinstance(request, Request)
    assert request.deadline is None
    assert request.headers == {}
    assert request.attempt == 0
    # array_like: no field names on the wire.
    assert b"endpoint" not in encode(Request(5, "ep", b"x"))


def test_frames_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Chunk(1, b"x").data = b"y"  # type: ignore[misc]


def test_newer_peers_may_append_fields() -> None:
    raw = msgspec.msgpack.encode(["end", 9, "a field from the future"])
    assert decode(raw) == End(9)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        b"\x93",  # an array header with nothing after it
        msgspec.msgpack.encode(["nope", 1]),  # unknown tag
        msgspec.msgpack.encode([1, 2]),  # tag of the wrong type
        msgspec.msgpack.encode({"id": 1}),  # a map, not an array
        msgspec.msgpack.encode(["chunk", 1, "text, not bytes"]),
        msgspec.msgpack.encode(["req", 1, "ep"]),  # missing payload
        msgspec.msgpack.encode(["req", 1.5, "ep", b""]),  # float id
        msgspec.msgpack.encode(["req", 1, "ep", b"", None, {"k": 1}]),  # non-string header
        msgspec.msgpack.encode("just a string"),
        encode(Request(1, "ep", b"payload"))[:-3],  # truncated
        encode(End(1)) + b"\x00",  # trailing garbage
    ],
)
def test_garbage_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(raw)


@given(st.binary(max_size=300))
@settings(max_examples=1500, deadline=None)
def test_random_bytes_decode_or_raise_protocol_error(raw: bytes) -> None:
    try:
        frame = decode(raw)
    except ProtocolError:
        return
    assert isinstance(frame, Request | Chunk | End | Error | Cancel)


@given(frames, st.data())
@settings(max_examples=500, deadline=None)
def test_mutated_frames_decode_or_raise_protocol_error(frame: Frame, data: st.DataObject) -> None:
    raw = bytearray(encode(frame))
    assert decode(bytes(raw)) == frame
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        position = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw[position] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            decode(candidate)
        except ProtocolError:
            pass


# --- FrameBuffer ---------------------------------------------------------------------------------


def test_frame_buffer_reassembles_any_slicing() -> None:
    stream = b"".join(encode_framed(frame) for frame in SAMPLES)
    rng = random.Random(4)
    for _ in range(200):
        buffer = FrameBuffer(1024)
        out: list[Frame] = []
        position = 0
        while position < len(stream):
            step = rng.randint(0, 12)
            out += buffer.feed(stream[position : position + step])
            position += step
        buffer.close()
        assert out == SAMPLES
        assert buffer.pending == 0


def test_frame_buffer_rejects_oversized_prefix_before_buffering() -> None:
    buffer = FrameBuffer(100)
    with pytest.raises(MessageTooLarge) as info:
        buffer.feed((101).to_bytes(4, "big"))
    assert info.value.size == 101
    assert info.value.limit == 100
    with pytest.raises(MessageTooLarge):  # stays failed: the stream cannot be resynchronised
        buffer.feed(encode_framed(End(1)))


def test_frame_buffer_garbage_body_fails_and_stays_failed() -> None:
    buffer = FrameBuffer(100)
    good = encode_framed(End(1))
    with pytest.raises(ProtocolError):
        buffer.feed(good + (3).to_bytes(4, "big") + b"\xc1\xc1\xc1")
    with pytest.raises(ProtocolError):
        buffer.feed(good)


def test_frame_buffer_truncated_stream_is_reported_at_close() -> None:
    buffer = FrameBuffer(100)
    data = encode_framed(Chunk(1, b"abcdef"))
    assert buffer.feed(data[:-2]) == []
    assert buffer.pending == len(data) - 2
    with pytest.raises(ProtocolError, match="inside a frame"):
        buffer.close()


@given(st.lists(frames, max_size=6), st.lists(st.integers(min_value=1, max_value=50), max_size=30))
@settings(max_examples=300, deadline=None)
def test_frame_buffer_property(sent: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(encode_framed(frame) for frame in sent)
    buffer = FrameBuffer(1 << 20)
    out: list[Frame] = []
    position = 0
    for cut in cuts:
        out += buffer.feed(stream[position : position + cut])
        position += cut
    out += buffer.feed(stream[position:])
    buffer.close()
    assert out == sent


@given(st.binary(max_size=400))
@settings(max_examples=1000, deadline=None)
def test_frame_buffer_random_bytes_never_escape_typed_errors(raw: bytes) -> None:
    buffer = FrameBuffer(256)
    try:
        buffer.feed(raw)
        buffer.close()
    except (ProtocolError, MessageTooLarge):
        pass


def test_frame_buffer_needs_a_positive_limit() -> None:
    with pytest.raises(ValueError, match="positive"):
        FrameBuffer(0)


@pytest.mark.parametrize("count", [1, 2, 15, 16, 300])
def test_batches_carry_frames_in_order(count: int) -> None:
    sent = [SAMPLES[i % len(SAMPLES)] for i in range(count)]
    assert decode_message(encode_batch([encode(frame) for frame in sent])) == sent


def test_decode_message_reads_single_frames_and_refuses_broken_batches() -> None:
    assert decode_message(encode(End(4))) == [End(4)]
    with pytest.raises(ProtocolError, match="batch"):
        decode_message(b"\xc1")  # the marker alone
    with pytest.raises(ProtocolError, match="batch"):
        decode_message(b"\xc1\x93" + encode(End(1)))  # truncated
    with pytest.raises(ValueError, match="at most 65535"):
        encode_batch([encode(End(1))] * 65_536)


def _undecodable(item: object) -> Undecodable:
    assert isinstance(item, Undecodable)
    assert isinstance(item.error, ProtocolError)
    return item


def test_a_bad_frame_costs_only_itself() -> None:
    bad_request = msgspec.msgpack.encode(["req", 7, "echo", b"", None, {"n": 1}, 0])
    frames = decode_message(encode_batch([encode(End(1)), bad_request, encode(Cancel("c"))]))
    assert frames[0] == End(1)
    assert frames[2] == Cancel("c")
    bad = _undecodable(frames[1])
    assert (bad.tag, bad.id) == ("req", 7)
    # A single frame, or one that is not even an array: what can be told is told.
    [alone] = decode_message(msgspec.msgpack.encode(["chunk", "s-1", 5]))
    assert (_undecodable(alone).tag, _undecodable(alone).id) == ("chunk", "s-1")
    [garbage] = decode_message(b"")
    assert (_undecodable(garbage).tag, _undecodable(garbage).id) == (None, None)
    [number] = decode_message(b"\xc1\x92" + encode(End(1)) + b"\x01")[1:]
    assert (_undecodable(number).tag, _undecodable(number).id) == (None, None)
    [no_id] = decode_message(msgspec.msgpack.encode(["req", [1], "echo", b""]))
    assert (_undecodable(no_id).tag, _undecodable(no_id).id) == ("req", None)
    assert "Undecodable(tag='req'" in repr(no_id)


def test_encode_request_refuses_what_a_worker_could_not_decode() -> None:
    data = encode_request(3, "ep", b"x", deadline=5, headers={"k": "v"}, attempt=1)
    assert decode(data) == Request(3, "ep", b"x", 5.0, {"k": "v"}, 1)
    assert decode(encode_request(4, "ep", bytearray(b"y"))) == Request(4, "ep", b"y")  # type: ignore[arg-type]
    bad: list[tuple[dict[str, object], str | None]] = [
        ({"headers": {"n": 1}}, "headers"),
        ({"headers": {1: "v"}}, "headers"),
        ({"payload": "text"}, "payload"),
        ({"endpoint": b"ep"}, "endpoint"),
        ({"deadline": "soon"}, "deadline"),
        ({"deadline": True}, "deadline"),
        ({"attempt": 1.5}, "attempt"),
        ({"attempt": False}, "attempt"),
        ({"attempt": 2**64}, None),  # too large for msgpack
        ({"endpoint": "\ud800"}, None),  # not encodable as UTF-8
    ]
    for change, param in bad:
        args: dict[str, object] = {"endpoint": "ep", "payload": b"x"} | change
        with pytest.raises(InvalidRequest) as caught:
            encode_request(1, **args)  # type: ignore[arg-type]
        assert caught.value.param == param, change
