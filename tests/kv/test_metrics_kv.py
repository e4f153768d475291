"""The event plane's and KV events' Prometheus series: summed per component, on the runtime's
registry, named in docs/observability.md."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.kv._helpers import rebuilt
from troupe import Config, Runtime
from troupe._support._metrics import RuntimeMetrics
from troupe._support._metrics_events import SERIES, EventSeries, event_series
from troupe.config import DiscoveryConfig, RequestPlaneConfig, TcpConfig
from troupe.discovery import MemoryKvServer
from troupe.events import MemoryEventPlane
from troupe.kv import KvView, follow_kv_events

DOCS = Path(__file__).resolve().parents[2] / "docs" / "observability.md"
ENDPOINT = "ns.comp.generate"
PLANE = RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1", connect_timeout=0.5))
CONFIG = Config(discovery=DiscoveryConfig(kv_store="memory"), request_plane=PLANE)


def samples(metrics: RuntimeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample rendered: (name, sorted labels) -> value."""
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class Plane:
    def __init__(self, stats: dict[str, dict[str, int]]) -> None:
        self._stats = stats

    def stats(self) -> dict[str, dict[str, int]]:
        return self._stats


def test_sources_are_summed_per_component_and_a_plane_is_read_once() -> None:
    metrics = RuntimeMetrics()
    series = event_series(metrics)
    assert event_series(metrics) is series  # one per runtime
    assert metrics.collector(EventSeries) is series
    plane = Plane({"ns.comp.kv-events": {"published": 3, "received": 2, "malformed": 1}})
    series.add_plane(plane)
    series.add_plane(plane)  # a publisher and a follower on one plane
    series.add_plane(Plane({"ns.comp.kv-events": {"published": 4}, "ns.x.load": {"dropped": 5}}))
    series.add_kv_follower("ns", "comp", lambda: {"applied": 7, "gaps": 1, "workers": 2})
    series.add_kv_follower("ns", "comp", lambda: {"applied": 3, "workers": 1})
    series.add_kv_publisher("ns", "comp", lambda: {"published": 9, "last_event_id": 9})
    series.add_kv_publisher("ns", "comp", lambda: {"published": 1, "last_event_id": 4})
    got = samples(metrics)
    topic = (("component", "comp"), ("namespace", "ns"), ("topic", "kv-events"))
    component = (("component", "comp"), ("namespace", "ns"))
    assert got["troupe_events_published_total", topic] == 7
    assert got["troupe_events_received_total", topic] == 2
    assert got["troupe_events_malformed_total", topic] == 1
    assert got["troupe_events_dropped_total", topic] == 0
    load = (("component", "x"), ("namespace", "ns"), ("topic", "load"))
    assert got["troupe_events_dropped_total", load] == 5
    assert got["troupe_kv_events_applied_total", component] == 10
    assert got["troupe_kv_events_gaps_total", component] == 1
    assert got["troupe_kv_events_recovered_total", component] == 0
    assert got["troupe_kv_follower_workers", component] == 3
    assert got["troupe_kv_events_published_total", component] == 10
    assert got["troupe_kv_events_last_event_id", component] == 9  # the highest, not a sum
    assert {name for name, _ in got} >= set(SERIES)


def test_a_publishing_worker_and_a_following_router_export_their_counters() -> None:
    kv, plane = MemoryKvServer(), MemoryEventPlane()
    with (
        Runtime(CONFIG, handle_signals=False, memory_server=kv) as worker,
        Runtime(CONFIG, handle_signals=False, memory_server=kv) as router,
    ):
        publisher = worker.kv_events(ENDPOINT, block_size=4, plane=plane)
        follower = follow_kv_events(router, ENDPOINT, plane=MemoryEventPlane(plane.hub))
        view = follower.sink
        assert isinstance(view, KvView)
        me = worker.instance_id
        for n in range(5):
            publisher.stored(token_ids=[n, n, n, n])
        worker.io.run(publisher.flush(timeout=5), timeout=10)

        def caught_up() -> bool:
            return (
                follower.synced(me)
                and follower.last_event_id(me) == 5
                and view.blocks(me) == rebuilt(publisher)
            )

        assert router.io.run(follower.wait_for(caught_up, timeout=10), timeout=15)
        component = (("component", "comp"), ("namespace", "ns"))
        topic = (*component, ("topic", "kv-events"))
        on_worker, on_router = samples(worker.metrics), samples(router.metrics)
        assert on_worker["troupe_kv_events_published_total", component] == 5
        assert on_worker["troupe_kv_events_dropped_total", component] == 0
        assert on_worker["troupe_kv_events_last_event_id", component] == 5
        assert on_worker["troupe_events_published_total", topic] == 5
        assert on_router["troupe_events_received_total", topic] == 5
        counted = follower.counters()
        assert on_router["troupe_kv_events_received_total", component] == counted.received == 5
        assert on_router["troupe_kv_events_applied_total", component] == counted.applied
        assert on_router["troupe_kv_events_dumps_total", component] == counted.dumps >= 1
        assert on_router["troupe_kv_follower_workers", component] == 1
        assert ("troupe_kv_events_published_total", component) not in on_router


def test_observability_docs_name_every_series() -> None:
    text = DOCS.read_text()
    documented = set(re.findall(r"^\| `(troupe_[a-z_]+)` \|", text, flags=re.MULTILINE))
    missing = [name for name in SERIES if name not in documented]
    assert not missing, f"docs/observability.md has no table row for {missing}"
