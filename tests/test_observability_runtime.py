"""The runtime's status server and metrics, end to end: serve, call, scrape, stop."""

from __future__ import annotations

import httpx

from troupe import Config, Runtime
from troupe.config import DiscoveryConfig, RequestPlaneConfig, SystemConfig, TcpConfig
from troupe.demo import words
from troupe.discovery import MemoryKvServer

CONFIG = Config(
    discovery=DiscoveryConfig(kv_store="memory"),
    request_plane=RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1")),
    system=SystemConfig(host="127.0.0.1", port=0),
)


def test_health_and_metrics_follow_the_worker() -> None:
    with Runtime(CONFIG, handle_signals=False, memory_server=MemoryKvServer()) as rt:
        assert rt.status is not None
        base = rt.status.url
        with httpx.Client(timeout=5, trust_env=False) as http:
            assert http.get(f"{base}/live").status_code == 200
            worker = rt.serve("demo.backend.words", words)
            health = http.get(f"{base}/health")
            assert health.status_code == 200
            assert health.json()["endpoints"] == {"demo.backend.words": "ready"}

            router = rt.router("demo.backend.words")
            router.wait_for_instances_sync(timeout=5)
            assert [c["word"] for c in router.generate_sync({"text": "a b c"})] == ["a", "b", "c"]
            metrics = http.get(f"{base}/metrics").text
            labels = 'component="backend",endpoint="words",namespace="demo"'
            assert f"troupe_requests_total{{{labels}}} 1.0" in metrics
            assert f"troupe_inflight_requests{{{labels}}} 0.0" in metrics
            assert "troupe_response_bytes_total" in metrics

            worker.stop()
            after = http.get(f"{base}/health")
            assert after.status_code == 503
            assert after.json()["status"] == "notready"


def test_status_server_is_off_by_default() -> None:
    with Runtime(Config(discovery=DiscoveryConfig(kv_store="memory")), handle_signals=False) as rt:
        assert rt.status is None
