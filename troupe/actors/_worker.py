"""WorkerActor: serves one endpoint on the runtime's request-plane server.

The actor owns the endpoint's lifecycle and admission; requests themselves never pass through its
mailbox (DESIGN §3: at most one hop per side). Each request runs on the I/O loop: an async handler
as a task there, a sync one on the actor's bounded thread pool, so one slow request never blocks
the next. The lifecycle is a small state machine::

    starting --endpoint installed + registered--> serving --stop/SIGTERM--> draining --> stopped

Registration happens only once the server listens (the advertised address is the real one). On
stop the instance is unregistered from discovery *first*, so routers stop sending to it; requests
in flight get up to ``grace`` seconds to finish; new ones are refused with ``Overloaded``.

Admission has two levels: the request-plane server bounds what the whole process holds, in all
and per caller, before any handler runs (see :mod:`troupe.transports._dispatch`); the actor bounds
its own endpoint (``max_inflight``) and counts the requests it refuses in the endpoint's metrics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import msgspec

from troupe._support._ioloop import IOLoop
from troupe._support._logging import get_logger
from troupe._support._metrics import OK, EndpointMetrics, error_kind
from troupe.actors._actor import Actor, ExitReason
from troupe.errors import Overloaded, TroupeError
from troupe.messages._endpoint import Endpoint
from troupe.messages._payload import decode_payload, encode_payload
from troupe.transports import HandlerAdapter, RequestContext, Server

__all__ = ["Health", "WorkerActor", "WorkerState"]

WorkerState = Literal["starting", "serving", "draining", "stopped"]

_log = get_logger("troupe.actors.worker")


class Health(msgspec.Struct, frozen=True, tag=True):
    """Ask: the worker's state and in-flight count, as ``(state, inflight)``."""


Registrar = Callable[[Endpoint, str], Any]
"""Registers the endpoint at the given address in discovery; returns what ``unregister`` needs."""


class WorkerActor(Actor[Health]):
    """Serves ``handler`` for ``endpoint`` on ``server``.

    Args:
        endpoint: the endpoint served.
        handler: ``(request, ctx)`` — an async generator, a coroutine function, a sync generator
            or a plain function. Generators stream one chunk per item.
        server: the runtime's started request-plane server.
        io: the runtime's I/O loop (where requests run).
        register: publishes the instance (called once the endpoint is installed).
        unregister: withdraws it (called first when stopping).
        max_inflight: this endpoint's admission limit; beyond it callers get ``Overloaded`` at
            once (0 = none). The server's own limits, over all endpoints and per caller
            (``DYN_WORKER_MAX_INFLIGHT``, ``DYN_WORKER_MAX_INFLIGHT_PER_CALLER``), refuse a
            request before it gets here.
        grace: seconds in-flight requests get to finish when stopping.
        threads: size of the pool that runs sync handlers.
        metrics: the endpoint's Prometheus series (requests, in-flight, durations, errors, bytes).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        handler: Callable[..., Any],
        *,
        server: Server,
        io: IOLoop,
        register: Registrar,
        unregister: Callable[[Any], Any],
        max_inflight: int = 0,
        grace: float = 5.0,
        threads: int = 16,
        metrics: EndpointMetrics | None = None,
    ) -> None:
        super().__init__()
        if max_inflight < 0:
            raise ValueError("max_inflight must be >= 0")
        self.endpoint = endpoint
        self._handler = handler
        self._server = server
        self._io = io
        self._register = register
        self._unregister = unregister
        self._max_inflight = max_inflight
        self._grace = grace
        self._threads = threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._registration: Any = None
        self.state: WorkerState = "starting"
        self._inflight = 0  # touched only on the I/O loop
        self._drained: asyncio.Event | None = None
        # The one handler adapter (the request runner uses it too); the sync kinds get the pool
        # once the actor starts.
        self._adapter = HandlerAdapter(handler)
        self._metrics = metrics

    # --- lifecycle -----------------------------------------------------------------------------

    def started(self) -> None:
        if self._adapter.blocking:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._threads, thread_name_prefix=f"{self.name}-pool"
            )
            self._adapter = HandlerAdapter(self._handler, self._pool)
        self._io.run(self._install(), timeout=10)
        self._registration = self._register(self.endpoint, self._server.address)
        self.state = "serving"
        _log.info("serving", endpoint=self.endpoint.path, address=self._server.address)

    def stopped(self, reason: ExitReason, error: BaseException | None) -> None:
        if self.state == "starting" and self._registration is None:
            self._io_quiet(self._uninstall())
            self._shutdown_pool()
            self.state = "stopped"
            return
        self.state = "draining"
        if self._registration is not None:
            try:
                self._unregister(self._registration)
            except TroupeError as exc:
                _log.warning("unregister failed; the lease will expire it", error=str(exc))
        self._io_quiet(self._drain(), timeout=self._grace + 5.0)
        self._io_quiet(self._uninstall())
        self._shutdown_pool()
        self.state = "stopped"
        _log.info("stopped", endpoint=self.endpoint.path, reason=reason)

    def receive(self, message: Health) -> Any:
        return (self.state, self._inflight)

    # --- on the I/O loop -----------------------------------------------------------------------

    async def _install(self) -> None:
        self._drained = asyncio.Event()
        self._server.add_endpoint(self.endpoint.path, self._serve)

    async def _uninstall(self) -> None:
        if self.endpoint.path in self._server.endpoints:
            self._server.remove_endpoint(self.endpoint.path)

    async def _drain(self) -> None:
        if self._inflight == 0 or self._drained is None:
            return
        try:
            await asyncio.wait_for(self._drained.wait(), self._grace)
        except TimeoutError:
            _log.warning(
                "grace period over; cancelling requests still in flight",
                endpoint=self.endpoint.path,
                inflight=self._inflight,
            )

    async def _serve(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        """The transport-level handler: admission, decoding, the user handler, encoding."""
        metrics = self._metrics
        if self.state in ("draining", "stopped"):
            self._refused(len(payload))
            raise Overloaded(self.endpoint.path)
        if self._max_inflight and self._inflight >= self._max_inflight:
            self._refused(len(payload))
            raise Overloaded(self.endpoint.path, self._max_inflight)
        self._inflight += 1
        try:
            request = decode_payload(payload)
            # An async generator handler is iterated as it is: no generator layer per item.
            items = self._adapter.items(request, ctx)
            if metrics is None:
                async for item in items:
                    yield encode_payload(item)
            else:
                # What EndpointMetrics.track() does, without a scope object per request.
                metrics.started(len(payload))
                started = time.perf_counter()
                outcome = OK
                sent = 0
                try:
                    async for item in items:
                        chunk = encode_payload(item)
                        sent += len(chunk)
                        yield chunk
                except BaseException as exc:
                    outcome = error_kind(exc)
                    raise
                finally:
                    metrics.finished(outcome, time.perf_counter() - started, sent)
        finally:
            self._inflight -= 1
            if self._inflight == 0 and self._draining() and self._drained is not None:
                self._drained.set()

    # --- helpers -------------------------------------------------------------------------------

    def _refused(self, request_bytes: int) -> None:
        if self._metrics is not None:
            self._metrics.started(request_bytes)
            self._metrics.finished("overloaded", 0.0)

    def _draining(self) -> bool:
        # A method, not an inline comparison: the state changes on the actor's thread while a
        # request runs, which a type checker narrowing `self.state` cannot see.
        return self.state == "draining"

    def _io_quiet(self, coro: Any, timeout: float = 10.0) -> None:
        try:
            self._io.run(coro, timeout=timeout)
        except (TroupeError, TimeoutError, RuntimeError) as exc:
            _log.warning("worker shutdown step failed", endpoint=self.endpoint.path, error=str(exc))

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
