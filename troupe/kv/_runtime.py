"""KV events in a :class:`~troupe.Runtime`: the worker's publisher and query endpoint, a follower.

- :func:`open_kv_events` (``rt.kv_events(endpoint, block_size=16)``): a started
  :class:`~troupe.kv.KvPublisher` for the endpoint's namespace and component, publishing as the
  runtime's instance id, and the query endpoint ``{namespace}.{component}.kv_events_query``
  served from its local indexer, registered with ``kv_block_size`` in its record's metadata.
- :func:`follow_kv_events`: a started :class:`~troupe.kv.KvFollower` of a component's workers,
  found through a router over their query endpoints.

Both are closed with the runtime (an actor spawned after them closes them when actors stop). A
follower closed before that (``await follower.close()``) releases that actor, its router and its
metrics sample.
The event plane is ``rt.event_plane`` unless one is given. Each registers its counters, and its
plane's, on the runtime's Prometheus registry (:mod:`troupe._support._metrics_events`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from typing import TYPE_CHECKING, Any

from troupe._support._metrics_events import EventSeries, Sample, event_series
from troupe.errors import ConfigError
from troupe.events import EventPlane, EventScope
from troupe.kv._directory import RouterDirectory
from troupe.kv._follower import FollowerSettings, KvFollower
from troupe.kv._local import DEFAULT_RING_SIZE
from troupe.kv._publisher import KvPublisher
from troupe.kv._query import QUERY_ENDPOINT, query_handler
from troupe.kv._sink import KvSink, KvView
from troupe.messages import Endpoint, parse_endpoint

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from troupe.actors import ActorRef
    from troupe.actors.routing import Router
    from troupe.runtime import Runtime

__all__ = ["follow_kv_events", "open_kv_events", "query_endpoint"]


def query_endpoint(endpoint: str | Endpoint) -> Endpoint:
    """The KV events query endpoint of ``endpoint``'s namespace and component."""
    ep = parse_endpoint(endpoint)
    return Endpoint(ep.namespace, ep.component, QUERY_ENDPOINT)


def open_kv_events(
    rt: Runtime,
    endpoint: str | Endpoint,
    *,
    block_size: int = 16,
    plane: EventPlane | None = None,
    ring_size: int = DEFAULT_RING_SIZE,
) -> KvPublisher:
    """Publish this runtime's KV events for ``endpoint``'s component and serve its query
    endpoint; see the module docstring.

    Raises:
        ConfigError: this runtime already publishes for that component; ``DYN_EVENT_PLANE`` or
            ``DYN_DURABLE_KV_EVENTS`` is unusable (no ``plane`` given).
        ConnectionLost: the runtime's event plane (NATS) cannot be reached.
        InvalidRequest: ``block_size`` or ``ring_size`` < 1.
    """
    query = query_endpoint(endpoint)
    events = _plane(rt, plane)
    if query.path in rt.server().endpoints:
        raise ConfigError(
            "endpoint", query.path, "one KV event publisher per component in a runtime"
        )
    scope = EventScope(query.namespace, query.component)
    publisher = rt.io.run(
        KvPublisher.open(events, scope, rt.instance_id, block_size=block_size, ring_size=ring_size),
        timeout=10,
    )
    try:
        rt.serve(query, query_handler(publisher.indexer), metadata=publisher.metadata)
    except BaseException:
        rt.io.run(publisher.close(), timeout=10)
        raise
    _close_with(rt, f"KvPublisher-{scope.namespace}.{scope.component}", publisher.close)
    series = event_series(rt.metrics)
    series.add_plane(events)
    series.add_kv_publisher(scope.namespace, scope.component, lambda: _publisher_sample(publisher))
    return publisher


def follow_kv_events(
    rt: Runtime,
    endpoint: str | Endpoint,
    *,
    sink: KvSink | None = None,
    plane: EventPlane | None = None,
    settings: FollowerSettings | None = None,
) -> KvFollower:
    """Follow the KV events of ``endpoint``'s component into ``sink`` (a new
    :class:`~troupe.kv.KvView` by default); the follower runs on the runtime's I/O loop.

    Raises:
        ConfigError: ``DYN_EVENT_PLANE`` or ``DYN_DURABLE_KV_EVENTS`` is unusable (no ``plane``
            given).
        ConnectionLost: the runtime's event plane (NATS) cannot be reached.
        TransportError: the event plane refused the subscription.
    """
    from troupe.actors.routing import spawn_router  # noqa: PLC0415  # troupe.kv: below actors

    query = query_endpoint(endpoint)
    events = _plane(rt, plane)
    scope = EventScope(query.namespace, query.component)
    # The follower's own router (rt.router would keep it until the runtime closes): closed with
    # the follower, so a follower closed early (a frontend dropping a model) leaves nothing.
    router = spawn_router(rt.system, rt.store, rt.network, rt.io, query)
    follower = KvFollower(
        events,
        scope,
        RouterDirectory(router),
        sink if sink is not None else KvView(),
        settings=settings,
    )
    try:
        rt.io.run(follower.start(), timeout=10)
    except BaseException:
        with contextlib.suppress(Exception):  # the start's error is the one to report
            rt.io.run(follower.close(), timeout=10)
        router.close()
        raise
    series = event_series(rt.metrics)
    series.add_plane(events)
    sample = functools.partial(_follower_sample, follower)
    series.add_kv_follower(scope.namespace, scope.component, sample)
    closer = _close_with(rt, f"KvFollower-{scope.namespace}.{scope.component}", follower.close)
    follower.on_close(functools.partial(_release_follower, router, closer, series, sample))
    return follower


async def _release_follower(
    router: Router, closer: ActorRef[Any], series: EventSeries, sample: Sample
) -> None:
    """What :func:`follow_kv_events` made for a follower, released once it is closed: its
    counters fold into the component's retired totals, the actor that would have closed it at
    the runtime's stop stops now, and its router closes (off the I/O loop: it joins actors)."""
    series.retire_kv_follower(sample)
    closer.stop(timeout=0)  # an early close; at the runtime's stop it is the one stopping
    await asyncio.to_thread(router.close)


def _plane(rt: Runtime, plane: EventPlane | None) -> EventPlane:
    if plane is None:
        return rt.event_plane
    if not isinstance(plane, EventPlane):
        raise ConfigError("plane", plane, "an EventPlane")
    return plane


def _publisher_sample(publisher: KvPublisher) -> dict[str, int]:
    """A publisher's counters, as ``troupe_kv_events_*`` series read them."""
    return {
        "published": publisher.published,
        "dropped": publisher.dropped,
        "last_event_id": publisher.last_event_id,
    }


def _follower_sample(follower: KvFollower) -> dict[str, int]:
    """A follower's totals and the workers it follows, as ``troupe_kv_*`` series read them."""
    return dataclasses.asdict(follower.counters()) | {"workers": len(follower.workers())}


def _close_with(
    rt: Runtime, name: str, close: Callable[[], Coroutine[Any, Any, None]]
) -> ActorRef[Any]:
    from troupe.kv._owner import Closer  # noqa: PLC0415  # troupe.kv sits below the actors

    return rt.spawn(lambda: Closer(rt.io, close), name=name)
