"""The KV routers of a process as Prometheus series, computed at scrape time.

One :class:`KvRouterCollector` per runtime registry; every KV router built for it
(``rt.router(..., policy="kv")``, the frontend's ``--router-mode kv``) is added with its
endpoint and, for the frontend, its model. A router closed and dropped disappears with its
policy (weak references).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from troupe.actors.routing._kv import KvPolicy

__all__ = ["KvRouterCollector"]

_LABELS = ("endpoint", "model")

_COUNTERS = {
    "decisions": "Requests the KV policy chose a worker for",
    "decision_seconds": "Time spent choosing (hashing, index lookup, costs), in seconds",
    "requested_blocks": "Prompt blocks of the requests routed",
    "predicted_hit_blocks": "Of those, blocks the index said the chosen worker holds",
}
_GAUGES = {
    "predicted_hit_rate": "Predicted hit blocks over requested blocks, since the router started",
    "index_blocks": "Distinct block hashes in the router's index",
    "index_workers": "Workers known to the router's index",
    "active_blocks": "Blocks of the requests in flight through this router, all workers",
}


class KvRouterCollector(Collector):
    """``troupe_router_kv_*`` series of the KV policies added to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._policies: weakref.WeakValueDictionary[tuple[str, str], KvPolicy] = (
            weakref.WeakValueDictionary()
        )

    def add(self, policy: KvPolicy, endpoint: str, model: str = "") -> None:
        """Report ``policy`` under ``endpoint`` (and ``model``)."""
        with self._lock:
            self._policies[endpoint, model] = policy

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            policies = list(self._policies.items())
        counters = {
            name: CounterMetricFamily(f"troupe_router_kv_{name}", text, labels=_LABELS)
            for name, text in _COUNTERS.items()
        }
        gauges = {
            name: GaugeMetricFamily(f"troupe_router_kv_{name}", text, labels=_LABELS)
            for name, text in _GAUGES.items()
        }
        for (endpoint, model), policy in policies:
            labels = [endpoint, model]
            index = policy.index
            counters["decisions"].add_metric(labels, policy.decisions)
            counters["decision_seconds"].add_metric(labels, policy.decision_seconds)
            counters["requested_blocks"].add_metric(labels, policy.requested_blocks)
            counters["predicted_hit_blocks"].add_metric(labels, policy.predicted_hit_blocks)
            gauges["predicted_hit_rate"].add_metric(labels, policy.predicted_hit_rate)
            gauges["index_blocks"].add_metric(labels, len(index))
            gauges["index_workers"].add_metric(labels, len(index.workers()))
            gauges["active_blocks"].add_metric(labels, sum(policy.active_blocks.values()))
        yield from counters.values()
        yield from gauges.values()
