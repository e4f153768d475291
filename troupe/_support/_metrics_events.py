"""Prometheus series of the event plane and of KV events, on one runtime's registry.

The counters live where they are counted (an event plane's per-topic ``stats()``, a KV
follower's and a KV publisher's counters); :class:`EventSeries`, one per runtime
(:func:`event_series`), keeps a reader for each and turns what they return into Prometheus
families when ``/metrics`` is scraped. Nothing is counted twice: a plane added again (a
publisher and a follower on the runtime's one plane) is read once. This module sits below the
wings: it knows the counters by name, not the classes that keep them.

Series (prefix ``troupe_``):

- event plane, labels ``namespace``, ``component``, ``topic``, summed over this runtime's
  planes: ``events_published_total``, ``events_received_total``, ``events_malformed_total``,
  ``events_dropped_total``;
- KV followers, labels ``namespace``, ``component``, summed over the workers followed (and over
  the followers of one component): ``kv_events_{name}_total`` for each name of
  :data:`FOLLOWER_COUNTERS`, and the gauge ``kv_follower_workers``;
- KV publishers, labels ``namespace``, ``component``: ``kv_events_published_total``,
  ``kv_events_dropped_total`` and the gauge ``kv_events_last_event_id``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final, Protocol

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from troupe._support._metrics import RuntimeMetrics

__all__ = [
    "FOLLOWER_COUNTERS",
    "PLANE_COUNTERS",
    "PUBLISHER_COUNTERS",
    "SERIES",
    "EventSeries",
    "StatsSource",
    "event_series",
]

TOPIC_LABELS: Final = ("namespace", "component", "topic")
COMPONENT_LABELS: Final = ("namespace", "component")

PLANE_COUNTERS: Final = {
    "published": "Events this runtime's publishers handed to the event plane.",
    "received": "Envelopes delivered to this runtime's subscriptions.",
    "malformed": "Messages dropped by a subscription because they were not an envelope of its "
    "topic.",
    "dropped": "Events a subscription dropped because its reader fell too far behind.",
}
"""``troupe_events_{name}_total``: an event plane's per-topic counters (``plane.stats()``)."""

FOLLOWER_COUNTERS: Final = {
    "received": "KV events received and decoded by a follower.",
    "applied": "KV events applied in order from the stream or from a fetched range.",
    "malformed": "Payloads (or envelopes) a follower dropped because they were not a KV event.",
    "duplicates": "KV events dropped because their id was already applied.",
    "superseded": "KV events buffered during a query whose answer already covered them.",
    "gaps": "Times a worker's event id skipped ahead: events lost on the way.",
    "recovered": "Gaps closed by a range or dump fetched from the worker.",
    "dumps": "Worker dumps applied (one per new worker without a replayed history, plus "
    "fall-backs).",
    "fetch_failures": "Queries to a worker's kv_events_query endpoint that failed (retried).",
    "unknown": "KV events dropped because their publisher is not in discovery.",
    "restored": "Workers whose state was restored from a snapshot of a durable stream.",
    "snapshots": "Snapshots of a follower's view saved to the durable stream's object store.",
}
"""``troupe_kv_events_{name}_total``: a KV follower's counters (summed over its workers)."""

PUBLISHER_COUNTERS: Final = {
    "published": "KV events a worker's publisher handed to the event plane.",
    "dropped": "KV events a worker's publisher did not publish (queue full, or the plane "
    "refused them); followers recover them from the worker.",
}
"""``troupe_kv_events_{name}_total``: a KV publisher's counters."""

SERIES: Final = (
    *(f"troupe_events_{name}_total" for name in PLANE_COUNTERS),
    *(f"troupe_kv_events_{name}_total" for name in FOLLOWER_COUNTERS),
    "troupe_kv_follower_workers",
    *(f"troupe_kv_events_{name}_total" for name in PUBLISHER_COUNTERS),
    "troupe_kv_events_last_event_id",
)
"""Every series name this module exports, as scraped (counters with ``_total``)."""

Sample = Callable[[], Mapping[str, int]]
"""Reads one follower's or publisher's counters by name (missing names count 0)."""


class StatsSource(Protocol):
    """What an event plane offers: per topic (``"namespace.component.topic"``), its counters."""

    def stats(self) -> Mapping[str, Mapping[str, int]]: ...


class EventSeries(Collector):
    """The event plane's and KV events' series of one runtime; see the module docstring.

    Thread-safe: sources are added from any thread; a scrape reads them where it runs (the
    counters are plain integers, read without their owners' loops).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._planes: list[StatsSource] = []
        self._followers: list[tuple[tuple[str, str], Sample]] = []
        # Closed followers' final counters per component (counters stay monotonic).
        self._retired: dict[tuple[str, ...], dict[str, int]] = {}
        self._publishers: list[tuple[tuple[str, str], Sample]] = []

    def add_plane(self, plane: StatsSource) -> None:
        """Export ``plane``'s per-topic counters (once, however often it is added)."""
        with self._lock:
            if not any(known is plane for known in self._planes):
                self._planes.append(plane)

    def add_kv_follower(self, namespace: str, component: str, sample: Sample) -> None:
        """Export a KV follower's counters (names of :data:`FOLLOWER_COUNTERS`, and ``workers``)
        under its component."""
        with self._lock:
            self._followers.append(((namespace, component), sample))

    def retire_kv_follower(self, sample: Sample) -> None:
        """A follower added with ``sample`` closed: its counters are read one last time and
        kept in its component's totals (its ``workers`` no longer count); the sample is
        dropped. Unknown samples are ignored."""
        with self._lock:
            found = [entry for entry in self._followers if entry[1] is sample]
            if not found:
                return
            self._followers.remove(found[0])
        component = found[0][0]
        counts = {name: value for name, value in sample().items() if name != "workers"}
        with self._lock:
            _add(self._retired.setdefault(component, {}), counts)

    def add_kv_publisher(self, namespace: str, component: str, sample: Sample) -> None:
        """Export a KV publisher's counters (``published``, ``dropped``, ``last_event_id``)."""
        with self._lock:
            self._publishers.append(((namespace, component), sample))

    def _families(self) -> dict[str, CounterMetricFamily | GaugeMetricFamily]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for name, text in PLANE_COUNTERS.items():
            families[f"plane.{name}"] = CounterMetricFamily(
                f"troupe_events_{name}", text, labels=TOPIC_LABELS
            )
        for name, text in FOLLOWER_COUNTERS.items():
            families[f"follower.{name}"] = CounterMetricFamily(
                f"troupe_kv_events_{name}", text, labels=COMPONENT_LABELS
            )
        families["follower.workers"] = GaugeMetricFamily(
            "troupe_kv_follower_workers",
            "Workers a KV follower follows (listed in discovery).",
            labels=COMPONENT_LABELS,
        )
        for name, text in PUBLISHER_COUNTERS.items():
            families[f"publisher.{name}"] = CounterMetricFamily(
                f"troupe_kv_events_{name}", text, labels=COMPONENT_LABELS
            )
        families["publisher.last_event_id"] = GaugeMetricFamily(
            "troupe_kv_events_last_event_id",
            "The id of the last KV event a worker's publisher recorded.",
            labels=COMPONENT_LABELS,
        )
        return families

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so the registry refuses a duplicate series name."""
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            planes, followers = list(self._planes), list(self._followers)
            publishers = list(self._publishers)
            components: _Totals = {key: dict(counts) for key, counts in self._retired.items()}
        families = self._families()
        topics: _Totals = {}
        for plane in planes:
            for key, counts in plane.stats().items():  # names hold no dots: split is exact
                _add(topics.setdefault(tuple(key.split(".", 2)), {}), counts)
        _fill(families, "plane", PLANE_COUNTERS, topics)
        for component, sample in followers:
            _add(components.setdefault(component, {}), sample())
        _fill(families, "follower", (*FOLLOWER_COUNTERS, "workers"), components)
        components = {}
        for component, sample in publishers:
            counts = dict(sample())
            last = counts.pop("last_event_id", 0)
            total = components.setdefault(component, {})
            _add(total, counts)
            total["last_event_id"] = max(total.get("last_event_id", 0), last)  # a level
        _fill(families, "publisher", (*PUBLISHER_COUNTERS, "last_event_id"), components)
        yield from families.values()


_Totals = dict[tuple[str, ...], dict[str, int]]


def _add(total: dict[str, int], counts: Mapping[str, int]) -> None:
    for name, value in counts.items():
        total[name] = total.get(name, 0) + value


def _fill(
    families: Mapping[str, CounterMetricFamily | GaugeMetricFamily],
    prefix: str,
    names: Iterable[str],
    totals: _Totals,
) -> None:
    """One sample per labels and name (0 for a name not counted)."""
    for labels, counts in sorted(totals.items()):
        for name in names:
            families[f"{prefix}.{name}"].add_metric(list(labels), counts.get(name, 0))


def event_series(metrics: RuntimeMetrics) -> EventSeries:
    """The runtime's :class:`EventSeries`, registered on its registry on first use."""
    return metrics.collector(EventSeries)
