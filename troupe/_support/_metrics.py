"""Prometheus metrics for one runtime: per-endpoint request counters, in-flight, durations, bytes.

Each :class:`RuntimeMetrics` owns its own :class:`prometheus_client.CollectorRegistry` (never the
process-wide default registry), so several runtimes can share a process (tests do) without their
series colliding. The system status server (:mod:`troupe._status`) serves :meth:`render` on
``/metrics``.

Worker hot path: :meth:`RuntimeMetrics.endpoint` returns an :class:`EndpointMetrics` that keeps
plain numbers, so recording a request is a few additions under one lock; a collector turns them
into Prometheus samples when ``/metrics`` is scraped. Use
:meth:`EndpointMetrics.track` (a context manager that always settles in-flight, whatever happens),
or the low-level :meth:`EndpointMetrics.started` / :meth:`EndpointMetrics.finished` pair.

Series (prefix ``troupe_``, labels ``namespace``, ``component``, ``endpoint``):
``requests_total``, ``inflight_requests``, ``request_duration_seconds`` (histogram),
``errors_total`` (extra label ``kind``), ``request_bytes_total``, ``response_bytes_total``,
``cancellations_total``; and the unlabelled ``uptime_seconds``, computed at scrape time.

Server series (labels ``plane``, ``reason``): ``worker_requests_refused_total`` (requests the
request-plane server answered with an error before any handler ran: admission limits, unknown
endpoints, ...) and ``worker_replies_dropped_total`` (replies it dropped, or requests it stopped,
rather than hold them for a caller that does not read), from a :class:`ServerMetrics` that the
server owns and :meth:`RuntimeMetrics.add_server` exports. The event plane's and KV events'
series are in :mod:`troupe._support._metrics_events` (:meth:`RuntimeMetrics.collector`).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Final, NamedTuple, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from troupe.errors import Cancelled, Overloaded, TransportError

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "LABELS",
    "OK",
    "EndpointMetrics",
    "RequestScope",
    "RuntimeMetrics",
    "ServerMetrics",
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

# The ``le`` labels of the buckets, as prometheus_client writes them.
_BOUNDS: Final = tuple("+Inf" if b == float("inf") else repr(b) for b in DURATION_BUCKETS)

OK: Final = "ok"
"""The outcome of a request that ended normally."""
CANCELLED: Final = "cancelled"
_C = TypeVar("_C", bound=Collector)


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
    """The series of one endpoint, kept as plain numbers (cheap per request).

    Recording a request is two short critical sections under one lock (:meth:`started`,
    :meth:`finished`) instead of eight lock-protected Prometheus children; the values are
    turned into Prometheus samples only when scraped (:class:`RuntimeMetrics` registers a
    collector). Thread-safe.
    """

    __slots__ = (
        "_buckets",
        "_cancellations",
        "_duration_sum",
        "_errors",
        "_inflight",
        "_labels",
        "_lock",
        "_request_bytes",
        "_requests",
        "_response_bytes",
    )

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self._labels = labels
        self._lock = threading.Lock()
        self._requests = 0
        self._inflight = 0
        self._request_bytes = 0
        self._response_bytes = 0
        self._cancellations = 0
        self._duration_sum = 0.0
        # Observations per bucket (not cumulative); the last bucket is +Inf.
        self._buckets = [0] * len(DURATION_BUCKETS)
        self._errors: dict[str, int] = {}

    @property
    def labels(self) -> tuple[str, str, str]:
        """``(namespace, component, endpoint)``."""
        return self._labels

    def started(self, request_bytes: int = 0) -> None:
        """Count a request that has just been admitted; it is in flight until :meth:`finished`."""
        with self._lock:
            self._requests += 1
            self._inflight += 1
            self._request_bytes += request_bytes

    def finished(self, outcome: str, duration: float, response_bytes: int = 0) -> None:
        """Settle a request counted by :meth:`started`.

        Args:
            outcome: ``"ok"``, ``"cancelled"``, or an error kind (see :func:`error_kind`).
            duration: seconds from admission to the last response byte (or the failure).
            response_bytes: payload bytes sent back.
        """
        index = bisect.bisect_left(DURATION_BUCKETS, duration)
        with self._lock:
            self._inflight -= 1
            self._duration_sum += duration
            self._buckets[index] += 1
            self._response_bytes += response_bytes
            if outcome == OK:
                return
            if outcome == CANCELLED:
                self._cancellations += 1
                return
            errors = self._errors
            errors[outcome] = errors.get(outcome, 0) + 1

    def totals(self) -> tuple[int, int, int, int]:
        """``(requests, inflight, errors, cancellations)`` counted so far."""
        with self._lock:
            errors = sum(self._errors.values())
            return self._requests, self._inflight, errors, self._cancellations

    def track(self, request_bytes: int = 0) -> RequestScope:
        """Count a request now and settle it when the returned scope exits (on every path)."""
        return RequestScope(self, request_bytes)

    def _snapshot(self) -> _Values:
        with self._lock:
            return _Values(
                self._requests,
                self._inflight,
                self._request_bytes,
                self._response_bytes,
                self._cancellations,
                self._duration_sum,
                tuple(self._buckets),
                tuple(self._errors.items()),
            )


class _Values(NamedTuple):
    """One endpoint's numbers, read together under its lock for a scrape."""

    requests: int
    inflight: int
    request_bytes: int
    response_bytes: int
    cancellations: int
    duration_sum: float
    buckets: tuple[int, ...]
    errors: tuple[tuple[str, int], ...]


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


class ServerMetrics:
    """What one request-plane server refused or dropped, by reason (a short, fixed word).

    Plain numbers under one lock, like :class:`EndpointMetrics`; counted only off the common path
    (a refusal, a drop). Thread-safe.
    """

    __slots__ = ("_dropped", "_lock", "_refused")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refused: dict[str, int] = {}
        self._dropped: dict[str, int] = {}

    def add_refused(self, reason: str) -> None:
        """Count a request answered with an error before any handler ran."""
        with self._lock:
            self._refused[reason] = self._refused.get(reason, 0) + 1

    def add_dropped(self, reason: str) -> None:
        """Count a reply dropped (or a request stopped) for a caller that does not read."""
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + 1

    def refused(self) -> dict[str, int]:
        """Refused requests so far, by reason."""
        with self._lock:
            return dict(self._refused)

    def dropped(self) -> dict[str, int]:
        """Dropped replies so far, by reason."""
        with self._lock:
            return dict(self._dropped)


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
        self._endpoints: dict[tuple[str, str, str], EndpointMetrics] = {}
        self._servers: dict[str, ServerMetrics] = {}
        self._collectors: dict[type[Collector], Collector] = {}
        self._lock = threading.Lock()
        self.registry.register(_Collector(self))

    def uptime_seconds(self) -> float:
        """Seconds since these metrics were created (the runtime's start)."""
        return self._now() - self._started_at

    def endpoint(self, namespace: str, component: str, endpoint: str) -> EndpointMetrics:
        """The series of one endpoint (created once, then cached; thread-safe)."""
        key = (namespace, component, endpoint)
        bound = self._endpoints.get(key)
        if bound is None:
            with self._lock:
                bound = self._endpoints.get(key)
                if bound is None:
                    bound = EndpointMetrics(key)
                    self._endpoints[key] = bound
        return bound

    def endpoints(self) -> list[EndpointMetrics]:
        """Every endpoint's series created so far."""
        with self._lock:
            return list(self._endpoints.values())

    def add_server(self, plane: str, metrics: ServerMetrics) -> None:
        """Export a request-plane server's counters with the label ``plane``."""
        with self._lock:
            self._servers[plane] = metrics

    def servers(self) -> list[tuple[str, ServerMetrics]]:
        """Every server's counters exported so far, with its plane."""
        with self._lock:
            return list(self._servers.items())

    def collector(self, kind: type[_C]) -> _C:
        """This registry's ``kind`` collector, made (``kind()``) and registered on first use: how
        families kept in their own module join (``_metrics_events``: the event plane's)."""
        with self._lock:
            found = self._collectors.get(kind)
            if found is None:
                found = self._collectors[kind] = kind()
                self.registry.register(found)
        return found  # type: ignore[return-value]  # keyed by its own type

    def render(self) -> bytes:
        """Every series in the Prometheus text format (see :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _Families(NamedTuple):
    requests: CounterMetricFamily
    inflight: GaugeMetricFamily
    duration: HistogramMetricFamily
    errors: CounterMetricFamily
    request_bytes: CounterMetricFamily
    response_bytes: CounterMetricFamily
    cancellations: CounterMetricFamily
    uptime: GaugeMetricFamily
    refused: CounterMetricFamily
    dropped: CounterMetricFamily


class _Collector(Collector):
    """Turns the runtime's plain per-endpoint numbers into Prometheus families at scrape time."""

    def __init__(self, metrics: RuntimeMetrics) -> None:
        self._metrics = metrics

    def _families(self) -> _Families:
        """Fresh, empty families (their names and help text)."""
        requests = CounterMetricFamily(
            "troupe_requests", "Requests admitted by a worker.", labels=LABELS
        )
        inflight = GaugeMetricFamily(
            "troupe_inflight_requests", "Requests being handled now.", labels=LABELS
        )
        duration = HistogramMetricFamily(
            "troupe_request_duration_seconds",
            "Time from admission to the end of the response, in seconds.",
            labels=LABELS,
        )
        errors = CounterMetricFamily(
            "troupe_errors", "Requests that ended in an error, by kind.", labels=(*LABELS, "kind")
        )
        request_bytes = CounterMetricFamily(
            "troupe_request_bytes", "Request payload bytes received.", labels=LABELS
        )
        response_bytes = CounterMetricFamily(
            "troupe_response_bytes", "Response payload bytes sent.", labels=LABELS
        )
        cancellations = CounterMetricFamily(
            "troupe_cancellations",
            "Requests cancelled by their caller (or by shutdown).",
            labels=LABELS,
        )
        uptime = GaugeMetricFamily(
            "troupe_uptime_seconds", "Seconds since the runtime started.", labels=()
        )
        refused = CounterMetricFamily(
            "troupe_worker_requests_refused",
            "Requests a worker's request-plane server answered with an error before any handler "
            "ran, by reason.",
            labels=("plane", "reason"),
        )
        dropped = CounterMetricFamily(
            "troupe_worker_replies_dropped",
            "Replies a worker dropped, or requests it stopped, rather than hold them for a "
            "caller that does not read, by reason.",
            labels=("plane", "reason"),
        )
        return _Families(
            requests,
            inflight,
            duration,
            errors,
            request_bytes,
            response_bytes,
            cancellations,
            uptime,
            refused,
            dropped,
        )

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so the registry refuses a duplicate series name."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        (
            requests,
            inflight,
            duration,
            errors,
            request_bytes,
            response_bytes,
            cancellations,
            uptime,
            refused,
            dropped,
        ) = families = self._families()
        for ep in self._metrics.endpoints():
            labels = list(ep.labels)
            v = ep._snapshot()
            requests.add_metric(labels, v.requests)
            inflight.add_metric(labels, v.inflight)
            request_bytes.add_metric(labels, v.request_bytes)
            response_bytes.add_metric(labels, v.response_bytes)
            cancellations.add_metric(labels, v.cancellations)
            cumulative = list(itertools.accumulate(v.buckets))
            duration.add_metric(
                labels,
                list(zip(_BOUNDS, cumulative, strict=True)),
                v.duration_sum,
            )
            for kind, count in v.errors:
                errors.add_metric([*labels, kind], count)
        uptime.add_metric([], self._metrics.uptime_seconds())
        for plane, server in self._metrics.servers():
            for reason, count in sorted(server.refused().items()):
                refused.add_metric([plane, reason], count)
            for reason, count in sorted(server.dropped().items()):
                dropped.add_metric([plane, reason], count)
        yield from families
