"""The caller session (sans-IO): ids, the stream table, replies in, Cancels out, fail-all, drops."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe.errors import (
    ConnectionLost,
    InvalidRequest,
    MessageTooLarge,
    ProtocolError,
    RemoteError,
    TransportClosed,
    TroupeError,
)
from troupe.messages._frames import (
    Cancel,
    Chunk,
    End,
    Error,
    Frame,
    Reply,
    Request,
    RequestId,
    Undecodable,
    decode,
    encode,
    encode_batch,
)
from troupe.transports._session import (
    CallerSession,
    RequestIds,
    SessionStream,
    StreamRef,
)

ADDRESS = "test://worker"


@dataclass
class Wire:
    """What a session asked its transport to send when callers gave up."""

    cancels: list[RequestId] = field(default_factory=list)

    def send(self, stream: SessionStream, cancel: Cancel) -> None:
        assert stream.request_id == cancel.id
        self.cancels.append(cancel.id)


def _session(wire: Wire, **options: object) -> CallerSession[SessionStream]:
    return CallerSession(wire.send, **options)  # type: ignore[arg-type]


def _open(session: CallerSession[SessionStream], endpoint: str = "ep") -> SessionStream:
    rid, _ = session.ids.encode(ADDRESS, endpoint, b"", limit=1024)
    return session.open(SessionStream(rid, address=ADDRESS, endpoint=endpoint))


def _drop(stream: SessionStream) -> Callable[[], None]:
    """A check that ``stream`` is gone once its caller dropped its own reference."""
    ref = weakref.ref(stream)
    del stream

    def check() -> None:
        gc.collect()
        assert ref() is None, "the stream is still referenced"

    return check


# --- ids and encoding ------------------------------------------------------------------------


def test_ids_count_from_one_and_a_prefix_makes_strings() -> None:
    plain = RequestIds()
    assert [plain.encode(ADDRESS, "ep", b"", limit=99)[0] for _ in range(3)] == [1, 2, 3]
    prefixed = RequestIds("ab{c}-")
    rid, data = prefixed.encode(ADDRESS, "ep", b"x", limit=99)
    assert rid == "ab{c}-1"
    request = decode(data)
    assert isinstance(request, Request)
    assert (request.id, request.endpoint, request.payload) == ("ab{c}-1", "ep", b"x")


def test_encode_refuses_an_oversized_or_invalid_request() -> None:
    ids = RequestIds()
    with pytest.raises(MessageTooLarge) as info:
        ids.encode(ADDRESS, "ep", b"x" * 100, limit=50, variable="DYN_X")
    assert (info.value.limit, info.value.address, info.value.variable) == (50, ADDRESS, "DYN_X")
    assert "DYN_X" in str(info.value)
    with pytest.raises(InvalidRequest):
        ids.encode(ADDRESS, "ep", "not bytes", limit=50)  # type: ignore[arg-type]


def test_sessions_sharing_ids_never_repeat_one() -> None:
    ids = RequestIds()
    wire = Wire()
    first, second = _session(wire, ids=ids), _session(wire, ids=ids)
    taken = [first.ids.encode(ADDRESS, "ep", b"", limit=99)[0] for _ in range(3)]
    taken += [second.ids.encode(ADDRESS, "ep", b"", limit=99)[0] for _ in range(3)]
    assert taken == [1, 2, 3, 4, 5, 6]


# --- replies ---------------------------------------------------------------------------------


async def test_replies_reach_their_streams_in_order_and_the_end_forgets_them() -> None:
    wire = Wire()
    session = _session(wire)
    one, two = _open(session), _open(session)
    assert len(session) == 2
    assert session.receive(Chunk(1, b"a")) is None
    assert session.receive(Chunk(2, b"x", end=True)) is None
    assert session.receive(Chunk(1, b"b")) is None
    assert session.receive(End(1)) is None
    assert await one.collect() == [b"a", b"b"]
    assert await two.collect() == [b"x"]
    assert len(session) == 0
    assert wire.cancels == []
    assert session.dropped.as_dict() == {"undecodable": 0, "unexpected": 0, "unclaimed": 0}


async def test_an_error_frame_raises_the_remote_error() -> None:
    session = _session(Wire())
    stream = _open(session)
    session.receive(Error(stream.request_id, "ValueError", "bad"))
    with pytest.raises(RemoteError, match="bad"):
        await stream.collect()


async def test_a_batch_message_is_routed_frame_by_frame() -> None:
    wire = Wire()
    session = _session(wire)
    one, two = _open(session), _open(session)
    frames: list[Frame] = [Chunk(1, b"a"), Chunk(9, b"?"), Chunk(2, b"b", end=True), End(1)]
    frames.append(Chunk(8, b"?"))
    message = encode_batch([encode(frame) for frame in frames])
    assert list(session.receive_message(message)) == [Cancel(9), Cancel(8)]
    assert await one.collect() == [b"a"]
    assert await two.collect() == [b"b"]
    assert session.dropped.unclaimed == 2


def test_a_reply_for_no_open_stream_is_cancelled_once() -> None:
    session = _session(Wire())
    assert session.receive(Chunk(7, b"late")) == Cancel(7)
    assert session.receive(Chunk(7, b"later")) is None  # already cancelled
    assert session.receive(Chunk(8, b"last", end=True)) is None  # the worker is done
    assert session.receive(End(9)) is None
    assert session.receive(Error(10, "X", "y")) is None
    assert session.dropped.unclaimed == 5


def test_without_memory_every_late_chunk_is_answered() -> None:
    session = _session(Wire(), cancel_memory=0)
    assert session.receive(Chunk(7, b"late")) == Cancel(7)
    assert session.receive(Chunk(7, b"later")) == Cancel(7)


def test_the_memory_of_cancels_is_bounded() -> None:
    session = _session(Wire(), cancel_memory=2)
    for rid in (1, 2, 3):
        session.cancel(rid)
    assert session.receive(Chunk(1, b"x")) == Cancel(1)  # forgotten: answered again
    assert session.receive(Chunk(3, b"x")) is None


def test_frames_a_caller_never_receives_are_dropped_as_unexpected() -> None:
    session = _session(Wire())
    assert session.receive(Request(1, "ep", b"")) is None
    assert session.receive(Cancel(1)) is None
    assert session.receive(Chunk("not-an-int", b"x")) is None  # ids here are ints
    assert session.dropped.unexpected == 3
    assert session.dropped.unclaimed == 0


def test_garbage_is_counted_not_raised() -> None:
    session = _session(Wire())
    assert session.receive_data(b"\xc1garbage") is None
    assert list(session.receive_message(b"\xc1\x92\xc1")) == []  # a broken batch
    assert session.dropped.undecodable == 2


async def test_an_undecodable_reply_fails_only_its_stream_and_stops_its_worker() -> None:
    wire = Wire()
    session = _session(wire)
    one, two = _open(session), _open(session)
    bad = Undecodable(ProtocolError("bad bytes"), "chunk", 1)
    assert session.receive(bad) == Cancel(1)
    with pytest.raises(ProtocolError, match=f"undecodable reply from {ADDRESS}: bad bytes"):
        await one.collect()
    session.receive(Chunk(2, b"fine", end=True))
    assert await two.collect() == [b"fine"]
    assert session.receive(Undecodable(ProtocolError("?"), None, None)) is None
    assert session.receive(Undecodable(ProtocolError("?"), "end", 5)) is None  # no such stream
    assert session.dropped.undecodable == 3


async def test_a_channel_that_names_the_request_overrides_the_frame_id() -> None:
    session = _session(Wire(), ids=RequestIds("p-"))
    stream = _open(session)
    assert stream.request_id == "p-1"
    session.receive(Error("", "MessageTooLarge", "too big"), "p-1")  # a placeholder id
    with pytest.raises(MessageTooLarge):
        await stream.collect()


# --- callers that give up --------------------------------------------------------------------


async def test_a_closed_stream_sends_cancel_once_and_late_replies_are_dropped() -> None:
    wire = Wire()
    session = _session(wire)
    stream = _open(session)
    session.receive(Chunk(1, b"a"))
    await stream.aclose()
    assert wire.cancels == [1]
    assert len(session) == 0
    assert session.receive(Chunk(1, b"late")) is None  # the worker was told already
    assert wire.cancels == [1]
    assert session.dropped.unclaimed == 1


async def test_a_dropped_stream_is_cancelled_at_its_next_chunk() -> None:
    session = _session(Wire())
    stream = _open(session)
    check = _drop(stream)
    del stream
    check()
    assert len(session) == 1  # noticed only when a reply comes
    assert session.get(1) is None
    assert session.receive(Chunk(1, b"x")) == Cancel(1)
    assert len(session) == 0


async def test_a_dropped_stream_goes_to_on_collected_and_is_cancelled_there() -> None:
    seen: list[StreamRef[SessionStream]] = []
    session = _session(Wire(), on_collected=seen.append)
    stream = _open(session)
    check = _drop(stream)
    del stream
    check()
    [ref] = seen
    assert (ref.rid, ref.address) == (1, ADDRESS)
    assert session.receive(Chunk(1, b"x")) is None  # left to collected()
    assert session.collected(ref) == Cancel(1)
    assert len(session) == 0
    assert session.collected(ref) is None  # once
    assert session.receive(Chunk(1, b"y")) is None  # cancelled already


async def test_live_forgets_dropped_streams() -> None:
    session = _session(Wire())
    kept, dropped = _open(session), _open(session)
    check = _drop(dropped)
    del dropped
    check()
    assert session.live() == [kept]
    assert list(session.streams) == [1]


# --- closing ---------------------------------------------------------------------------------


async def test_cancel_open_names_every_open_stream_not_yet_cancelled() -> None:
    wire = Wire()
    session = _session(wire)
    one, two, three = _open(session), _open(session), _open(session)
    await two.aclose()
    session.receive(End(3))
    assert session.cancel_open() == [(one, Cancel(1))]
    assert session.cancel_open() == []  # remembered
    assert three.finished


async def test_fail_all_ends_every_open_stream_after_its_chunks() -> None:
    session = _session(Wire())
    one, two = _open(session), _open(session)
    session.receive(Chunk(1, b"a"))
    failed = session.fail_all(lambda stream: TransportClosed("closed", address=stream.address))
    assert failed == 2
    assert len(session) == 0
    with pytest.raises(TransportClosed):
        await two.collect()
    assert await anext(one) == b"a"
    with pytest.raises(TransportClosed) as info:
        await anext(one)
    assert info.value.address == ADDRESS
    assert session.fail_all(ConnectionLost("again")) == 0


async def test_forget_drops_a_request_whose_send_failed_without_cancelling_it() -> None:
    wire = Wire()
    session = _session(wire)
    _open(session)
    session.forget(1)
    assert len(session) == 0
    assert wire.cancels == []


# --- any interleaving --------------------------------------------------------------------------

_STREAMS = 6

_reply = st.tuples(
    st.just("reply"),
    st.integers(min_value=1, max_value=_STREAMS + 2),  # ids past the opened ones: unknown
    st.sampled_from(["chunk", "last", "end", "error"]),
)
_op = st.one_of(
    st.just(("open",)),
    _reply,
    _reply,
    st.tuples(st.just("close"), st.integers(min_value=1, max_value=_STREAMS)),
    st.tuples(st.just("drop"), st.integers(min_value=1, max_value=_STREAMS)),
)


def _frame(rid: int, kind: str, n: int) -> Reply:
    if kind == "chunk":
        return Chunk(rid, b"%d" % n)
    if kind == "last":
        return Chunk(rid, b"%d" % n, end=True)
    if kind == "end":
        return End(rid)
    return Error(rid, "Oops", str(n))


@dataclass
class _Model:
    """What each stream should have received, and how it should end."""

    chunks: list[bytes] = field(default_factory=list)
    ending: str = "open"  # open | end | error | closed | dropped


async def _read(stream: SessionStream) -> tuple[list[bytes], TroupeError | None]:
    got: list[bytes] = []
    try:
        async for chunk in stream:
            got.append(chunk)
    except TroupeError as exc:
        return got, exc
    return got, None


async def _interleave(ops: list[tuple[object, ...]]) -> None:
    wire = Wire()
    session = _session(wire)
    streams: dict[int, SessionStream] = {}  # what the caller still holds
    model: dict[int, _Model] = {}
    cancelled: set[int] = set()  # requests whose worker was told to stop
    answered: list[int] = []  # Cancels the session gave back for replies nobody reads
    fed = delivered = 0
    for n, op in enumerate(ops):
        if op[0] == "open" and len(model) < _STREAMS:
            opened = _open(session)
            rid = int(opened.request_id)
            streams[rid] = opened
            model[rid] = _Model()
            del opened  # the table holds streams weakly: only `streams` keeps them
        elif op[0] == "reply":
            _, target, kind = op
            assert isinstance(target, int)
            assert isinstance(kind, str)
            rid = target
            fed += 1
            state = model.get(rid)
            cancel = session.receive(_frame(rid, kind, n))
            if state is not None and state.ending == "open":
                assert cancel is None
                delivered += 1
                if kind in ("chunk", "last"):
                    state.chunks.append(b"%d" % n)
                state.ending = {"chunk": "open", "last": "end", "end": "end"}.get(kind, "error")
                continue
            # Nobody reads it: a Cancel once per request, only while the worker may go on.
            expect = kind == "chunk" and rid not in cancelled
            assert cancel == (Cancel(rid) if expect else None), (rid, kind, cancelled)
            if cancel is not None:
                answered.append(rid)
                cancelled.add(rid)
        elif op[0] in ("close", "drop"):
            rid = int(op[1])  # type: ignore[call-overload]
            state = model.get(rid)
            if state is None or rid not in streams:
                continue
            if op[0] == "close":
                await streams.pop(rid).aclose()
                if state.ending == "open":
                    cancelled.add(rid)  # through send_cancel
                state.ending = "closed"
            else:
                del streams[rid]  # collected at once: nothing else refers to it
                state.ending = "dropped"
    # The channel closes: nothing stays open, every stream ends as it should.
    session.fail_all(TransportClosed("closed", address=ADDRESS))
    assert len(session) == 0
    assert session.cancel_open() == []
    for rid, stream in streams.items():
        state = model[rid]
        got, error = await _read(stream)
        assert got == state.chunks, (rid, state)  # each in order, none twice, none lost
        if state.ending == "end":
            assert error is None
        elif state.ending == "error":
            assert isinstance(error, RemoteError)
        else:
            assert isinstance(error, TransportClosed)
    # Each frame went to at most one stream; what none took is counted.
    dropped = session.dropped
    assert dropped.undecodable == dropped.unexpected == 0
    assert delivered + dropped.unclaimed == fed
    # At most one Cancel per request, whoever sent it.
    assert len(set(wire.cancels)) == len(wire.cancels)
    assert len(set(answered)) == len(answered)
    assert set(wire.cancels) | set(answered) == cancelled


@given(st.lists(_op, max_size=60))
@settings(max_examples=300, deadline=None)
def test_any_interleaving_leaves_nothing_open_and_delivers_in_order(
    ops: list[tuple[object, ...]],
) -> None:
    asyncio.run(_interleave(ops))
