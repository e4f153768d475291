"""The worker's ASGI plumbing for the HTTP/2 plane: held bytes and one request's reply body.

``_Budget`` counts what the worker holds for its callers beyond running handlers (bodies being
read, replies hypercorn has not sent); ``_Exchange`` writes one request's reply frames into its
HTTP response body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeAlias

from troupe.errors import MessageTooLarge
from troupe.messages._frames import PREFIX_SIZE, Chunk, Error, Reply, encode_framed
from troupe.transports.http2._wire import FRAMES_CONTENT_TYPE

_FRAME_HEADERS: Final = [(b"content-type", FRAMES_CONTENT_TYPE)]
_TEXT_HEADERS: Final = [(b"content-type", b"text/plain; charset=utf-8")]

_Scope: TypeAlias = Mapping[str, Any]
_Message: TypeAlias = Mapping[str, Any]
_Receive: TypeAlias = Callable[[], Awaitable[_Message]]
_Send: TypeAlias = Callable[[dict[str, Any]], Awaitable[None]]


class _Budget:
    """The bytes the worker holds for its callers beyond what running handlers hold themselves.

    :attr:`bodies`: request bodies while they are read; a piece that would take them over
    :attr:`limit` is refused (the request is then answered ``Overloaded``). :attr:`replies`:
    reply frames handed to hypercorn that it has not taken yet (a caller that grants no
    flow-control window leaves them there; after a cancel or a stop they stay until the stream
    or the connection ends); never refused, their writers wait (bounded by the admission
    limits). New requests are refused while the two together reach the limit, but a body
    (a ``Cancel`` among them, which lets replies go) is still read while bodies alone fit.
    """

    __slots__ = ("bodies", "limit", "replies")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bodies = 0
        self.replies = 0

    def take_body(self, size: int) -> bool:
        """Count ``size`` more bytes of bodies if they fit under the limit; whether they did."""
        if self.bodies + size > self.limit:
            return False
        self.bodies += size
        return True

    @property
    def held(self) -> int:
        """Bytes counted now."""
        return self.bodies + self.replies

    @property
    def exceeded(self) -> bool:
        """Whether the bytes held have reached the limit."""
        return self.bodies + self.replies >= self.limit


class _Exchange:
    """The response side of one request being served: writes reply frames into its HTTP body.

    The request's runner task writes chunks; the final frame (``End``/``Error``, or a ``Chunk``
    with ``end``) ends the body.
    A cancel or disconnect closes the exchange without a final frame; the ASGI call that owns it
    then ends the body itself. Either way :attr:`done` resolves exactly once.

    Each frame counts in the server's :class:`_Budget` while hypercorn has not taken it; a write
    that did not return (cancelled, failed) leaves its frame counted in :attr:`stranded` until
    the ASGI call ends.
    """

    __slots__ = ("_budget", "_limit", "_send", "clean", "closed", "done", "stranded")

    def __init__(
        self, send: _Send, limit: int, budget: _Budget, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._send = send
        self._limit = limit
        self._budget = budget
        self.closed = False  # no more frames may be written
        self.clean = False  # the body was ended by a final frame that was fully handed over
        self.stranded = 0  # bytes of writes that never returned: hypercorn may still hold them
        self.done: asyncio.Future[None] = loop.create_future()

    async def send(self, frame: Reply) -> bool:
        """The runner's :data:`~troupe.transports.SendReply` for this request."""
        if self.closed:
            return False
        ok = True
        try:
            data = encode_framed(frame)
            size = len(data) - PREFIX_SIZE
        except MessageTooLarge as huge:  # beyond the 4 GiB a prefix can announce
            data, size = b"", huge.size
        if size > self._limit or not data:
            too_large = MessageTooLarge(size, self._limit)
            data = encode_framed(Error(frame.id, "MessageTooLarge", str(too_large)))
            ok = False
        elif type(frame) is Chunk and not frame.end:
            budget = self._budget
            budget.replies += len(data)
            try:
                await self._send({"type": "http.response.body", "body": data, "more_body": True})
            except BaseException:
                self.stranded += len(data)
                raise
            budget.replies -= len(data)
            return not self.closed
        self.closed = True
        clean = False
        budget = self._budget
        budget.replies += len(data)
        try:
            await self._send({"type": "http.response.body", "body": data, "more_body": False})
            clean = True
        finally:
            if clean:
                budget.replies -= len(data)
            else:
                self.stranded += len(data)
            self._finish(clean)
        return ok

    def abort(self) -> None:
        """Stop writing; the owner ends the body (unless a final frame is being written)."""
        if not self.closed:
            self.closed = True
            self._finish(False)

    def _finish(self, clean: bool) -> None:
        if not self.done.done():
            self.clean = clean
            self.done.set_result(None)


async def _respond_frame(send: _Send, status: int, frame: Error) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _FRAME_HEADERS})
    await send({"type": "http.response.body", "body": encode_framed(frame), "more_body": False})


async def _respond_text(send: _Send, status: int, text: str) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _TEXT_HEADERS})
    await send({"type": "http.response.body", "body": text.encode(), "more_body": False})
