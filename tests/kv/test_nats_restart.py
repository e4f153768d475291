"""KV events over NATS core while the server restarts: two workers publish while serving; the
router's follower sees the reconnect, detects the gaps and recovers from the workers' query
endpoints, and its view ends equal to each worker's own state."""

from __future__ import annotations

import pytest

from tests.kv._helpers import rebuilt
from troupe import Config, Runtime
from troupe.config import (
    DiscoveryConfig,
    EventPlaneConfig,
    NatsConfig,
    RequestPlaneConfig,
    TcpConfig,
)
from troupe.discovery import MemoryKvServer
from troupe.kv import KvFollower, KvPublisher, KvView, follow_kv_events
from troupe.testing import NatsServer

ENDPOINT = "ns.llm.generate"
PLANE = RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1", connect_timeout=0.5))


def _converge(router: Runtime, follower: KvFollower, publishers: dict[str, KvPublisher]) -> None:
    """Probe each worker with one more event until the view equals every worker's state: each
    probe shows the follower what it missed, if anything (NATS core delivers at most once)."""
    view = follower.sink
    assert isinstance(view, KvView)

    def converged() -> bool:
        return all(
            follower.synced(worker) and view.blocks(worker) == rebuilt(publisher)
            for worker, publisher in publishers.items()
        )

    for probe in range(200):
        if router.io.run(follower.wait_for(converged, timeout=0.1), timeout=5):
            return
        for publisher in publishers.values():
            publisher.stored(token_ids=[7, 7, 7, probe])
    pytest.fail(f"no convergence: {view.snapshot()}")


@pytest.mark.slow
def test_the_follower_recovers_what_a_server_restart_lost(
    fresh_nats_server: NatsServer,
) -> None:
    config = Config(
        discovery=DiscoveryConfig(kv_store="memory"),
        request_plane=PLANE,
        nats=NatsConfig(server=fresh_nats_server.url, connect_timeout=2.0),
        events=EventPlaneConfig(plane="nats"),
    )
    kv = MemoryKvServer()
    runtimes = [Runtime(config, handle_signals=False, memory_server=kv) for _ in range(3)]
    try:
        router, *workers = [rt.start() for rt in runtimes]
        publishers = {rt.instance_id: rt.kv_events(ENDPOINT, block_size=4) for rt in workers}
        follower = follow_kv_events(router, ENDPOINT)
        for n, publisher in enumerate(publishers.values()):
            for prompt in range(5):
                publisher.stored(token_ids=[n, prompt, 1, 2, 3, 4, 5, 6])
        _converge(router, follower, publishers)
        gaps_before = follower.counters().gaps

        fresh_nats_server.restart()
        # Published while the server is down or coming back: some of it is lost.
        for n, publisher in enumerate(publishers.values()):
            for prompt in range(5, 15):
                publisher.stored(token_ids=[n, prompt, 1, 2, 3, 4, 5, 6])
            publisher.removed(sorted(rebuilt(publisher))[:1])
        _converge(router, follower, publishers)
        counters = follower.counters()
        assert counters.recovered >= counters.gaps - gaps_before  # every gap closed
    finally:
        for rt in reversed(runtimes):
            rt.close()
