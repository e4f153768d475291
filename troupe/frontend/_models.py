"""The model registry: which models are served, by which endpoint, through which Router.

A :class:`~troupe.actors.WatcherActor` watches the whole ``/services/`` prefix (every
namespace); a :class:`_RegistryActor` subscribed to it keeps ``key -> (model, endpoint path)``
for every instance record whose ``metadata["model"]`` is a non-empty string, and after each
change publishes an immutable :class:`ModelTable` into one attribute that the web handlers read
without any mailbox hop (as the RouterActor does with its snapshots).

Rules (documented in docs/frontend.md):

- A model is listed while at least one instance declares it.
- Two endpoints declaring the same model: requests go to the endpoint whose path sorts first
  among those with live instances (a deterministic, documented choice; a warning is logged).
- One :class:`~troupe.actors.Router` per (model, endpoint path), routing only to the instances
  of that path whose ``metadata["model"]`` is that model (two workers on one path may serve
  different models). It chooses the instance of every request with its policy and retries or
  migrates it as :class:`RouteOptions` say: the frontend has no routing of its own. It is
  created by the registry actor when the pair is seen, before the table listing it is
  published, and closed ``idle`` seconds (30 by default) after the pair's last instance left,
  unless an instance came back meanwhile (a model whose only worker restarts keeps its
  router). Requests use a router through :meth:`ModelRegistry.lease`: a leased router is never
  closed under a request (the release is retried ``idle`` seconds later), and a request that
  asks after the release gets ``NoInstances`` (a clean 503). Handlers on the event loop only
  read the published router map and take a lock that guards a few dict operations: never one
  the registry actor holds while it spawns or stops actors.
"""

from __future__ import annotations

import contextlib
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from troupe._kv_routing import KvFeeds, open_kv_feeds
from troupe._support._clock import TimerHandle
from troupe._support._ioloop import IOLoop
from troupe._support._logging import get_logger
from troupe.actors import (
    Actor,
    ActorRef,
    ExitReason,
    Joined,
    Left,
    Router,
    Subscribe,
    WatcherActor,
)
from troupe.actors.routing import (
    KvPolicy,
    KvRouterSettings,
    Policy,
    Resume,
    Retries,
    RouteObserver,
    spawn_router,
)
from troupe.errors import ConfigError, NoInstances, TroupeError
from troupe.messages import SERVICES_PREFIX, InstanceRecord, decode_record
from troupe.runtime import Runtime

__all__ = ["ModelEntry", "ModelRegistry", "ModelTable", "RouteOptions", "Routing"]

_log = get_logger("troupe.frontend.models")


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One served model.

    Attributes:
        name: the model name workers declare.
        endpoints: endpoint paths (``ns.component.endpoint``) serving it, sorted; requests go to
            the first.
        instances: live instances declaring it, over all its endpoints.
        created: UNIX time the model was first seen by this registry.
    """

    name: str
    endpoints: tuple[str, ...]
    instances: int
    created: int


@dataclass(frozen=True, slots=True)
class ModelTable:
    """An immutable view of the served models, replaced as a whole on every change."""

    models: Mapping[str, ModelEntry] = field(default_factory=lambda: types.MappingProxyType({}))
    version: int = 0


def _decode(key: str, value: bytes) -> tuple[str, InstanceRecord]:
    record = decode_record(value, key=key)
    return record.instance_id, record


def _declares(model: str) -> Callable[[InstanceRecord], bool]:
    """An ``instance_filter``: the records whose ``metadata["model"]`` is ``model``."""

    def accept(record: InstanceRecord) -> bool:
        return record.metadata.get("model") == model

    return accept


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """How the registry's routers handle what goes wrong (the policy is ``ModelRegistry``'s).

    Attributes:
        migration_limit: re-sends of a generation whose worker failed.
        retries: retries after ``Overloaded`` and the wait for a replacement worker.
        resume: how a migrated generation continues (see :data:`~troupe.actors.routing.Resume`).
        observer: the observer of a model's router, by model name (e.g. to count retries).
    """

    migration_limit: int = 0
    retries: Retries = field(default_factory=Retries)
    resume: Resume | None = None
    observer: Callable[[str], RouteObserver] | None = None


class Routing:
    """One (model, endpoint path)'s router: it chooses the instance of every request.

    Obtained with :meth:`ModelRegistry.lease`; ``users`` (the leases held) is guarded by the
    registry's lock.
    """

    __slots__ = ("feeds", "model", "path", "router", "users")

    def __init__(self, model: str, path: str, router: Router, feeds: KvFeeds | None = None) -> None:
        self.model = model
        self.path = path
        self.router = router
        self.feeds = feeds
        """What feeds a ``kv`` router's policy (its event follower, replica sync), or None."""
        self.users = 0

    def close(self, io: IOLoop, timeout: float = 5.0) -> None:
        """Close the router and its feeds."""
        self.router.close(timeout=timeout)
        if self.feeds is not None:
            io.submit(self.feeds.close())

    def __repr__(self) -> str:
        return f"<Routing {self.model} on {self.path} users={self.users}>"


class _Release(msgspec.Struct, frozen=True, tag=True):
    """Timer message: release the router of (model, path) if it still has no instance."""

    model: str
    path: str
    token: int


_Message = Joined | Left | _Release


class _RegistryActor(Actor[_Message]):
    """Owns ``key -> (model, endpoint path)``; publishes :class:`ModelTable` snapshots; creates
    a pair's router when it is seen and releases it ``idle`` seconds after its last instance
    left."""

    def __init__(
        self,
        watcher: ActorRef[Any],
        publish: Callable[[ModelTable], None],
        add_router: Callable[[str, str], None],
        release_router: Callable[[str, str], bool],
        idle: float,
    ) -> None:
        super().__init__()
        self._watcher = watcher
        self._publish_to = publish
        self._add_router = add_router
        self._release_router = release_router
        self._idle = idle
        self._served: dict[str, tuple[str, str]] = {}
        self._counts: dict[tuple[str, str], int] = {}  # live instances per routed pair
        self._created: dict[str, int] = {}
        self._routed: set[tuple[str, str]] = set()
        self._timers: dict[tuple[str, str], tuple[int, TimerHandle]] = {}
        self._tokens = 0
        self._version = 0

    def started(self) -> None:
        self._watcher.tell(Subscribe(self.ref))

    def stopped(self, reason: ExitReason, error: BaseException | None) -> None:
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def receive(self, message: _Message) -> None:
        match message:
            case Joined(key=key, instance=record):
                model = record.metadata.get("model") if isinstance(record, InstanceRecord) else None
                if not isinstance(model, str) or not model:
                    if self._serve(key, None):
                        self._publish()
                    return
                assert isinstance(record, InstanceRecord)
                path = f"{record.namespace}.{record.component}.{record.endpoint}"
                pair = (model, path)
                if pair not in self._routed:
                    # Before publishing: a handler that sees the model finds its router.
                    try:
                        self._add_router(model, path)
                    except TroupeError as exc:  # the runtime is closing
                        _log.info("no router for model", model=model, endpoint=path, error=str(exc))
                    else:
                        self._routed.add(pair)
                self._created.setdefault(model, int(time.time()))
                self._serve(key, pair)
                self._publish()
            case Left(key=key):
                if self._serve(key, None):
                    self._publish()
            case _Release(model=model, path=path, token=token):
                self._release((model, path), token)

    def _serve(self, key: str, pair: tuple[str, str] | None) -> bool:
        """Record that ``key`` serves ``pair`` (``None``: nothing); whether it served before."""
        previous = self._served.pop(key, None)
        if pair is not None:
            self._served[key] = pair
            self._counts[pair] = self._counts.get(pair, 0) + 1
            timer = self._timers.pop(pair, None)
            if timer is not None:
                timer[1].cancel()  # an instance is back: the router stays
        if previous is not None:
            left = self._counts[previous] - 1
            if left:
                self._counts[previous] = left
            else:
                del self._counts[previous]
                if previous in self._routed:
                    self._arm(previous)
        return previous is not None

    def _arm(self, pair: tuple[str, str]) -> None:
        previous = self._timers.pop(pair, None)
        if previous is not None:
            previous[1].cancel()
        self._tokens += 1
        timer = self.send_after(self._idle, _Release(pair[0], pair[1], self._tokens))
        self._timers[pair] = (self._tokens, timer)

    def _release(self, pair: tuple[str, str], token: int) -> None:
        current = self._timers.get(pair)
        if current is None or current[0] != token or pair in self._counts:
            return  # superseded: an instance came back, or another timer is armed
        del self._timers[pair]
        if self._release_router(*pair):
            self._routed.discard(pair)
            _log.info("router released", model=pair[0], endpoint=pair[1])
        else:
            self._arm(pair)  # a request still holds it: try again later

    def _publish(self) -> None:
        counts: dict[str, dict[str, int]] = {}
        for model, path in self._served.values():
            per_endpoint = counts.setdefault(model, {})
            per_endpoint[path] = per_endpoint.get(path, 0) + 1
        models = {}
        for model, per_endpoint in sorted(counts.items()):
            endpoints = tuple(sorted(per_endpoint))
            if len(endpoints) > 1:
                _log.warning(
                    "model served by several endpoints; using the first",
                    model=model,
                    endpoints=list(endpoints),
                )
            models[model] = ModelEntry(
                model, endpoints, sum(per_endpoint.values()), self._created[model]
            )
        self._version += 1
        self._publish_to(ModelTable(types.MappingProxyType(models), self._version))


class ModelRegistry:
    """Tracks the served models and owns one Router per (model, serving endpoint).

    Args:
        rt: a running runtime (its store, actor system and network are used).
        policy: the routers' policy (``round_robin``, ``random``, ``least_loaded``, ``kv``).
        kv: the KV policy's settings when ``policy`` is ``kv``: each router gets its own
            :class:`~troupe.actors.routing.KvPolicy`, fed by the workers' KV events (a follower
            per router, closed with it) unless ``kv.approximate``.
        idle: seconds a pair's router is kept after its last instance left.
        options: migration, retries and observers of the routers (none by default).

    Raises:
        ConfigError: ``idle`` is not a number of seconds > 0.
    """

    def __init__(
        self,
        rt: Runtime,
        *,
        policy: str = "round_robin",
        idle: float = 30.0,
        options: RouteOptions | None = None,
        kv: KvRouterSettings | None = None,
    ) -> None:
        if not idle > 0:
            raise ConfigError("router_idle", idle, "seconds > 0")
        self._rt = rt
        self.policy = policy
        self.kv = kv
        self.options = options if options is not None else RouteOptions()
        self.idle = idle
        self.table = ModelTable()
        """The current table (read without a hop; replaced on every change)."""
        # (model, endpoint path) -> Routing. Written only by the registry actor (and close),
        # always replaced as a whole under _use_lock; plain readers need no lock.
        self._routers: Mapping[tuple[str, str], Routing] = types.MappingProxyType({})
        self._use_lock = threading.Lock()  # guards _routers' replacement and Routing.users
        self._lock = threading.Lock()  # guards the listeners only
        self._listeners: set[Callable[[], None]] = set()
        self._actors: tuple[ActorRef[Any], ...] = ()

    def start(self) -> None:
        """Open the store (blocking, once) and start watching ``/services/``."""
        store = self._rt.store
        watcher = self._rt.spawn(
            lambda: WatcherActor(store, SERVICES_PREFIX, _decode), name="frontend-models-watcher"
        )
        try:
            actor = self._rt.spawn(
                lambda: _RegistryActor(
                    watcher, self._publish, self._add_router, self._release_router, self.idle
                ),
                name="frontend-models",
            )
        except TroupeError:
            watcher.stop()
            raise
        self._actors = (actor, watcher)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the watch, then every router (blocking: call it off the event loop)."""
        actors, self._actors = self._actors, ()
        for ref in actors:
            ref.stop(timeout=timeout)  # after this, no router is created any more
        with self._use_lock:
            routings = list(self._routers.values())
            self._routers = types.MappingProxyType({})
        for routing in routings:
            routing.close(self._rt.io, timeout=timeout)

    # --- reading -----------------------------------------------------------------------------

    def get(self, model: str) -> ModelEntry | None:
        """The entry of ``model`` if some instance serves it now."""
        return self.table.models.get(model)

    def router(self, entry: ModelEntry) -> Router:
        """The router of ``entry``'s model on the endpoint that serves it (never blocks).

        Raises:
            NoInstances: the registry has no router for it (it is closing, or the runtime
                refused to create one).
        """
        path = entry.endpoints[0]
        routing = self._routers.get((entry.name, path))
        if routing is None:
            raise NoInstances(path)
        return routing.router

    @contextlib.contextmanager
    def lease(self, entry: ModelEntry) -> Iterator[Routing]:
        """Hold ``entry``'s routing for the block: its router is not released meanwhile.

        Never blocks (a lock held for a few dict operations only).

        Raises:
            NoInstances: the registry has no router for it (released since the table was
                read, closing, or the runtime refused to create one).
        """
        path = entry.endpoints[0]
        with self._use_lock:
            routing = self._routers.get((entry.name, path))
            if routing is None:
                raise NoInstances(path)
            routing.users += 1
        try:
            yield routing
        finally:
            with self._use_lock:
                routing.users -= 1

    def routings(self) -> list[Routing]:
        """The routers kept now (for inspection)."""
        return list(self._routers.values())

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every change (on the registry's thread; must not block)."""
        with self._lock:
            self._listeners.add(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener``."""
        with self._lock:
            self._listeners.discard(listener)

    # --- internals (on the registry actor's thread) --------------------------------------------

    def _publish(self, table: ModelTable) -> None:
        self.table = table
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def _add_router(self, model: str, path: str) -> None:
        if (model, path) in self._routers:
            return
        rt, options = self._rt, self.options
        # spawn_router rather than rt.router: the runtime keeps every router it makes until it
        # closes, and this registry releases its routers (it closes the ones it holds itself).
        policy, feeds = self._policy(model, path)
        router = spawn_router(
            rt.system,
            rt.store,  # raises TroupeError once the runtime is closing
            rt.network,
            rt.io,
            path,
            policy=policy,
            instance_filter=_declares(model),
            migration_limit=options.migration_limit,
            resume=options.resume,
            retries=options.retries,
            observer=None if options.observer is None else options.observer(model),
        )
        with self._use_lock:
            routers = dict(self._routers)
            routers[(model, path)] = Routing(model, path, router, feeds)
            self._routers = types.MappingProxyType(routers)

    def _policy(self, model: str, path: str) -> tuple[str | Policy, KvFeeds | None]:
        """The policy of a new router of ``path``, and what feeds it (kv only)."""
        if self.policy != "kv":
            return self.policy, None
        policy = KvPolicy(self.kv)
        return policy, open_kv_feeds(self._rt, path, policy, model=model)

    def _release_router(self, model: str, path: str) -> bool:
        """Close the router of (model, path) unless a request holds it; whether it is gone."""
        with self._use_lock:
            routing = self._routers.get((model, path))
            if routing is None:
                return True
            if routing.users:
                return False
            routers = dict(self._routers)
            del routers[(model, path)]
            self._routers = types.MappingProxyType(routers)
        routing.close(self._rt.io)  # no request holds it; new ones find no router (NoInstances)
        return True
