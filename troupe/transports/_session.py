"""The caller's side of the request plane, written once: :class:`CallerSession` (sans-IO).

Every client multiplexes many requests over a channel it reads replies from (a ZeroMQ connection
on tcp, an HTTP/2 client, a NATS inbox, an in-process client) and needs the same bookkeeping for
it: number and encode the requests, keep the table of open streams by request id, hand each reply
frame to its stream, answer a reply that nobody waits for any more with a ``Cancel``, and fail
every open stream when the channel closes or breaks. :class:`CallerSession` is that bookkeeping
and nothing else, like h2's ``H2Connection`` (frames in, what to send out): no socket, no task, no
timer. Reply frames go into the streams (:class:`SessionStream`, a
:class:`~troupe.transports.ResponseStream`: a queue, not I/O); the ``Cancel`` frames a transport
must send come back from :meth:`CallerSession.receive` and its kin, or through the session's
``send_cancel`` hook when a caller closes its stream. What it drops is counted (:class:`Dropped`).

Streams are held weakly: one that its caller drops without closing is collected, and its next
reply is answered with a ``Cancel``. A transport that wants to stop the worker at once passes
``on_collected`` (tcp and NATS do) and calls :meth:`CallerSession.collected` on its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Generic, TypeVar

from troupe._support._logging import TroupeLogger, get_logger
from troupe.errors import MessageTooLarge, ProtocolError, TroupeError
from troupe.messages._frames import (
    Cancel,
    Chunk,
    End,
    Error,
    Frame,
    Reply,
    RequestId,
    Undecodable,
    decode,
    decode_message,
    encode_request,
)
from troupe.transports._stream import ResponseStream

__all__ = ["CallerSession", "Dropped", "RequestIds", "SessionStream", "StreamRef", "collect_on"]

S = TypeVar("S", bound="SessionStream")

_NONE: Final[tuple[Cancel, ...]] = ()

CANCEL_MEMORY: Final = 1024
"""Request ids a session remembers as cancelled, so late replies send no second ``Cancel``."""


class RequestIds:
    """A client's request ids: 1, 2, 3... or, with a prefix, ``"<prefix>1"``, ``"<prefix>2"``...
    and the encoding of its requests with them (:meth:`encode`).

    One per client, shared by its sessions where it has several (tcp: one per connection), so
    that ids stay unique per client.

    Attributes:
        kind: ``int`` or ``str``: a reply whose id is of the other kind is not this client's.
    """

    __slots__ = ("_next", "kind")

    def __init__(self, prefix: str | None = None) -> None:
        counter = itertools.count(1)
        self.kind: type[int] | type[str]
        self._next: Callable[[], RequestId]
        if prefix is None:
            self.kind = int
            self._next = counter.__next__
        else:
            self.kind = str
            template = prefix.replace("{", "{{").replace("}", "}}") + "{}"
            self._next = map(template.format, counter).__next__

    def encode(
        self,
        address: str,
        endpoint: str,
        payload: bytes,
        *,
        deadline: float | None = None,
        headers: Mapping[str, str] | None = None,
        attempt: int = 0,
        received: int = 0,
        limit: int,
        variable: str = "",
    ) -> tuple[RequestId, bytes]:
        """Take the next id and encode a request with it (the arguments of ``Client.request``).

        Args:
            limit: the largest encoded request the transport carries, in bytes.
            variable: the setting that sets ``limit``, named in the error.

        Raises:
            InvalidRequest: the arguments do not make a request a worker can decode.
            MessageTooLarge: the encoded request exceeds ``limit``; nothing is to be sent.
        """
        rid = self._next()
        data = encode_request(
            rid,
            endpoint,
            payload,
            deadline=deadline,
            headers=headers,
            attempt=attempt,
            received=received,
        )
        if len(data) > limit:
            raise MessageTooLarge(len(data), limit, address=address, variable=variable)
        return rid, data


class Dropped:
    """What a session dropped, counted by reason since it was made.

    Attributes:
        undecodable: messages or frames that could not be read (a stream such a frame names is
            failed with ``ProtocolError``).
        unexpected: frames a caller never receives: requests, cancels, ids of another kind.
        unclaimed: replies for no open stream (it ended, was cancelled, or was dropped).
    """

    __slots__ = ("unclaimed", "undecodable", "unexpected")

    def __init__(self) -> None:
        self.undecodable = 0
        self.unexpected = 0
        self.unclaimed = 0

    def as_dict(self) -> dict[str, int]:
        """The counts by reason."""
        return {
            "undecodable": self.undecodable,
            "unexpected": self.unexpected,
            "unclaimed": self.unclaimed,
        }

    def __repr__(self) -> str:
        counts = ", ".join(f"{reason}={count}" for reason, count in self.as_dict().items())
        return f"Dropped({counts})"


class SessionStream(ResponseStream):
    """A :class:`~troupe.transports.ResponseStream` opened in a :class:`CallerSession`.

    When it ends it leaves the session's table; when its caller gives up (closes it, times out,
    is cancelled) its ``Cancel`` goes through the session, which remembers it, to the session's
    ``send_cancel``. Transports that need more per stream (HTTP/2: its call) subclass it.
    """

    __slots__ = ("session",)

    session: CallerSession[Any]

    def _send_cancel(self) -> None:
        self.session._cancel_stream(self)

    def _finished(self) -> None:
        self.session._entries.pop(self.request_id, None)


class StreamRef(weakref.ref[S]):
    """A session's weak reference to an open stream. It remembers what a ``Cancel`` needs once
    the stream is gone: the request id and the worker's address.

    Attributes:
        rid: the request id.
        address: the worker's address, as the request was sent to it.
    """

    __slots__ = ("address", "rid")

    rid: RequestId
    address: str

    def __new__(cls, stream: S, callback: Callable[[StreamRef[S]], None] | None) -> StreamRef[S]:
        self = super().__new__(cls, stream, callback)
        self.rid = stream.request_id
        self.address = stream.address
        return self

    def __init__(self, stream: S, callback: Callable[[StreamRef[S]], None] | None) -> None:
        # ref.__init__ takes (ob, callback); typeshed does not declare it.
        super().__init__(stream, callback)  # type: ignore[call-arg]


def collect_on(
    loop: asyncio.AbstractEventLoop, handle: Callable[[StreamRef[S]], None]
) -> Callable[[StreamRef[S]], None]:
    """An ``on_collected`` hook that runs ``handle`` on ``loop``.

    The hook runs wherever the garbage collector runs: any thread, possibly in the middle of loop
    code that iterates the session's table. So it only schedules ``handle`` (which calls
    :meth:`CallerSession.collected` and sends the ``Cancel``) on the loop.
    """

    def hook(ref: StreamRef[S]) -> None:
        if loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to stop
            loop.call_soon_threadsafe(handle, ref)

    return hook


class CallerSession(Generic[S]):
    """The open requests of one channel, by request id: what a reply belongs to, what to cancel.

    Used from one thread (the transport's event loop), except ``on_collected``, which runs
    wherever the garbage collector runs.

    Args:
        send_cancel: sends the ``Cancel`` of a stream whose caller gave up; never blocks.
        ids: the client's request ids; a fresh :class:`RequestIds` of ints when ``None``.
        on_collected: called with the :class:`StreamRef` of a stream collected while still open
            (its caller dropped it without closing it), from any thread (see
            :func:`collect_on`); the transport then calls :meth:`collected` on its loop, which
            gives the ``Cancel`` to send. Without it, the stream's next reply is answered with
            ``Cancel`` instead.
        cancel_memory: how many cancelled ids are remembered, so that late replies to them send
            no second ``Cancel``; 0 answers every late chunk (for a transport where a ``Cancel``
            costs nothing: the in-process one).
        log: where drops are logged (debug level), bound with what names the channel.
    """

    __slots__ = (
        "_cancelled",
        "_entries",
        "_ids",
        "_log",
        "_memory",
        "_on_collected",
        "_send_cancel",
        "dropped",
    )

    def __init__(
        self,
        send_cancel: Callable[[S, Cancel], None],
        *,
        ids: RequestIds | None = None,
        on_collected: Callable[[StreamRef[S]], None] | None = None,
        cancel_memory: int = CANCEL_MEMORY,
        log: TroupeLogger | None = None,
    ) -> None:
        self._send_cancel = send_cancel
        self._ids = ids if ids is not None else RequestIds()
        self._on_collected = on_collected
        self._memory = cancel_memory
        self._log = log if log is not None else get_logger("troupe.transports")
        self._entries: dict[RequestId, StreamRef[S]] = {}
        self._cancelled: dict[RequestId, None] = {}
        self.dropped = Dropped()
        """What this session dropped, by reason."""

    def __repr__(self) -> str:
        return f"<CallerSession open={len(self._entries)} {self.dropped!r}>"

    # --- the table -------------------------------------------------------------------------------

    @property
    def streams(self) -> Mapping[RequestId, StreamRef[S]]:
        """The open requests: request id -> weak reference to the stream (read only)."""
        return self._entries

    def __len__(self) -> int:
        """Requests open (a stream dropped unclosed counts until the session notices)."""
        return len(self._entries)

    def __contains__(self, rid: object) -> bool:
        return rid in self._entries

    def get(self, rid: RequestId) -> S | None:
        """The open stream of request ``rid``, if its caller still holds it."""
        entry = self._entries.get(rid)
        return None if entry is None else entry()

    def live(self) -> list[S]:
        """The open streams, forgetting those their callers dropped (unless ``on_collected``
        will: :meth:`collected` then gives their ``Cancel``)."""
        entries = self._entries
        live: list[S] = []
        for rid, entry in list(entries.items()):
            stream = entry()
            if stream is not None:
                live.append(stream)
            elif self._on_collected is None:
                del entries[rid]
        return live

    # --- requests --------------------------------------------------------------------------------

    @property
    def ids(self) -> RequestIds:
        """The client's request ids; :meth:`RequestIds.encode` numbers and encodes a request."""
        return self._ids

    def open(self, stream: S) -> S:
        """Register ``stream`` (whose request is about to be sent) under its request id."""
        stream.session = self
        self._entries[stream.request_id] = StreamRef(stream, self._on_collected)
        return stream

    def forget(self, rid: RequestId) -> None:
        """Request ``rid`` expects no more replies (its send failed); it is not cancelled."""
        self._entries.pop(rid, None)

    def cancel(self, rid: RequestId) -> Cancel:
        """The ``Cancel`` frame for ``rid``, remembered so late replies to it send no other."""
        if self._memory:
            cancelled = self._cancelled
            cancelled[rid] = None
            if len(cancelled) > self._memory:
                del cancelled[next(iter(cancelled))]
        return Cancel(rid)

    def _cancel_stream(self, stream: S) -> None:
        self._send_cancel(stream, self.cancel(stream.request_id))

    def collected(self, ref: StreamRef[S]) -> Cancel | None:
        """A stream was collected while open (``on_collected`` saw it): forget it.

        Returns:
            The ``Cancel`` to send, unless the request was forgotten or cancelled meanwhile.
        """
        rid = ref.rid
        if self._entries.get(rid) is not ref:
            return None  # already forgotten (a reply came first, or the channel closed)
        del self._entries[rid]
        if rid in self._cancelled:
            return None
        return self.cancel(rid)

    def cancel_open(self) -> list[tuple[S, Cancel]]:
        """Every stream still open (and not cancelled yet), with the ``Cancel`` to send for it:
        a client that closes tells its workers at once."""
        cancels: list[tuple[S, Cancel]] = []
        cancelled = self._cancelled
        for rid, entry in self._entries.items():
            stream = entry()
            if stream is not None and not stream.finished and rid not in cancelled:
                cancels.append((stream, self.cancel(rid)))
        return cancels

    def fail_all(self, error: TroupeError | Callable[[S], TroupeError]) -> int:
        """End every open stream with ``error`` (or ``error(stream)``) and forget them all: the
        channel closed or broke.

        Returns:
            How many streams it failed.
        """
        streams = [entry() for entry in self._entries.values()]
        self._entries.clear()
        failed = 0
        for stream in streams:
            if stream is not None and not stream.finished:
                stream.fail(error if isinstance(error, TroupeError) else error(stream))
                failed += 1
        return failed

    # --- replies ---------------------------------------------------------------------------------

    def receive(self, frame: Frame | Undecodable, rid: RequestId | None = None) -> Cancel | None:
        """Hand one decoded reply frame to its stream.

        Args:
            frame: the frame.
            rid: the request it answers, where the channel says so (an HTTP/2 response body
                carries the frames of one request, whatever id they carry; a worker answers a
                body it could not read with a placeholder id); otherwise the frame's own id.

        Returns:
            The ``Cancel`` to send when the frame belongs to no open stream and its worker may
            still be working on it (a chunk that does not end the stream, not yet cancelled).
        """
        if type(frame) is Chunk or type(frame) is End or type(frame) is Error:
            key = frame.id if rid is None else rid
            entry = self._entries.get(key)
            if entry is not None:
                stream = entry()
                if stream is not None:
                    stream.deliver(frame)
                    return None
            return self._unclaimed(frame, key, entry)
        if type(frame) is Undecodable:
            return self._undecodable(frame)
        self.dropped.unexpected += 1
        self._log.debug("dropping an unexpected frame", frame=type(frame).__name__)
        return None

    def receive_data(self, data: bytes) -> Cancel | None:
        """Decode one encoded frame and :meth:`receive` it (an undecodable one is dropped)."""
        try:
            frame = decode(data)
        except ProtocolError as exc:
            self.dropped.undecodable += 1
            self._log.debug("dropping an undecodable reply", error=str(exc))
            return None
        return self.receive(frame)

    def receive_message(self, data: bytes) -> Sequence[Cancel]:
        """:meth:`receive` the frames of one message: a frame or a batch of them
        (:func:`~troupe.messages._frames.decode_message`).

        Returns:
            The ``Cancel`` frames to send (usually none).
        """
        try:
            frames = decode_message(data)
        except ProtocolError as exc:
            self.dropped.undecodable += 1
            self._log.debug("dropping an undecodable reply", error=str(exc))
            return _NONE
        entries = self._entries
        cancels: Sequence[Cancel] = _NONE
        for frame in frames:
            # The common case inline (one call less per frame); the rest in receive().
            if type(frame) is Chunk or type(frame) is End or type(frame) is Error:
                entry = entries.get(frame.id)
                if entry is not None:
                    stream = entry()
                    if stream is not None:
                        stream.deliver(frame)
                        continue
            cancel = self.receive(frame)
            if cancel is not None:
                cancels = [*cancels, cancel]
        return cancels

    def _unclaimed(self, frame: Reply, rid: RequestId, entry: StreamRef[S] | None) -> Cancel | None:
        if type(rid) is not self._ids.kind:
            self.dropped.unexpected += 1  # not an id this client gives out
            return None
        self.dropped.unclaimed += 1
        if entry is not None:  # its caller dropped it without closing it
            if self._on_collected is not None:
                return None  # collected() forgets it and gives its Cancel
            del self._entries[rid]
        if type(frame) is Chunk and not frame.end and rid not in self._cancelled:
            return self.cancel(rid)  # nobody reads this stream any more: stop the worker
        return None

    def _undecodable(self, frame: Undecodable) -> Cancel | None:
        """Fail the one stream an undecodable reply belongs to, when its id can be read."""
        self.dropped.undecodable += 1
        rid = frame.id
        self._log.debug("undecodable reply", id=rid, error=str(frame.error))
        if rid is None or type(rid) is not self._ids.kind:
            return None
        entry = self._entries.get(rid)
        stream = None if entry is None else entry()
        if stream is None:
            return None  # a dropped stream is cancelled as such (its next reply, or collected())
        address = stream.address
        stream.fail(
            ProtocolError(f"undecodable reply from {address}: {frame.error}", address=address)
        )
        if frame.tag == "chunk" and rid not in self._cancelled:
            return self.cancel(rid)  # the worker may go on sending: stop it
        return None
