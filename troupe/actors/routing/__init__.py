"""Routing: which instance of an endpoint serves the next request, and sending it there.

The :class:`RouterActor` subscribes to a :class:`~troupe.actors.WatcherActor`, owns the table of
live instances of one endpoint, and after every change publishes an immutable
:class:`RouterSnapshot` by assigning one attribute of a shared :class:`SnapshotHolder`. The
:class:`Router` handle (what users call) reads that attribute without any mailbox hop, picks an
instance with its :class:`Policy`, and streams the answer over the transport named by the
instance's address; it sets failed instances aside, migrates and retries as :class:`Retries` and
``migration_limit`` allow, and bridges callers off the runtime's I/O loop.

Modules, one per role:

- ``_snapshot``: what the actor publishes and the handle reads: :class:`RoutedInstance`,
  :class:`RouterSnapshot`, :class:`SnapshotHolder`, and :func:`choose_address` with
  :data:`ADDRESS_PREFERENCE`.
- ``_actor``: :class:`RouterActor`, the instance table of one endpoint, and its messages
  (:class:`SetAside`, :data:`RouterMessage`).
- ``_policies``: the :class:`Policy` seam and the policies of :data:`POLICIES`.
- ``_kv``: :class:`KvPolicy`, KV-aware routing on that seam (:class:`KvRouterSettings`).
- ``_retries``: when a request tries again: :class:`Retries`, :class:`RouteObserver`,
  :data:`Resume`, :data:`MIGRATABLE`, and the retry and migration decisions of the handle.
- ``_bridge``: the bridge between a caller on another thread or event loop and the I/O loop.
- ``_router``: the :class:`Router` handle and its request loop (the hot path).
- ``_spawn``: :func:`spawn_router`, which starts the actors of one endpoint and returns its handle.
"""

from troupe.actors.routing._actor import RouterActor, RouterMessage, SetAside
from troupe.actors.routing._kv import KvPolicy, KvRouterSettings
from troupe.actors.routing._policies import POLICIES, Policy
from troupe.actors.routing._retries import MIGRATABLE, Resume, Retries, RouteObserver
from troupe.actors.routing._router import Router
from troupe.actors.routing._snapshot import (
    ADDRESS_PREFERENCE,
    RoutedInstance,
    RouterSnapshot,
    SnapshotHolder,
    choose_address,
)
from troupe.actors.routing._spawn import spawn_router

__all__ = [
    "ADDRESS_PREFERENCE",
    "MIGRATABLE",
    "POLICIES",
    "KvPolicy",
    "KvRouterSettings",
    "Policy",
    "Resume",
    "Retries",
    "RouteObserver",
    "RoutedInstance",
    "Router",
    "RouterActor",
    "RouterMessage",
    "RouterSnapshot",
    "SetAside",
    "SnapshotHolder",
    "choose_address",
    "spawn_router",
]

# Reprs and tracebacks show the public path (troupe.actors.routing.RouterActor).
for _public in (
    KvPolicy,
    KvRouterSettings,
    Policy,
    Retries,
    RouteObserver,
    RoutedInstance,
    Router,
    RouterActor,
    RouterSnapshot,
    SetAside,
    SnapshotHolder,
    choose_address,
    spawn_router,
):
    _public.__module__ = __name__
del _public
