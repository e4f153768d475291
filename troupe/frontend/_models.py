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
  different models). It is created by the registry actor the first time the pair is seen,
  before the table listing it is published, and kept until the registry closes (a router with
  no instances costs two idle actors; keeping it avoids churn when a model's only worker
  restarts). Handlers on the event loop only read the published router map: they never take
  a lock that the registry actor holds while it spawns actors.
"""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from troupe._logging import get_logger
from troupe.actors import Actor, ActorRef, Joined, Left, Router, Subscribe, WatcherActor
from troupe.discovery import SERVICES_PREFIX, InstanceRecord, decode_record
from troupe.errors import NoInstances, TroupeError
from troupe.runtime import Runtime

__all__ = ["ModelEntry", "ModelRegistry", "ModelTable"]

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


class _RegistryActor(Actor[Joined | Left]):
    """Owns ``key -> (model, endpoint path)``; publishes :class:`ModelTable` snapshots."""

    def __init__(
        self,
        watcher: ActorRef[Any],
        publish: Callable[[ModelTable], None],
        add_router: Callable[[str, str], None],
    ) -> None:
        super().__init__()
        self._watcher = watcher
        self._publish_to = publish
        self._add_router = add_router
        self._served: dict[str, tuple[str, str]] = {}
        self._created: dict[str, int] = {}
        self._routed: set[tuple[str, str]] = set()
        self._version = 0

    def started(self) -> None:
        self._watcher.tell(Subscribe(self.ref))

    def receive(self, message: Joined | Left) -> None:
        match message:
            case Joined(key=key, instance=record):
                model = record.metadata.get("model") if isinstance(record, InstanceRecord) else None
                if not isinstance(model, str) or not model:
                    if self._served.pop(key, None) is not None:
                        self._publish()
                    return
                assert isinstance(record, InstanceRecord)
                path = f"{record.namespace}.{record.component}.{record.endpoint}"
                if (model, path) not in self._routed:
                    # Before publishing: a handler that sees the model finds its router.
                    try:
                        self._add_router(model, path)
                    except TroupeError as exc:  # the runtime is closing
                        _log.info("no router for model", model=model, endpoint=path, error=str(exc))
                    else:
                        self._routed.add((model, path))
                self._created.setdefault(model, int(time.time()))
                self._served[key] = (model, path)
                self._publish()
            case Left(key=key):
                if self._served.pop(key, None) is not None:
                    self._publish()

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
        policy: the routers' policy (``round_robin``, ``random``, ``least_loaded``).
    """

    def __init__(self, rt: Runtime, *, policy: str = "round_robin") -> None:
        self._rt = rt
        self.policy = policy
        self.table = ModelTable()
        """The current table (read without a hop; replaced on every change)."""
        # (model, endpoint path) -> Router. Written only by the registry actor (and close),
        # always replaced as a whole, so readers on any thread need no lock.
        self._routers: Mapping[tuple[str, str], Router] = types.MappingProxyType({})
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
                lambda: _RegistryActor(watcher, self._publish, self._add_router),
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
        routers = list(self._routers.values())
        self._routers = types.MappingProxyType({})
        for router in routers:
            router.close(timeout=timeout)

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
        router = self._routers.get((entry.name, path))
        if router is None:
            raise NoInstances(path)
        return router

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
        router = self._rt.router(path, policy=self.policy, instance_filter=_declares(model))
        routers = dict(self._routers)
        routers[(model, path)] = router
        self._routers = types.MappingProxyType(routers)
