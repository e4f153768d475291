"""The caller's side of one request: :class:`ResponseStream` and its helpers.

A client feeds the reply frames of each request into its :class:`ResponseStream`, which turns them
into chunks or typed errors (:func:`remote_error` for the worker's ``Error`` frames) and enforces
timeouts, deadlines and cancellation; one :class:`TimeoutSweep` per client enforces the waiting
limits of all its streams with one timer. The interface they belong to is in
:mod:`troupe.transports._base`, which re-exports them. All methods must be called on the event
loop that owns the transport (the runtime's I/O loop).
"""

from __future__ import annotations

import asyncio
import re
import time
import types
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

from troupe.errors import (
    Cancelled,
    DeadlineExceeded,
    MessageTooLarge,
    Overloaded,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    StreamBroken,
    TroupeError,
    UnknownEndpoint,
)
from troupe.messages._frames import Chunk, End, Error, Reply, RequestId

__all__ = ["ResponseStream", "TimeoutSweep", "remote_error"]


# --- errors carried in Error frames ---------------------------------------------------------------

_SIZES = re.compile(r"message of (\d+) bytes exceeds the limit of (\d+) bytes")


def _too_large(message: str, address: str, endpoint: str) -> TroupeError:
    match = _SIZES.search(message)
    size, limit = (int(match[1]), int(match[2])) if match else (-1, -1)
    return MessageTooLarge(size, limit, address=address)


_REMOTE_KINDS: Final[Mapping[str, Callable[[str, str, str], TroupeError]]] = {
    "Overloaded": lambda message, address, endpoint: Overloaded(endpoint),
    "UnknownEndpoint": lambda message, address, endpoint: UnknownEndpoint(
        endpoint, address=address
    ),
    "DeadlineExceeded": lambda message, address, endpoint: DeadlineExceeded(
        message, address=address
    ),
    "MessageTooLarge": _too_large,
    "Cancelled": lambda message, address, endpoint: Cancelled(message),
    "StreamBroken": lambda message, address, endpoint: StreamBroken(message, address=address),
    "ProtocolError": lambda message, address, endpoint: ProtocolError(message, address=address),
}


def remote_error(
    kind: str, message: str, *, address: str, endpoint: str, traceback: str = ""
) -> TroupeError:
    """The exception a caller raises for an ``Error(kind, message, traceback)`` reply.

    Kinds naming a troupe error the caller can act on (``Overloaded``, ``UnknownEndpoint``,
    ``DeadlineExceeded``, ``MessageTooLarge``, ``Cancelled``, ``StreamBroken``,
    ``ProtocolError``) give that exact class, with the remote message; anything else (the
    handler failed) gives :class:`~troupe.errors.RemoteError` carrying the kind, message,
    endpoint and the remote traceback (sent by a worker logging at debug level).
    """
    factory = _REMOTE_KINDS.get(kind)
    if factory is None:
        return RemoteError(
            kind, message, address=address, endpoint=endpoint, remote_traceback=traceback
        )
    exc = factory(message, address, endpoint)
    exc.args = (message,)
    return exc


# --- the caller's side of one request -------------------------------------------------------------

# Queued after a Chunk that ends the stream (``end=True``): the consumer then stops as at End.
_END: Final = End(0)

_OPEN: Final = 0  # waiting for frames
_ENDED: Final = 1  # the last frame (End, Error or a failure) is queued, not yet consumed
_DONE: Final = 2  # the caller consumed the end, or closed the stream

_SWEEP_TICK: Final = 0.1
"""Seconds between two sweeps of a :class:`TimeoutSweep`."""


class TimeoutSweep:
    """Enforces the waiting limits of many :class:`ResponseStream` objects with one timer.

    A timer per wait (``loop.call_at`` and its ``cancel``) costs more than the rest of a short
    request's bookkeeping, and almost never fires. A client owns one sweep for its streams: a
    limit more than one tick away waits in a dict, looked at every ``tick`` seconds while
    something waits; a limit that comes within a tick then gets its own timer, so a timeout
    still fires on time. Used on the client's event loop only.

    Args:
        loop: the client's event loop.
        tick: seconds between sweeps.
    """

    __slots__ = ("_closed", "_loop", "_tick", "_timer", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = _SWEEP_TICK) -> None:
        self._loop = loop
        self._tick = tick
        self._waiting: dict[ResponseStream, float] = {}  # stream -> loop time of its limit
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def watch(self, stream: ResponseStream, limit: float) -> asyncio.TimerHandle | None:
        """Call ``stream._on_timer`` at loop time ``limit`` unless :meth:`unwatch` comes first.

        Returns:
            The timer when the limit is near (cancel it instead of calling :meth:`unwatch`);
            ``None`` when the stream waits for the sweep.
        """
        loop = self._loop
        if self._closed or limit - loop.time() <= self._tick:
            return loop.call_at(limit, stream._on_timer)
        self._waiting[stream] = limit
        if self._timer is None:
            self._timer = loop.call_later(self._tick, self._sweep)
        return None

    def unwatch(self, stream: ResponseStream) -> None:
        """``stream`` stopped waiting."""
        self._waiting.pop(stream, None)

    def _sweep(self) -> None:
        self._timer = None
        waiting = self._waiting
        horizon = self._loop.time() + self._tick
        due = [stream for stream, limit in waiting.items() if limit <= horizon]
        for stream in due:
            stream._arm(waiting.pop(stream))
        if waiting and not self._closed:
            self._timer = self._loop.call_later(self._tick, self._sweep)

    def close(self) -> None:
        """Stop sweeping; streams still waiting (and later ones) get a timer each."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, {}
        for stream, limit in waiting.items():
            stream._arm(limit)


class ResponseStream:
    """The answer to one request: an async iterator of ``bytes`` chunks.

    Iteration ends normally after the worker's ``End``; a failure raises a typed troupe error
    (:func:`remote_error` for the worker's ``Error``, or what the transport reports:
    ``StreamBroken``, ``ConnectionLost``, ``TransportClosed``). Waiting for the next frame longer
    than ``request_timeout`` raises :class:`~troupe.errors.RequestTimeout`; passing ``deadline``
    raises :class:`~troupe.errors.DeadlineExceeded`. Closing the stream early
    (:meth:`aclose`, leaving ``async with``), a timeout, or cancelling the task that awaits it
    sends ``Cancel`` to the worker.

    Transports create it and feed it with :meth:`deliver` and :meth:`fail`, on the loop thread.
    A transport may subclass it and override :meth:`_send_cancel` and :meth:`_finished` instead
    of passing ``cancel`` and ``on_finish`` (two closures less per request).

    Args:
        request_id: the id of the request on its transport.
        address: the worker's address (for error messages).
        endpoint: the endpoint called.
        cancel: sends ``Cancel`` for this request; called at most once, never blocks.
        request_timeout: the longest wait for the next frame, in seconds; ``None`` for no limit.
        deadline: UNIX epoch seconds after which the caller gives up; ``None`` for no deadline.
        on_finish: called once when no more frames are expected (end received, failure, or the
            caller closed the stream), so the transport can forget the request.
        sweep: the client's :class:`TimeoutSweep`; without one, every wait has its own timer.
    """

    __slots__ = (
        "__weakref__",
        "_cancel",
        "_deadline",
        "_items",
        "_loop",
        "_on_finish",
        "_request_timeout",
        "_state",
        "_sweep",
        "_timer",
        "_waiter",
        "address",
        "endpoint",
        "request_id",
    )

    def __init__(
        self,
        request_id: RequestId,
        *,
        address: str,
        endpoint: str,
        cancel: Callable[[], None] | None = None,
        request_timeout: float | None = None,
        deadline: float | None = None,
        on_finish: Callable[[], None] | None = None,
        sweep: TimeoutSweep | None = None,
    ) -> None:
        self.request_id = request_id
        self.address = address
        self.endpoint = endpoint
        self._cancel = cancel
        self._request_timeout = request_timeout
        self._deadline = deadline
        self._on_finish = on_finish
        self._sweep = sweep
        self._loop = asyncio.get_running_loop()
        self._items: deque[Reply | TroupeError] = deque()
        self._state = _OPEN
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        state = ("open", "ended", "done")[self._state]
        return (
            f"<ResponseStream id={self.request_id!r} {self.endpoint!r} at {self.address} {state}>"
        )

    @property
    def finished(self) -> bool:
        """Whether no more frames will arrive (the end is queued or consumed, or closed)."""
        return self._state != _OPEN

    # --- hooks for transports --------------------------------------------------------------------

    def _send_cancel(self) -> None:
        """Tell the worker to stop (at most once, never blocks): calls ``cancel``."""
        if self._cancel is not None:
            self._cancel()

    def _finished(self) -> None:
        """No more frames are expected (called once): calls ``on_finish``."""
        on_finish, self._on_finish = self._on_finish, None
        if on_finish is not None:
            on_finish()

    # --- producer side (the transport) -----------------------------------------------------------

    def deliver(self, frame: Reply) -> None:
        """Queue a reply frame; frames after the end are ignored."""
        if self._state != _OPEN:
            return
        items = self._items
        items.append(frame)
        if type(frame) is not Chunk:
            self._state = _ENDED
            self._finished()
        elif frame.end:
            items.append(_END)
            self._state = _ENDED
            self._finished()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: TroupeError) -> None:
        """End the stream with ``exc`` (after the chunks already queued)."""
        if self._state != _OPEN:
            return
        self._items.append(exc)
        self._state = _ENDED
        self._finished()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- consumer side ---------------------------------------------------------------------------

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> bytes:
        items = self._items
        while True:
            if items:
                item = items.popleft()
                if type(item) is Chunk:
                    return item.data
                self._state = _DONE
                items.clear()
                if type(item) is End:
                    raise StopAsyncIteration
                if type(item) is Error:
                    raise remote_error(
                        item.kind,
                        item.message,
                        address=self.address,
                        endpoint=self.endpoint,
                        traceback=item.traceback,
                    )
                assert isinstance(item, TroupeError)
                raise item
            if self._state == _DONE:
                raise StopAsyncIteration
            # Wait for the next frame (inline rather than a helper coroutine: one less per wait).
            loop = self._loop
            waiter = self._waiter = loop.create_future()
            limit = None
            if self._request_timeout is not None:
                limit = loop.time() + self._request_timeout
            if self._deadline is not None:
                until_deadline = loop.time() + (self._deadline - time.time())
                if limit is None or until_deadline <= limit:
                    limit = until_deadline
            sweep = self._sweep
            if limit is not None:
                if sweep is None:
                    self._timer = loop.call_at(limit, self._on_timer)
                else:
                    self._timer = sweep.watch(self, limit)
            try:
                await waiter
            except asyncio.CancelledError:
                self._abandon()
                raise
            finally:
                self._waiter = None
                timer = self._timer
                if timer is not None:
                    self._timer = None
                    timer.cancel()
                elif limit is not None and sweep is not None:
                    sweep.unwatch(self)

    def _arm(self, limit: float) -> None:
        """Called by the sweep: the limit is near; give this wait its own timer."""
        if self._waiter is not None and self._timer is None:
            self._timer = self._loop.call_at(limit, self._on_timer)

    def _on_timer(self) -> None:
        if self._state != _OPEN:
            return
        if self._deadline is not None and time.time() >= self._deadline:
            exc: TroupeError = DeadlineExceeded(
                f"deadline passed waiting for {self.endpoint!r} at {self.address}",
                address=self.address,
            )
        else:
            exc = RequestTimeout(self.address, self._request_timeout or 0.0)
        self._send_cancel()
        self.fail(exc)

    def _abandon(self) -> None:
        """The caller no longer wants the answer: tell the worker if it is still working."""
        state = self._state
        if state == _DONE:
            return
        self._state = _DONE
        self._items.clear()
        if state == _OPEN:
            self._send_cancel()
            self._finished()

    def close(self) -> None:
        """Stop receiving; sends ``Cancel`` if the worker has not finished. Idempotent.

        The synchronous form of :meth:`aclose`, for code on the stream's loop thread.
        """
        self._abandon()

    async def aclose(self) -> None:
        """Stop receiving; sends ``Cancel`` if the worker has not finished. Idempotent."""
        self._abandon()

    async def collect(self) -> list[bytes]:
        """Read the whole stream into a list of chunks."""
        return [chunk async for chunk in self]

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self._abandon()
