"""KV events in a :class:`~troupe.Runtime`: the worker's publisher and query endpoint, a follower.

- :func:`open_kv_events` (``rt.kv_events(endpoint, block_size=16)``): a started
  :class:`~troupe.kv.KvPublisher` for the endpoint's namespace and component, publishing as the
  runtime's instance id, and the query endpoint ``{namespace}.{component}.kv_events_query``
  served from its local indexer, registered with ``kv_block_size`` in its record's metadata.
- :func:`follow_kv_events`: a started :class:`~troupe.kv.KvFollower` of a component's workers,
  found through a router over their query endpoints.

Both are closed with the runtime (an actor spawned after them closes them when actors stop).
The event plane is ``rt.event_plane`` unless one is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
        ConfigError: no event plane; this runtime already publishes for that component.
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
        ConfigError: no event plane.
    """
    query = query_endpoint(endpoint)
    events = _plane(rt, plane)
    scope = EventScope(query.namespace, query.component)
    follower = KvFollower(
        events,
        scope,
        RouterDirectory(rt.router(query)),
        sink if sink is not None else KvView(),
        settings=settings,
    )
    rt.io.run(follower.start(), timeout=10)
    _close_with(rt, f"KvFollower-{scope.namespace}.{scope.component}", follower.close)
    return follower


def _plane(rt: Runtime, plane: EventPlane | None) -> EventPlane:
    if plane is None:
        plane = getattr(rt, "event_plane", None)
    if not isinstance(plane, EventPlane):
        raise ConfigError("plane", plane, "an EventPlane (the runtime has no event plane)")
    return plane


def _close_with(rt: Runtime, name: str, close: Callable[[], Coroutine[Any, Any, None]]) -> None:
    from troupe.kv._owner import Closer  # noqa: PLC0415  # troupe.kv sits below the actors

    rt.spawn(lambda: Closer(rt.io, close), name=name)
