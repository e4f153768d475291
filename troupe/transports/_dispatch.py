"""The server side shared by every transport: run endpoint handlers for decoded requests.

A transport decodes a :class:`~troupe.transports._codec.Request` and hands it to
:meth:`RequestRunner.start` with a key naming the request on that transport (peer identity and
request id, reply inbox, ...), the caller it came from and a ``send`` coroutine that delivers reply
frames. The runner applies the semantics every plane shares: unknown endpoints, deadlines (an
expired request is never started; one that expires mid-stream is stopped), cancellation by key,
handler exceptions turned into :class:`~troupe.transports._codec.Error` frames and logged with
their traceback (:mod:`troupe.transports._failures`), in-flight accounting and a graceful
close. Each request runs as its own task, so a slow request never blocks the next.

Admission: the runner holds at most ``max_inflight`` requests at once, and at most
``max_inflight_per_caller`` for one caller (``DYN_WORKER_MAX_INFLIGHT``,
``DYN_WORKER_MAX_INFLIGHT_PER_CALLER``), so a flood from callers that never read their replies
cannot grow the worker without bound. A request is refused before any task exists for it: ``start``
returns the refusal (``Overloaded``, ``UnknownEndpoint``, ...) and the transport sends it without
waiting, dropping it (counted in :class:`~troupe._metrics.ServerMetrics`) for a caller whose reply
queue is full.
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

from troupe._metrics import ServerMetrics
from troupe.config import WorkerConfig
from troupe.errors import ConfigError, InvalidName, Overloaded
from troupe.transports._codec import Chunk, End, Error, Reply, Request, RequestId
from troupe.transports._context import Handler, RequestContext, StopReason
from troupe.transports._failures import FailureReporter, TracebackBudget, error_frame

__all__ = ["RequestRunner", "SendReply", "error_frame"]

_DEFAULTS: Final = WorkerConfig()

_log = logging.getLogger("troupe.transports")

SendReply: TypeAlias = Callable[[Reply], Awaitable[bool]]
"""Delivers one reply frame to the caller; returns ``False`` when the caller is gone (its
connection closed), which stops the request. Transports apply back-pressure by awaiting, after
handing the frame over: a send cancelled while it waits has still sent its frame."""

_MAX_SHOWN: Final = 200


def _shown(value: str | RequestId) -> str:
    """``repr(value)``, cut short: a refusal must not grow with what its caller sent."""
    if isinstance(value, str) and len(value) > _MAX_SHOWN:
        return repr(value[:_MAX_SHOWN]) + "..."
    return repr(value)


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
    """One running request: its task, context and caller (``None``: not counted per caller)."""

    __slots__ = ("caller", "ctx", "task")

    def __init__(
        self, task: asyncio.Task[None], ctx: RequestContext, caller: Hashable | None
    ) -> None:
        self.task = task
        self.ctx = ctx
        self.caller = caller


class RequestRunner:
    """Runs handlers for the requests a server receives.

    Must be used from the event loop thread that owns the server.

    Args:
        name: names the request tasks (``{name}-{endpoint}-{id}``) and log lines.
        max_inflight: requests held at once, over every caller; 0 = unlimited.
        max_inflight_per_caller: requests held at once for one caller; 0 = no such limit.
        tracebacks: how many handler failures are logged with their traceback (5 per endpoint
            per minute by default).
    """

    def __init__(
        self,
        name: str,
        *,
        max_inflight: int = _DEFAULTS.max_inflight,
        max_inflight_per_caller: int = _DEFAULTS.max_inflight_per_caller,
        tracebacks: TracebackBudget | None = None,
    ) -> None:
        self._name = name
        self._handlers: dict[str, Handler] = {}
        self._active: dict[Hashable, _Active] = {}
        # Requests held per caller (only callers holding some are listed).
        self._callers: dict[Hashable, int] = {}
        self._extra: set[asyncio.Task[None]] = set()
        self._accepting = True
        self._idle: asyncio.Event | None = None
        self._max_inflight = 0
        self._max_per_caller = 0
        self.limit(max_inflight, max_inflight_per_caller)
        self._failures = FailureReporter(tracebacks)
        self.metrics = ServerMetrics()
        """What this runner refused, and what its transport dropped (by reason)."""

    def limit(self, max_inflight: int, max_inflight_per_caller: int) -> None:
        """Set the admission limits (0 = none); requests already running are not affected.

        Raises:
            ConfigError: a limit is not an integer >= 0.
        """
        for variable, value in (
            ("DYN_WORKER_MAX_INFLIGHT", max_inflight),
            ("DYN_WORKER_MAX_INFLIGHT_PER_CALLER", max_inflight_per_caller),
        ):
            if type(value) is not int or value < 0:
                raise ConfigError(variable, value, "an integer >= 0 (0 = unlimited)")
        self._max_inflight = max_inflight
        self._max_per_caller = max_inflight_per_caller

    @property
    def max_inflight(self) -> int:
        """Requests held at once, over every caller (0 = unlimited)."""
        return self._max_inflight

    @property
    def max_inflight_per_caller(self) -> int:
        """Requests held at once for one caller (0 = no such limit)."""
        return self._max_per_caller

    def held_by(self, caller: Hashable) -> int:
        """Requests running for ``caller``."""
        return self._callers.get(caller, 0)

    @property
    def callers(self) -> int:
        """Callers with requests running."""
        return len(self._callers)

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

    def start(
        self, key: Hashable, request: Request, send: SendReply, caller: Hashable | None = None
    ) -> Error | None:
        """Start serving ``request`` (replies go through ``send``), or say why not.

        ``key`` names the request for :meth:`cancel`; ``caller`` names who sent it (a connection,
        an inbox: ``None`` counts it against no caller's limit).

        Returns:
            ``None`` once the request runs. Otherwise the :class:`Error` refusing it, before any
            task exists: the worker shuts down, a running key (``ProtocolError``), a deadline
            already passed, an unknown endpoint, an admission limit reached (``Overloaded``). The
            transport sends it without waiting for room, and drops it for a caller whose queue is
            full (:meth:`ServerMetrics.add_dropped`).
        """
        active = self._active
        rid = request.id
        if not self._accepting:
            return self._refuse("shutdown", rid, "Overloaded", "worker is shutting down")
        if key in active:
            return self._refuse(
                "duplicate", rid, "ProtocolError", f"duplicate request id {_shown(rid)}"
            )
        deadline = request.deadline
        if deadline is not None and deadline <= time.time():
            return self._refuse(
                "deadline",
                rid,
                "DeadlineExceeded",
                f"deadline passed before request {_shown(rid)} started",
            )
        handler = self._handlers.get(request.endpoint)
        if handler is None:
            return self._refuse(
                "unknown_endpoint",
                rid,
                "UnknownEndpoint",
                f"unknown endpoint {_shown(request.endpoint)}",
            )
        limit = self._max_inflight
        if limit and len(active) >= limit:
            return self._refuse(
                "max_inflight", rid, "Overloaded", str(Overloaded(request.endpoint, limit))
            )
        if caller is not None:
            callers = self._callers
            held = callers.get(caller, 0)
            limit = self._max_per_caller
            if limit and held >= limit:
                return self._refuse(
                    "max_inflight_per_caller",
                    rid,
                    "Overloaded",
                    f"worker at capacity for this caller (max in-flight {limit} per caller)",
                )
            callers[caller] = held + 1
        ctx = RequestContext.from_request(request)
        task = asyncio.get_running_loop().create_task(
            self._serve(key, handler, request, ctx, send),
            name=f"{self._name}-{request.endpoint}-{rid}",
        )
        active[key] = _Active(task, ctx, caller)
        task.add_done_callback(functools.partial(self._finished, key))
        return None

    def dispatch(
        self, key: Hashable, request: Request, send: SendReply, caller: Hashable | None = None
    ) -> None:
        """:meth:`start`, sending a refusal through ``send`` from a task of its own.

        For transports whose ``send`` cannot drop a refusal: such tasks are bounded by
        ``max_inflight`` too (beyond it, refusals are dropped and counted).
        """
        refusal = self.start(key, request, send, caller)
        if refusal is not None:
            self._reply_once(send, refusal)

    def _refuse(self, reason: str, rid: RequestId, kind: str, message: str) -> Error:
        self.metrics.add_refused(reason)
        return Error(rid, kind, message)

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

    def _release(self, key: Hashable, ctx: RequestContext) -> None:
        """Forget the request ``key`` (if it is still the one with ``ctx``): its places in the
        limits are free."""
        active = self._active.get(key)
        if active is None or active.ctx is not ctx:
            return
        del self._active[key]
        caller = active.caller
        if caller is not None:
            callers = self._callers
            held = callers[caller] - 1
            if held:
                callers[caller] = held
            else:
                del callers[caller]

    def _finished(self, key: Hashable, task: asyncio.Task[None]) -> None:
        active = self._active.get(key)
        if active is not None and active.task is task:  # cancelled before it ran
            self._release(key, active.ctx)
        if not task.cancelled() and task.exception() is not None:
            _log.error("request task %s failed", task.get_name(), exc_info=task.exception())
        if not self._active and self._idle is not None:
            self._idle.set()

    def _reply_once(self, send: SendReply, frame: Error) -> None:
        extra = self._extra
        if self._max_inflight and len(extra) >= self._max_inflight:
            # Refusals waiting for callers that do not read: do not queue more.
            self.metrics.add_dropped("backlog")
            return

        async def reply() -> None:
            await send(frame)

        task = asyncio.get_running_loop().create_task(
            reply(), name=f"{self._name}-reply-{frame.id}"
        )
        self._extra.add(task)
        task.add_done_callback(self._extra.discard)

    async def _serve(
        self,
        key: Hashable,
        handler: Handler,
        request: Request,
        ctx: RequestContext,
        send: SendReply,
    ) -> None:
        try:
            rid = request.id
            timer = None
            if request.deadline is not None:
                # Like asyncio.timeout, but the handler sees ctx.stop_reason == "deadline" together
                # with its cancellation.
                loop = asyncio.get_running_loop()
                task = asyncio.current_task()
                assert task is not None
                timer = loop.call_at(
                    loop.time() + (request.deadline - time.time()), _expire, ctx, task
                )
            try:
                finished = await self._pump(handler, request, ctx, send)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if ctx.stop_reason == "deadline" and task is not None and task.uncancel() == 0:
                    await send(
                        Error(
                            rid, "DeadlineExceeded", f"deadline passed while serving {_shown(rid)}"
                        )
                    )
                    return
                if ctx.stop_reason == "shutdown":
                    # Tell the caller now rather than let it wait for the connection to drop.
                    await send(Error(rid, "StreamBroken", "worker shut down during the request"))
                raise
            except Exception as exc:  # noqa: BLE001 - a handler's error is reported to its caller
                await send(self._failures.report(request.endpoint, rid, exc))
                return
            finally:
                if timer is not None:
                    timer.cancel()
            if finished is _NEEDS_END:
                await send(End(rid))
        finally:
            # Here rather than in a done callback, which runs an iteration later: a caller told
            # that the request ended may send its next one in between, and must find its place.
            self._release(key, ctx)

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
        self._failures.close()
