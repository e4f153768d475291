"""The server side shared by every transport: run endpoint handlers for decoded requests.

A transport decodes a :class:`~troupe.transports._codec.Request` and hands it to
:meth:`RequestRunner.dispatch` with a key naming the request on that transport (peer identity and
request id, reply inbox, ...) and a ``send`` coroutine that delivers reply frames. The runner
applies the semantics every plane shares: unknown endpoints, deadlines (an expired request is
never started; one that expires mid-stream is stopped), cancellation by key, handler exceptions
turned into :class:`~troupe.transports._codec.Error` frames, in-flight accounting and a graceful
close. Each request runs as its own task, so a slow request never blocks the next.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Hashable
from typing import Any, Final, TypeAlias, cast

from troupe.errors import ConfigError, InvalidName
from troupe.transports._codec import Chunk, End, Error, Reply, Request, RequestId
from troupe.transports._context import Handler, RequestContext, StopReason

__all__ = ["RequestRunner", "SendReply", "error_frame"]

_log = logging.getLogger("troupe.transports")

SendReply: TypeAlias = Callable[[Reply], Awaitable[bool]]
"""Delivers one reply frame to the caller; returns ``False`` when the caller is gone (its
connection closed), which stops the request. Transports apply back-pressure by awaiting, after
handing the frame over: a send cancelled while it waits has still sent its frame."""

_MAX_ERROR_MESSAGE: Final = 16 * 1024


def error_frame(request_id: RequestId, exc: BaseException) -> Error:
    """The :class:`Error` frame reporting ``exc`` (class name and message) to the caller."""
    message = str(exc)
    if len(message) > _MAX_ERROR_MESSAGE:
        message = message[:_MAX_ERROR_MESSAGE] + "... (truncated)"
    return Error(request_id, type(exc).__name__, message)


def _as_bytes(item: object) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, bytearray | memoryview):
        return bytes(item)
    raise TypeError(f"handler yielded {type(item).__name__}; handlers must yield bytes")


async def _send_value(
    value: object, rid: RequestId, ctx: RequestContext, send: SendReply
) -> object:
    """Answer a coroutine handler's result: one final chunk, or a bare End for ``None``."""
    if value is None:
        return _NEEDS_END
    if not await send(Chunk(rid, _as_bytes(value), True)):
        ctx.stop("disconnected")
        return _GONE
    return _ENDED


def _expire(ctx: RequestContext, task: asyncio.Task[object]) -> None:
    if not task.done() and not ctx.is_stopped():
        ctx.stop("deadline")
        task.cancel()


# Outcomes of RequestRunner._pump, and a marker for "no item held".
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


class _Active:
    """One running request: its task and context."""

    __slots__ = ("ctx", "task")

    def __init__(self, task: asyncio.Task[None], ctx: RequestContext) -> None:
        self.task = task
        self.ctx = ctx


class RequestRunner:
    """Runs handlers for the requests a server receives.

    Must be used from the event loop thread that owns the server.

    Args:
        name: names the request tasks (``{name}-{endpoint}-{id}``) and log lines.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._handlers: dict[str, Handler] = {}
        self._active: dict[Hashable, _Active] = {}
        self._extra: set[asyncio.Task[None]] = set()
        self._accepting = True
        self._idle: asyncio.Event | None = None

    # --- endpoints -------------------------------------------------------------------------------

    def add_endpoint(self, name: str, handler: Handler) -> None:
        """Serve ``handler`` as endpoint ``name``.

        Raises:
            InvalidName: the name is empty or not a string.
            ConfigError: the endpoint is already served.
        """
        if not isinstance(name, str) or not name:
            raise InvalidName("endpoint", name, "a non-empty endpoint name")
        if not callable(handler):
            raise ConfigError("endpoint handler", handler, "a callable handler(payload, ctx)")
        if name in self._handlers:
            raise ConfigError("endpoint", name, "an endpoint not already served by this server")
        self._handlers[name] = handler

    def remove_endpoint(self, name: str) -> None:
        """Stop serving ``name`` to new requests; running ones finish. Unknown names are ignored."""
        self._handlers.pop(name, None)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoint names served, in the order they were added."""
        return tuple(self._handlers)

    @property
    def inflight(self) -> int:
        """Requests currently running."""
        return len(self._active)

    @property
    def accepting(self) -> bool:
        """False once :meth:`close` began: new requests are refused."""
        return self._accepting

    # --- requests --------------------------------------------------------------------------------

    def dispatch(self, key: Hashable, request: Request, send: SendReply) -> None:
        """Start serving ``request``; replies go through ``send``.

        ``key`` names the request for :meth:`cancel`; a key already running is refused with a
        ``ProtocolError`` reply.
        """
        if not self._accepting:
            self._reply_once(send, Error(request.id, "Overloaded", "worker is shutting down"))
            return
        if key in self._active:
            self._reply_once(
                send, Error(request.id, "ProtocolError", f"duplicate request id {request.id!r}")
            )
            return
        ctx = RequestContext.from_request(request)
        task = asyncio.get_running_loop().create_task(
            self._serve(request, ctx, send), name=f"{self._name}-{request.endpoint}-{request.id}"
        )
        self._active[key] = _Active(task, ctx)
        task.add_done_callback(functools.partial(self._finished, key))

    def cancel(self, key: Hashable, reason: StopReason = "cancelled") -> bool:
        """Stop the request named ``key``: set its context stopped and cancel its task.

        Returns:
            Whether such a request was running.
        """
        active = self._active.get(key)
        if active is None:
            return False
        active.ctx.stop(reason)
        active.task.cancel()
        return True

    def cancel_where(self, match: Callable[[Hashable], bool], reason: StopReason) -> int:
        """Stop every request whose key matches (e.g. all of one disconnected peer)."""
        keys = [key for key in self._active if match(key)]
        for key in keys:
            self.cancel(key, reason)
        return len(keys)

    def _finished(self, key: Hashable, task: asyncio.Task[None]) -> None:
        active = self._active.get(key)
        if active is not None and active.task is task:
            del self._active[key]
        if not task.cancelled() and task.exception() is not None:
            _log.error("request task %s failed", task.get_name(), exc_info=task.exception())
        if not self._active and self._idle is not None:
            self._idle.set()

    def _reply_once(self, send: SendReply, frame: Error) -> None:
        async def reply() -> None:
            await send(frame)

        task = asyncio.get_running_loop().create_task(
            reply(), name=f"{self._name}-reply-{frame.id}"
        )
        self._extra.add(task)
        task.add_done_callback(self._extra.discard)

    async def _serve(self, request: Request, ctx: RequestContext, send: SendReply) -> None:
        rid = request.id
        if request.deadline is not None and request.deadline <= time.time():
            ctx.stop("deadline")
            await send(
                Error(rid, "DeadlineExceeded", f"deadline passed before request {rid!r} started")
            )
            return
        handler = self._handlers.get(request.endpoint)
        if handler is None:
            await send(Error(rid, "UnknownEndpoint", f"unknown endpoint {request.endpoint!r}"))
            return
        timer = None
        if request.deadline is not None:
            # Like asyncio.timeout, but the handler sees ctx.stop_reason == "deadline" together
            # with its cancellation.
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
            assert task is not None
            timer = loop.call_at(loop.time() + (request.deadline - time.time()), _expire, ctx, task)
        try:
            finished = await self._pump(handler, request, ctx, send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if ctx.stop_reason == "deadline" and task is not None and task.uncancel() == 0:
                await send(Error(rid, "DeadlineExceeded", f"deadline passed while serving {rid!r}"))
                return
            if ctx.stop_reason == "shutdown":
                # Tell the caller now rather than let it wait for the connection to drop.
                await send(Error(rid, "StreamBroken", "worker shut down during the request"))
            raise
        except Exception as exc:  # noqa: BLE001 - a handler's error is reported to its caller
            await send(error_frame(rid, exc))
            return
        finally:
            if timer is not None:
                timer.cancel()
        if finished is _NEEDS_END:
            await send(End(rid))

    @staticmethod
    async def _pump(
        handler: Handler, request: Request, ctx: RequestContext, send: SendReply
    ) -> object:
        """Run the handler, sending what it yields.

        Returns:
            ``_NEEDS_END`` when the stream still needs its ``End``; ``_ENDED`` when the last
            chunk carried it; ``_GONE`` when the caller went away.
        """
        rid = request.id
        result = handler(request.payload, ctx)
        # An async generator (the usual handler) is recognised by its exact type: cheaper than
        # inspect.isawaitable on every request.
        if type(result) is not types.AsyncGeneratorType and inspect.isawaitable(result):
            return await _send_value(await result, rid, ctx, send)
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

    # --- shutdown --------------------------------------------------------------------------------

    async def close(self, grace: float = 0.0) -> None:
        """Refuse new requests, let running ones finish for ``grace`` seconds, stop the rest.

        Stopped requests see ``ctx.stop_reason == "shutdown"`` and task cancellation; their
        callers receive a ``StreamBroken`` error.
        """
        self._accepting = False
        if grace > 0 and self._active:
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                pass
        tasks = [active.task for active in self._active.values()]
        for key in list(self._active):
            self.cancel(key, "shutdown")
        tasks.extend(self._extra)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
