"""What a worker's handler sees of one request: :class:`RequestContext`, and the handler type.

The server builds one context per request. It carries the request's metadata (id, endpoint,
deadline, headers, attempt) and its stop signal, set when the caller cancels or goes away, when
the deadline passes, or when the server shuts down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias, TypeVar

from troupe.messages._frames import Request, RequestId

__all__ = ["Handler", "RequestContext", "StopReason", "is_resumable", "resumable"]

StopReason: TypeAlias = Literal["cancelled", "disconnected", "deadline", "shutdown", "handler"]
"""Why a request was stopped: the caller sent Cancel, the caller's connection went away, the
deadline passed, the server is shutting down, or the handler called :meth:`stop_generating`."""

_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})


class RequestContext:
    """Metadata and stop signal of one request, handed to the handler with the payload.

    ``is_stopped`` may be polled from any thread (sync handlers running on a pool);
    ``wait_stopped`` must be awaited on the loop that created the context.

    Attributes:
        id: the request id chosen by the caller.
        endpoint: the endpoint name called.
        deadline: UNIX epoch seconds after which the answer is useless, or ``None``.
        headers: the caller's string metadata (read-only).
        attempt: 0 for a first try; incremented when the caller re-sends the request.
        received: how many chunks of this request's answer the caller already holds from
            earlier attempts (a router migrating a stream sends it). A handler marked
            :func:`resumable` skips that many of the chunks it would produce.
    """

    __slots__ = (
        "_event",
        "_loop",
        "_reason",
        "attempt",
        "deadline",
        "endpoint",
        "headers",
        "id",
        "received",
    )

    def __init__(
        self,
        id: RequestId,
        endpoint: str,
        *,
        deadline: float | None = None,
        headers: Mapping[str, str] | None = None,
        attempt: int = 0,
        received: int = 0,
    ) -> None:
        self.id = id
        self.endpoint = endpoint
        self.deadline = deadline
        self.headers: Mapping[str, str] = MappingProxyType(dict(headers)) if headers else _EMPTY
        self.attempt = attempt
        self.received = received
        self._reason: StopReason | None = None
        self._event: asyncio.Event | None = None
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    @classmethod
    def from_request(cls, request: Request) -> RequestContext:
        """The context of a decoded wire request."""
        return cls(
            request.id,
            request.endpoint,
            deadline=request.deadline,
            headers=request.headers,
            attempt=request.attempt,
            received=request.received,
        )

    def __repr__(self) -> str:
        state = f"stopped={self._reason}" if self._reason else "running"
        return f"<RequestContext id={self.id!r} endpoint={self.endpoint!r} {state}>"

    def is_stopped(self) -> bool:
        """Whether the handler should stop producing (caller gone, deadline, shutdown)."""
        return self._reason is not None

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the request was stopped, or ``None`` while it runs."""
        return self._reason

    def time_remaining(self) -> float | None:
        """Seconds until the deadline (negative once passed), or ``None`` without one."""
        if self.deadline is None:
            return None
        return self.deadline - time.time()

    def stop_generating(self) -> None:
        """Ask the handler to stop; idempotent. Safe to call from any thread."""
        self.stop("handler")

    def stop(self, reason: StopReason) -> None:
        """Mark the request stopped for ``reason`` (the first reason wins); thread-safe."""
        if self._reason is not None:
            return
        self._reason = reason
        event = self._event
        if event is None:
            return
        loop = self._loop
        if loop is None or _running_loop() is loop:
            event.set()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    async def wait_stopped(self) -> None:
        """Return once the request is stopped."""
        if self._reason is not None:
            return
        if self._event is None:
            self._event = asyncio.Event()
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            if self.is_stopped():  # stopped from another thread meanwhile
                return
        await self._event.wait()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


Handler: TypeAlias = Callable[
    [bytes, RequestContext],
    AsyncIterator[bytes] | Awaitable[bytes | None] | Iterator[bytes] | bytes | None,
]
"""An endpoint handler: ``handler(payload, ctx)``.

Usually an async generator function; each yielded ``bytes`` becomes one response chunk, in order,
and returning ends the stream. A coroutine function is accepted too: its result (unless ``None``)
is sent as the only chunk. So are a sync generator function and a plain function, like them but
run on the event loop's default executor, so that they may block. An exception raised by the
handler is sent to the caller as an error carrying the exception's class name and message; raise
a troupe error (``Overloaded``, ``DeadlineExceeded``, ...) to have the caller re-raise that same
type.
"""


_RESUMABLE: Final = "__troupe_resumable__"

_H = TypeVar("_H", bound=Callable[..., Any])


def resumable(handler: _H) -> _H:
    """Mark ``handler`` as able to continue a stream that another worker started.

    A router migrating a request whose instance failed mid-stream re-sends it with
    ``ctx.received`` = the number of chunks its caller already holds; a resumable handler then
    produces only the rest of its answer (it skips, or does not compute, the first
    ``ctx.received`` chunks). Workers advertise it in their instance record, and a router moves
    a stream that has delivered chunks only to instances that advertise it (or through its own
    ``resume`` hook). Returns ``handler`` itself, so it works as a decorator::

        @resumable
        async def count(request, ctx):
            for n in range(ctx.received, request["to"]):
                yield n
    """
    target = getattr(handler, "__func__", handler)  # a bound method: mark its function
    setattr(target, _RESUMABLE, True)
    return handler


def is_resumable(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` was marked with :func:`resumable`."""
    return bool(getattr(handler, _RESUMABLE, False))
