"""Prometheus metrics for one runtime: per-endpoint request counters, in-flight, durations, bytes.

Each :class:`RuntimeMetrics` owns its own :class:`prometheus_client.CollectorRegistry` (never the
process-wide default registry), so several runtimes can share a process (tests do) without their
series colliding. The system status server (:mod:`troupe._status`) serves :meth:`render` on
``/metrics``.

Worker hot path: :meth:`RuntimeMetrics.endpoint` returns an :class:`EndpointMetrics` with every
label child bound once, so recording a request is a few lock-protected float additions. Use
:meth:`EndpointMetrics.track` (a context manager that always settles in-flight, whatever happens),
or the low-level :meth:`EndpointMetrics.started` / :meth:`EndpointMetrics.finished` pair.

Series (prefix ``troupe_``, labels ``namespace``, ``component``, ``endpoint``):
``requests_total``, ``inflight_requests``, ``request_duration_seconds`` (histogram),
``errors_total`` (extra label ``kind``), ``request_bytes_total``, ``response_bytes_total``,
``cancellations_total``; and the unlabelled ``uptime_seconds``, computed at scrape time.
"""

from __future__ import annotations

import asyncio
import threading
import time
import types
from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from troupe.errors import Cancelled, Overloaded, TransportError

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "LABELS",
    "EndpointMetrics",
    "RequestScope",
    "RuntimeMetrics",
    "error_kind",
]

CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
"""Content type of :meth:`RuntimeMetrics.render` (Prometheus text exposition format 0.0.4)."""

LABELS: Final = ("namespace", "component", "endpoint")
"""Labels of every per-endpoint series."""

DURATION_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    float("inf"),
)
"""Histogram buckets for ``request_duration_seconds``: sub-millisecond RPCs to minute-long
streams (LLM generations)."""

OK: Final = "ok"
CANCELLED: Final = "cancelled"


def error_kind(exc: BaseException) -> str:
    """Map an exception to the bounded ``kind`` label of ``errors_total``.

    Arbitrary exception class names would make the label's cardinality unbounded, so handler
    exceptions all count as ``handler``. ``cancelled`` is not an error kind: it is counted in
    ``cancellations_total`` instead. ``GeneratorExit`` counts as cancelled: it is how a streaming
    handler (an async generator) learns that its consumer went away.
    """
    if isinstance(exc, asyncio.CancelledError | Cancelled | GeneratorExit):
        return CANCELLED
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, TransportError):
        return "transport"
    return "handler"


class EndpointMetrics:
    """The series of one endpoint, label children bound once (cheap per request).

    Thread-safe: each child guards its value with its own lock, as prometheus_client does.
    """

    __slots__ = (
        "_cancellations",
        "_duration",
        "_errors",
        "_errors_family",
        "_errors_lock",
        "_inflight",
        "_labels",
        "_request_bytes",
        "_requests",
        "_response_bytes",
    )

    def __init__(self, metrics: RuntimeMetrics, labels: tuple[str, str, str]) -> None:
        self._labels = labels
        self._requests = metrics.requests.labels(*labels)
        self._inflight = metrics.inflight.labels(*labels)
        self._duration = metrics.duration.labels(*labels)
        self._request_bytes = metrics.request_bytes.labels(*labels)
        self._response_bytes = metrics.response_bytes.labels(*labels)
        self._cancellations = metrics.cancellations.labels(*labels)
        self._errors_family = metrics.errors
        self._errors: dict[str, Counter] = {}
        self._errors_lock = threading.Lock()

    @property
    def labels(self) -> tuple[str, str, str]:
        """``(namespace, component, endpoint)``."""
        return self._labels

    def started(self, request_bytes: int = 0) -> None:
        """Count a request that has just been admitted; it is in flight until :meth:`finished`."""
        self._requests.inc()
        self._inflight.inc()
        if request_bytes:
            self._request_bytes.inc(request_bytes)

    def finished(self, outcome: str, duration: float, response_bytes: int = 0) -> None:
        """Settle a request counted by :meth:`started`.

        Args:
            outcome: ``"ok"``, ``"cancelled"``, or an error kind (see :func:`error_kind`).
            duration: seconds from admission to the last response byte (or the failure).
            response_bytes: payload bytes sent back.
        """
        self._inflight.dec()
        self._duration.observe(duration)
        if response_bytes:
            self._response_bytes.inc(response_bytes)
        if outcome == OK:
            return
        if outcome == CANCELLED:
            self._cancellations.inc()
            return
        self._error_child(outcome).inc()

    def track(self, request_bytes: int = 0) -> RequestScope:
        """Count a request now and settle it when the returned scope exits (on every path)."""
        return RequestScope(self, request_bytes)

    def _error_child(self, kind: str) -> Counter:
        child = self._errors.get(kind)
        if child is None:
            with self._errors_lock:
                child = self._errors.get(kind)
                if child is None:
                    child = self._errors_family.labels(*self._labels, kind)
                    self._errors[kind] = child
        return child


class RequestScope:
    """One request in flight; settles its :class:`EndpointMetrics` exactly once.

    Use as a context manager (sync ``with``, also inside coroutines)::

        with metrics.track(len(payload)) as req:
            async for chunk in handler(request):
                req.add_response_bytes(len(chunk))
                ...

    On exit the outcome is ``ok``, ``cancelled`` (``asyncio.CancelledError``,
    :class:`troupe.errors.Cancelled`, or ``GeneratorExit`` when a streaming generator is closed
    early) or :func:`error_kind` of the exception, unless
    :meth:`fail` set one first. The exception is never swallowed. :meth:`finish` settles early;
    later calls and the exit are then no-ops.
    """

    __slots__ = ("_done", "_metrics", "_outcome", "_response_bytes", "_start")

    def __init__(self, metrics: EndpointMetrics, request_bytes: int = 0) -> None:
        self._metrics = metrics
        self._outcome: str | None = None
        self._response_bytes = 0
        self._done = False
        metrics.started(request_bytes)
        self._start = time.perf_counter()

    def add_response_bytes(self, nbytes: int) -> None:
        """Count payload bytes sent back for this request."""
        self._response_bytes += nbytes

    def fail(self, kind: str) -> None:
        """Record the outcome (an error kind or ``cancelled``) without raising through the scope,
        e.g. when the error was sent to the caller as a message."""
        self._outcome = kind

    def finish(self, outcome: str | None = None) -> None:
        """Settle now (idempotent). ``outcome`` defaults to what :meth:`fail` set, else ``ok``."""
        if self._done:
            return
        self._done = True
        if outcome is None:
            outcome = self._outcome or OK
        self._metrics.finished(outcome, time.perf_counter() - self._start, self._response_bytes)

    def __enter__(self) -> RequestScope:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.finish(None if exc is None else error_kind(exc))


class RuntimeMetrics:
    """Every metric of one runtime, in its own registry.

    Args:
        registry: where to register the series; a fresh private registry if omitted.
        now: monotonic time source for ``uptime_seconds`` (the runtime passes its clock's ``now``).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._now = now
        self._started_at = now()
        reg = self.registry
        self.requests = Counter(
            "troupe_requests_total", "Requests admitted by a worker.", LABELS, registry=reg
        )
        self.inflight = Gauge(
            "troupe_inflight_requests",
            "Requests being handled now.",
            LABELS,
            registry=reg,
        )
        self.duration = Histogram(
            "troupe_request_duration_seconds",
            "Time from admission to the end of the response, in seconds.",
            LABELS,
            registry=reg,
            buckets=DURATION_BUCKETS,
        )
        self.errors = Counter(
            "troupe_errors_total",
            "Requests that ended in an error, by kind.",
            (*LABELS, "kind"),
            registry=reg,
        )
        self.request_bytes = Counter(
            "troupe_request_bytes_total", "Request payload bytes received.", LABELS, registry=reg
        )
        self.response_bytes = Counter(
            "troupe_response_bytes_total", "Response payload bytes sent.", LABELS, registry=reg
        )
        self.cancellations = Counter(
            "troupe_cancellations_total",
            "Requests cancelled by their caller (or by shutdown).",
            LABELS,
            registry=reg,
        )
        self.uptime = Gauge(
            "troupe_uptime_seconds", "Seconds since the runtime started.", registry=reg
        )
        self.uptime.set_function(self.uptime_seconds)
        self._endpoints: dict[tuple[str, str, str], EndpointMetrics] = {}
        self._lock = threading.Lock()

    def uptime_seconds(self) -> float:
        """Seconds since these metrics were created (the runtime's start)."""
        return self._now() - self._started_at

    def endpoint(self, namespace: str, component: str, endpoint: str) -> EndpointMetrics:
        """The pre-bound series of one endpoint (created once, then cached; thread-safe)."""
        key = (namespace, component, endpoint)
        bound = self._endpoints.get(key)
        if bound is None:
            with self._lock:
                bound = self._endpoints.get(key)
                if bound is None:
                    bound = EndpointMetrics(self, key)
                    self._endpoints[key] = bound
        return bound

    def render(self) -> bytes:
        """Every series in the Prometheus text format (see :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
