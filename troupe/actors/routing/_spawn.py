"""Wiring: :func:`spawn_router` starts the actors of one endpoint's router and returns its handle.

A :class:`~troupe.actors.WatcherActor` on the endpoint's discovery prefix feeds a
:class:`~troupe.actors.routing.RouterActor`, which publishes to the
:class:`~troupe.actors.routing.Router` handle that owns both.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

from troupe._support._ioloop import IOLoop
from troupe.actors._actor import ActorRef
from troupe.actors._system import ActorSystem
from troupe.actors._watcher import WatcherActor
from troupe.actors.routing._actor import RouterActor, RouterMessage
from troupe.actors.routing._policies import Policy, _validate
from troupe.actors.routing._retries import Resume, Retries, RouteObserver
from troupe.actors.routing._router import Router
from troupe.actors.routing._snapshot import SnapshotHolder
from troupe.discovery import KeyValueStore
from troupe.errors import ConfigError
from troupe.messages import InstanceRecord, decode_record
from troupe.messages._endpoint import Endpoint, parse_endpoint
from troupe.transports import NetworkManager


def _decode_instance(key: str, value: bytes) -> tuple[str, InstanceRecord]:
    record = decode_record(value, key=key)
    return record.instance_id, record


# Suffixes that keep actor (and thread) names unique when several routers watch one endpoint;
# like ``_actor._names``, a counter shared by every actor system of the process.
_router_numbers = itertools.count(1)


def spawn_router(
    system: ActorSystem,
    store: KeyValueStore,
    network: NetworkManager,
    io: IOLoop,
    endpoint: str | Endpoint,
    *,
    policy: str | Policy = "round_robin",
    migration_limit: int = 0,
    set_aside_for: float = 5.0,
    rng: random.Random | None = None,
    instance_filter: Callable[[InstanceRecord], bool] | None = None,
    resume: Resume | None = None,
    retries: Retries | None = None,
    observer: RouteObserver | None = None,
) -> Router:
    """Start a WatcherActor and a RouterActor for an endpoint; return a Router owning both.

    ``Router.close()`` stops them (the actor system's shutdown does too).

    Args:
        system: the runtime's actor system.
        store: the connected discovery store (used on the I/O loop only).
        network: the clients (used on ``io`` only).
        io: the runtime's I/O loop.
        endpoint: ``"ns.component.endpoint"`` (or ``dyn://...``, or an Endpoint).
        policy: a key of :data:`POLICIES`, or a :class:`Policy`.
        migration_limit: re-sends allowed after an instance failure.
        resume: how to continue a stream that delivered chunks elsewhere (:data:`Resume`).
        retries: retries after ``Overloaded`` and the wait for a replacement (:class:`Retries`).
        observer: told when a request is retried or migrated (:class:`RouteObserver`).
        set_aside_for: seconds a failed instance is excluded.
        rng: randomness for the ``random`` and ``least_loaded`` policies.
        instance_filter: route only to instances whose record it accepts (e.g. those whose
            ``metadata["model"]`` is one model); see :class:`RouterActor`.

    Raises:
        ConfigError: a bad endpoint, policy, migration limit or set-aside window (checked
            before any actor starts).
    """
    ep = parse_endpoint(endpoint)
    prefix, path = ep.prefix, ep.path
    _validate(policy, migration_limit)
    if resume is not None and not callable(resume):
        raise ConfigError("resume", resume, "a callable resume(request, received) -> request")
    if not set_aside_for > 0:
        raise ConfigError("set_aside_for", set_aside_for, "a number of seconds > 0")
    holder = SnapshotHolder()
    number = next(_router_numbers)
    watcher = system.spawn(
        lambda: WatcherActor(store, prefix, _decode_instance),
        name=f"WatcherActor-{path}-{number}",
    )
    actor: ActorRef[RouterMessage] = system.spawn(
        lambda: RouterActor(
            watcher, holder, set_aside_for=set_aside_for, instance_filter=instance_filter
        ),
        name=f"RouterActor-{path}-{number}",
    )
    return Router(
        actor,
        holder,
        network,
        io,
        path,
        policy=policy,
        migration_limit=migration_limit,
        resume=resume,
        retries=retries,
        observer=observer,
        rng=rng,
        owned=(actor, watcher),
        set_aside_for=set_aside_for,
    )
