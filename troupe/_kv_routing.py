"""A KV-aware router in a runtime: the :class:`KvPolicy` and what feeds it.

``rt.router(endpoint, policy="kv", kv=KvRouterSettings(...))`` builds the policy. Unless
``kv.approximate``, a :class:`~troupe.kv.KvFollower` of the endpoint's component feeds the
policy's index from the workers' KV events on ``rt.event_plane`` (recovering lost events from the
workers' ``kv_events_query`` endpoints, dropping a worker's blocks when it leaves discovery);
with ``kv.replica_sync``, a :class:`~troupe.actors.routing.ReplicaSync` shares the router's
active requests with the other routers of the component. Approximate mode without replica sync
opens no event plane at all. The frontend builds its routers' feeds with :func:`open_kv_feeds`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from troupe.actors.routing import Router
from troupe.actors.routing._kv import KvPolicy, KvRouterSettings
from troupe.actors.routing._kv_metrics import KvRouterCollector
from troupe.actors.routing._kv_sync import ReplicaSync
from troupe.errors import TroupeError
from troupe.events import EventScope
from troupe.kv import KvFollower, follow_kv_events
from troupe.kv._owner import Closer
from troupe.messages import Endpoint, new_instance_id, parse_endpoint

if TYPE_CHECKING:
    from troupe.runtime import Runtime

__all__ = ["KvFeeds", "kv_router", "open_kv_feeds"]


class KvFeeds:
    """What feeds one KV policy: its event follower and its replica sync (either may be None)."""

    def __init__(self, follower: KvFollower | None, sync: ReplicaSync | None) -> None:
        self.follower = follower
        self.sync = sync

    async def close(self) -> None:
        """Stop both (on the I/O loop). Idempotent."""
        follower, self.follower = self.follower, None
        sync, self.sync = self.sync, None
        with contextlib.suppress(TroupeError):
            if follower is not None:
                await follower.close()
            if sync is not None:
                await sync.close()


def open_kv_feeds(
    rt: Runtime, endpoint: str | Endpoint, policy: KvPolicy, *, model: str = ""
) -> KvFeeds:
    """Start the follower and the replica sync ``policy.settings`` ask for (blocking), and
    report the policy's ``troupe_router_kv_*`` series on ``rt.metrics``.

    Raises:
        ConnectionLost: the event plane (NATS) cannot be reached.
    """
    settings = policy.settings
    rt.metrics.collector(KvRouterCollector).add(policy, parse_endpoint(endpoint).path, model)
    follower = None
    if not settings.approximate:
        follower = follow_kv_events(rt, endpoint, sink=policy.index)
    sync = None
    if settings.replica_sync:
        ep = parse_endpoint(endpoint)
        sync = ReplicaSync()
        scope = EventScope(ep.namespace, ep.component)
        rt.io.run(sync.start(rt.event_plane, scope, new_instance_id()), timeout=10)
        policy.sync = sync
    return KvFeeds(follower, sync)


def kv_router(
    rt: Runtime, endpoint: Endpoint, settings: KvRouterSettings | None, **options: Any
) -> Router:
    """A router over ``endpoint`` choosing with a :class:`KvPolicy` (see the module docstring).

    ``options`` are :meth:`Runtime.router`'s other keyword arguments. The feeds stop with the
    runtime.

    Raises:
        ConnectionLost: the event plane (NATS) cannot be reached; approximate mode needs none.
    """
    policy = KvPolicy(settings)
    feeds = open_kv_feeds(rt, endpoint, policy)
    if feeds.sync is not None:
        rt.spawn(lambda: Closer(rt.io, feeds.close), name=f"KvFeeds-{endpoint.path}")
    return rt.router(endpoint, policy=policy, **options)
