"""The server side shared by every transport: admit decoded requests and run their handlers.

A transport decodes a :class:`~troupe.messages._frames.Request` and hands it to
:meth:`RequestRunner.start` with a key naming the request on that transport (peer identity and
request id, reply inbox, ...), the caller it came from and a ``send`` coroutine that delivers reply
frames. The runner applies the semantics every plane shares: unknown endpoints, deadlines (an
expired request is never started; one that expires mid-stream is stopped), cancellation by key,
handler exceptions turned into :class:`~troupe.messages._frames.Error` frames and logged with
their traceback (:mod:`troupe.transports._failures`), in-flight accounting and a graceful
close. Each request runs as its own task, so a slow request never blocks the next; the task runs
the handler through the pump (:mod:`troupe.transports._pump`, which also defines
:data:`SendReply`, re-exported here). A handler of any kind is accepted
(:class:`~troupe.transports._adapt.HandlerAdapter`): a sync one runs on the loop's default
executor.

Admission: the runner holds at most ``max_inflight`` requests at once, and at most
``max_inflight_per_caller`` for one caller (``DYN_WORKER_MAX_INFLIGHT``,
``DYN_WORKER_MAX_INFLIGHT_PER_CALLER``), so a flood from callers that never read their replies
cannot grow the worker without bound. A request is refused before any task exists for it: ``start``
returns the refusal (``Overloaded``, ``UnknownEndpoint``, ...) and the transport sends it without
waiting, dropping it (counted in ``ServerMetrics``) for a caller whose reply
queue is full.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Hashable
from typing import Final

from troupe._support._logging import get_logger
from troupe._support._metrics import ServerMetrics
from troupe.config import WorkerConfig
from troupe.errors import ConfigError, InvalidName, Overloaded
from troupe.messages._frames import End, Error, Request, RequestId
from troupe.transports._adapt import HandlerAdapter
from troupe.transports._context import Handler, RequestContext, StopReason
from troupe.transports._failures import FailureReporter, TracebackBudget, error_frame
from troupe.transports._pump import _NEEDS_END, SendReply, pump

__all__ = ["RequestRunner", "SendReply", "error_frame"]

_DEFAULTS: Final = WorkerConfig()

_log = get_logger("troupe.transports")

_MAX_SHOWN: Final = 200


def _shown(value: str | RequestId) -> str:
    """``repr(value)``, cut short: a refusal must not grow with what its caller sent."""
    if isinstance(value, str) and len(value) > _MAX_SHOWN:
        return repr(value[:_MAX_SHOWN]) + "..."
    return repr(value)


def _expire(ctx: RequestContext, task: asyncio.Task[object]) -> None:
    if not task.done() and not ctx.is_stopped():
        ctx.stop("deadline")
        task.cancel()


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
        self._handlers: dict[str, HandlerAdapter] = {}
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
        self._handlers[name] = HandlerAdapter(handler)

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
            _log.error("request task failed", task=task.get_name(), exc_info=task.exception())
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
        handler: HandlerAdapter,
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
                finished = await pump(handler, request, ctx, send)
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
