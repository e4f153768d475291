"""A KV-aware router in a runtime: the :class:`KvPolicy` and, with events, its follower.

``rt.router(endpoint, policy="kv", kv=KvRouterSettings(...))`` builds the policy; unless
``kv.approximate``, a :class:`~troupe.kv.KvFollower` of the endpoint's component feeds the
policy's index from the workers' KV events on ``rt.event_plane`` (recovering lost events from the
workers' ``kv_events_query`` endpoints, dropping a worker's blocks when it leaves discovery).
Approximate mode opens no event plane at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from troupe.actors.routing import Router
from troupe.actors.routing._kv import KvPolicy, KvRouterSettings
from troupe.kv import follow_kv_events
from troupe.messages import Endpoint

if TYPE_CHECKING:
    from troupe.runtime import Runtime

__all__ = ["kv_router"]


def kv_router(
    rt: Runtime, endpoint: Endpoint, settings: KvRouterSettings | None, **options: Any
) -> Router:
    """A router over ``endpoint`` choosing with a :class:`KvPolicy` (see the module docstring).

    ``options`` are :meth:`Runtime.router`'s other keyword arguments.

    Raises:
        ConnectionLost: the event plane (NATS) cannot be reached; approximate mode needs none.
    """
    policy = KvPolicy(settings)
    if not policy.settings.approximate:
        follow_kv_events(rt, endpoint, sink=policy.index)
    return rt.router(endpoint, policy=policy, **options)
