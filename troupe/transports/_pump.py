"""The handler pump: run one request's handler and send what it yields, on the hot path.

:func:`pump` starts an endpoint handler (through its
:class:`~troupe.transports._adapt.HandlerAdapter`, whatever its kind) for a request the
:class:`~troupe.transports._dispatch.RequestRunner` admitted and sends what it produces through
the transport's :data:`SendReply`: a one-result handler's result as one final chunk (``None``:
no chunk), a generator's items as chunks. The first item is held back while the handler's next
step runs as far as it gets without waiting, so a one-chunk reply is one frame
(``Chunk(end=True)``). A send cancelled while it waits for room hands the cancellation to the
handler where it waits, as ``Task.cancel`` would have (:class:`_Resume`). The runner owns
everything around it: admission, deadlines, refusals, errors and the final ``End``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any, Final, TypeAlias, cast

from troupe.messages._frames import Chunk, Reply, Request, RequestId
from troupe.transports._adapt import HandlerAdapter, is_result
from troupe.transports._context import RequestContext

__all__ = ["SendReply", "pump"]

SendReply: TypeAlias = Callable[[Reply], Awaitable[bool]]
"""Delivers one reply frame to the caller; returns ``False`` when the caller is gone (its
connection closed), which stops the request. Transports apply back-pressure by awaiting, after
handing the frame over: a send cancelled while it waits has still sent its frame."""


def _as_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, bytearray | memoryview):
        return bytes(item)
    raise TypeError(f"handler yielded {type(item).__name__}; handlers must yield bytes")


async def _send_value(
    value: object, rid: RequestId, ctx: RequestContext, send: SendReply
) -> object:
    """Answer a one-result handler's result: one final chunk, or a bare End for ``None``."""
    if value is None:
        return _NEEDS_END
    if not await send(Chunk(rid, _as_bytes(value), True)):
        ctx.stop("disconnected")
        return _GONE
    return _ENDED


# Outcomes of pump, and a marker for "no item held".
_NEEDS_END: Final = object()
_ENDED: Final = object()
_GONE: Final = object()
_NOTHING: Final = object()


class _Resume:
    """Finishes, inside the current task, an awaitable that was stepped once by hand.

    ``step.send(None)`` ran it until it waited for ``yielded`` (a future, or ``None`` for a
    bare yield). Awaiting this object hands ``yielded`` to the task and drives ``step`` on exactly
    as the task would have: resumed when the future is done, or with the exception the task
    receives (its cancellation). A cancellation requested while the step was parked is delivered
    by the task as ``Task.cancel`` would have: it cancels ``yielded`` when it receives it.
    """

    __slots__ = ("_step", "_yielded")

    def __init__(self, step: Generator[Any, Any, object], yielded: object) -> None:
        self._step = step
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, object]:
        step, yielded = self._step, self._yielded
        self._step = self._yielded = None  # type: ignore[assignment]
        exc: BaseException | None = None
        while True:
            if exc is None:
                try:
                    sent = yield yielded
                except BaseException as thrown:  # noqa: BLE001 - forwarded to the step below
                    exc = thrown
                else:
                    try:
                        yielded = step.send(sent)
                    except StopIteration as done:
                        return done.value
                    continue
            try:
                yielded = step.throw(exc)
            except StopIteration as done:
                return done.value
            finally:
                exc = None


async def _stop_step(
    task: asyncio.Task[Any], step: Generator[Any, Any, object], yielded: object
) -> None:
    """Stop a handler step parked on ``yielded`` as ``Task.cancel`` would, and wait for it.

    The task cancels what the step awaits (an inner task, a gather, an executor future) and the
    handler sees the cancellation there. Whatever the step then does short of raising another
    error ends the request quietly; a cancellation of the task from elsewhere is re-raised.
    """
    task.cancel()
    try:
        await _Resume(step, yielded)
    except (asyncio.CancelledError, StopAsyncIteration):
        pass
    finally:
        others = task.uncancel()
    if others:
        raise asyncio.CancelledError


def _cancel_again(task: asyncio.Task[Any]) -> None:
    """Request again the cancellation that interrupted a send, the count unchanged.

    A send is cancelled while it waits for room (the frame is handed over before that): by the
    request's stop (the caller's Cancel, its deadline, shutdown) or by a timeout (or task group)
    the handler holds across the point where it is parked. The cancellation belongs where the
    handler waits: requested again, the task delivers it there, as it would have.
    """
    if task.cancelling():
        task.uncancel()
    task.cancel()


async def _deliver_cancellation(
    task: asyncio.Task[Any], step: Generator[Any, Any, object], yielded: object
) -> object:
    """Hand the cancellation that interrupted a send to the handler's step parked on ``yielded``.

    The handler sees it where it waits and may catch its own timeout and go on.

    Returns:
        The handler's next item; ``_NEEDS_END`` when it ended.

    Raises:
        asyncio.CancelledError: a cancellation meant for the request is still pending once the
            handler ran (it swallowed it): the request ends as if cancelled during the send.
    """
    _cancel_again(task)
    try:
        item = await _Resume(step, yielded)
    except StopAsyncIteration:
        item = _NEEDS_END
    if task.cancelling():
        raise asyncio.CancelledError
    return item


async def _resume_after_cancelled_send(stream: AsyncIterator[object]) -> object:
    """Go on with a handler parked at its ``yield`` after the send of that item was cancelled.

    The handler runs as far as it gets without waiting; where it waits, the cancellation is
    delivered (:func:`_deliver_cancellation`). One that yields again first keeps the cancellation
    requested for its next wait, unless the timeout that armed it has ended meanwhile.

    Returns:
        The handler's next item; ``_NEEDS_END`` when it ended.
    """
    task = asyncio.current_task()
    assert task is not None
    step = anext(stream).__await__()
    try:
        yielded = step.send(None)
    except StopIteration as got:
        if task.cancelling():
            _cancel_again(task)
        return got.value
    except StopAsyncIteration:
        if task.cancelling():
            raise asyncio.CancelledError from None
        return _NEEDS_END
    return await _deliver_cancellation(task, step, yielded)


async def _send_then_resume(
    chunk: Chunk,
    step: Generator[Any, Any, object],
    yielded: object,
    ctx: RequestContext,
    send: SendReply,
) -> object:
    """Send the first chunk while the handler's step waits for ``yielded``, then resume it.

    The wait is handed to the task, which from then on treats it as its own (it cancels what
    the handler awaits when the task is cancelled).

    Returns:
        The handler's next item; ``_NEEDS_END`` when it ended; ``_GONE`` when the caller went away.
    """
    task = asyncio.current_task()
    assert task is not None
    try:
        ok = await send(chunk)
    except asyncio.CancelledError:
        return await _deliver_cancellation(task, step, yielded)
    except BaseException:
        await _stop_step(task, step, yielded)
        raise
    if not ok:
        ctx.stop("disconnected")
        await _stop_step(task, step, yielded)
        return _GONE
    try:
        return await _Resume(step, yielded)
    except StopAsyncIteration:
        return _NEEDS_END


async def _send_rest(
    item: object,
    stream: AsyncIterator[object],
    rid: RequestId,
    ctx: RequestContext,
    send: SendReply,
) -> object:
    """Send ``item`` and every item the handler yields after it.

    Returns:
        ``_NEEDS_END`` when the stream ended; ``_GONE`` when the caller went away.
    """
    while True:
        try:
            ok = await send(Chunk(rid, _as_bytes(item)))
        except asyncio.CancelledError:
            if ctx.stop_reason not in (None, "handler"):
                raise  # the request's stop: the handler is closed at its yield, as always
            # Cancelled while it waited for room by a timeout (or task group) the handler holds
            # across its yield: the handler gets it, as for the first chunk.
            item = await _resume_after_cancelled_send(stream)
            if item is _NEEDS_END:
                return _NEEDS_END
            continue
        if not ok:
            ctx.stop("disconnected")
            return _GONE
        try:
            item = await anext(stream)
        except StopAsyncIteration:
            return _NEEDS_END


async def pump(
    handler: HandlerAdapter, request: Request, ctx: RequestContext, send: SendReply
) -> object:
    """Run the handler, sending what it produces.

    Returns:
        ``_NEEDS_END`` when the stream still needs its ``End``; ``_ENDED`` when the last
        chunk carried it; ``_GONE`` when the caller went away.
    """
    rid = request.id
    result = handler.start(request.payload, ctx)
    if is_result(result):
        return await _send_value(await cast(Awaitable[object], result), rid, ctx, send)
    stream = cast(AsyncIterator[object], result)
    try:
        # The first item is held back while the handler's next step runs, as far as it
        # gets without waiting: a handler that ends there (the usual unary reply) is
        # answered with one frame, Chunk(end=True), instead of Chunk + End. One that waits
        # gets its first chunk sent before it resumes, so streaming is not delayed.
        try:
            first = _as_bytes(await anext(stream))
        except StopAsyncIteration:
            return _NEEDS_END
        step = anext(stream).__await__()
        try:
            yielded = step.send(None)
        except StopIteration as got:  # the next item came without waiting
            second: object = got.value
            yielded = _NOTHING
        except StopAsyncIteration:
            if not await send(Chunk(rid, first, True)):
                ctx.stop("disconnected")
                return _GONE
            return _ENDED
        except BaseException:
            # The handler failed right after its first item: that item still goes first.
            if not await send(Chunk(rid, first)):
                ctx.stop("disconnected")
                return _GONE
            raise
        if yielded is _NOTHING:
            try:
                ok = await send(Chunk(rid, first))
            except asyncio.CancelledError:
                if ctx.stop_reason not in (None, "handler"):
                    raise
                # A timeout the handler holds across its second yield: that item goes out
                # first, and the handler gets the cancellation where it next waits.
                task = asyncio.current_task()
                assert task is not None
                _cancel_again(task)
                ok = True
            if not ok:
                ctx.stop("disconnected")
                return _GONE
        else:
            second = await _send_then_resume(Chunk(rid, first), step, yielded, ctx, send)
            if second is _GONE or second is _NEEDS_END:
                return second
        return await _send_rest(second, stream, rid, ctx, send)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
