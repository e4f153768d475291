"""WatcherActor: turns a store's prefix watch into typed ``Joined`` / ``Left`` messages.

The watch itself runs as a task on the I/O loop and forwards raw store events to the actor,
which owns the table of known instances and its subscribers. A new subscriber first receives a
``Joined`` for every instance currently known, then the deltas: both come from this one actor, so
no event can slip between the two. When the store connection is lost the watch is re-opened with
backoff; its fresh snapshot is diffed against the table, and only the difference is sent
(``Left(reason="resync")`` for what vanished meanwhile, ``Joined`` for what is new or changed).
A record that fails to decode is skipped with a warning; the watch keeps going.

Only records bound to a lease count (``leased_only``, on by default): a key that nothing expires
(``KeyValue.lease`` is None: written by hand, say, with ``etcdctl put``) would otherwise draw
traffic forever after its writer is gone. Such a key is ignored, with one warning naming it
(again only after it was deleted and written once more); a known instance whose key is rewritten
without a lease leaves with ``Left(reason="unleased")``.
"""

from __future__ import annotations

import concurrent.futures
import random
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from troupe._support._logging import get_logger
from troupe.actors._actor import Actor, ActorRef, Down, ExitReason, MonitorRef
from troupe.actors._supervisor import Backoff
from troupe.discovery import Delete, KeyValue, KeyValueStore, Put, Snapshot, WatchEvent
from troupe.errors import ActorDead, DiscoveryError

__all__ = [
    "Ignored",
    "Instances",
    "Joined",
    "Left",
    "LeftReason",
    "Subscribe",
    "Unsubscribe",
    "WatcherActor",
]

LeftReason = Literal["deleted", "expired", "resync", "unleased"]
"""Why an instance left: its key was deleted; its lease expired (crash, lost connectivity, or a
clean stop that revoked the lease); it vanished while the watch was reconnecting; or its key was
rewritten without a lease (ignored from then on)."""

_log = get_logger("troupe.actors.watcher")


class Joined(msgspec.Struct, frozen=True, tag=True):
    """An instance appeared (or its record changed: a later ``Joined`` for the same key)."""

    key: str
    instance_id: str
    instance: Any


class Left(msgspec.Struct, frozen=True, tag=True):
    """An instance disappeared."""

    key: str
    instance_id: str
    reason: LeftReason


class Subscribe(msgspec.Struct, frozen=True, tag=True):
    """Ask: send ``Joined``/``Left`` to ``subscriber`` from now on, starting with the current
    set; answers the number of instances sent as the initial set."""

    subscriber: ActorRef[Any]


class Unsubscribe(msgspec.Struct, frozen=True, tag=True):
    """Ask: stop sending to ``subscriber``."""

    subscriber: ActorRef[Any]


class Instances(msgspec.Struct, frozen=True, tag=True):
    """Ask: the current instances as a ``{key: instance}`` dict."""


class Ignored(msgspec.Struct, frozen=True, tag=True):
    """Ask: the sorted keys ignored because no lease binds them (see ``leased_only``)."""


class _Event(msgspec.Struct, frozen=True, tag=True):
    generation: int
    event: WatchEvent


class _WatchEnded(msgspec.Struct, frozen=True, tag=True):
    generation: int
    error: BaseException | None


class _Rewatch(msgspec.Struct, frozen=True, tag=True):
    generation: int


WatcherMessage = Subscribe | Unsubscribe | Instances | Ignored | _Event | _WatchEnded | _Rewatch

Decoder = Callable[[str, bytes], tuple[str, Any]]
"""Turns a key and its value into ``(instance_id, instance)``; raises to skip the record."""


class WatcherActor(Actor[WatcherMessage]):
    """Watches ``prefix`` on ``store`` and tells subscribers who joins and leaves.

    Args:
        store: a connected store, used only on the runtime's I/O loop.
        prefix: the key prefix (path-boundary semantics: ``a/b`` never matches ``a/bc``).
        decode: ``(key, value) -> (instance_id, instance)``; raising skips the record.
        backoff: delays between re-watch attempts after the store connection is lost.
        leased_only: ignore keys bound to no lease (``KeyValue.lease`` is None), warning once
            per key. Routers, the frontend and ``troupe instances`` keep the default.
    """

    def __init__(
        self,
        store: KeyValueStore,
        prefix: str,
        decode: Decoder,
        *,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        leased_only: bool = True,
    ) -> None:
        super().__init__()
        self._store = store
        self._prefix = prefix
        self._decode = decode
        self._backoff = backoff or Backoff(min=0.1, max=5.0, jitter=0.2)
        self._rng = rng or random.Random()
        self._leased_only = leased_only
        self._ignored: set[str] = set()  # lease-less keys present now, each warned about once
        self._table: dict[str, tuple[str, Any, bytes]] = {}  # key -> (instance_id, inst, raw)
        self._subscribers: dict[ActorRef[Any], MonitorRef] = {}
        self._generation = 0
        self._failures = 0
        self._task: concurrent.futures.Future[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def started(self) -> None:
        self._open_watch()

    def stopped(self, reason: ExitReason, error: BaseException | None) -> None:
        if self._task is not None:
            self._task.cancel()

    # --- messages ------------------------------------------------------------------------------

    def receive(self, message: WatcherMessage) -> Any:
        match message:
            case Subscribe(subscriber=subscriber):
                if subscriber not in self._subscribers:
                    self._subscribers[subscriber] = self.monitor(subscriber)
                    for key, (instance_id, instance, _) in self._table.items():
                        self._send(subscriber, Joined(key, instance_id, instance))
                return len(self._table)
            case Unsubscribe(subscriber=subscriber):
                mon = self._subscribers.pop(subscriber, None)
                if mon is not None:
                    self.demonitor(mon)
                return mon is not None
            case Instances():
                return {key: instance for key, (_, instance, _) in self._table.items()}
            case Ignored():
                return sorted(self._ignored)
            case _Event(generation=generation, event=event):
                if generation == self._generation:
                    self._apply(event)
            case _WatchEnded(generation=generation, error=error):
                if generation == self._generation:
                    self._watch_ended(error)
            case _Rewatch(generation=generation):
                if generation == self._generation:
                    self._open_watch()
        return None

    def on_down(self, down: Down) -> None:
        self._subscribers.pop(down.ref, None)

    # --- the watch -----------------------------------------------------------------------------

    def _open_watch(self) -> None:
        self._generation += 1
        generation = self._generation
        ref: ActorRef[WatcherMessage] = self.ref
        watch = self._store.watch(self._prefix)

        async def pump() -> None:
            error: BaseException | None = None
            try:
                async with watch:
                    async for event in watch:
                        ref.tell(_Event(generation, event))
            except DiscoveryError as exc:
                error = exc
            except ActorDead:
                return
            if ref.is_alive():
                ref.tell(_WatchEnded(generation, error))

        self._task = self.system.io_loop().submit(pump())

    def _watch_ended(self, error: BaseException | None) -> None:
        self._failures += 1
        delay = self._backoff.delay(self._failures, self._rng)
        _log.warning(
            "watch ended; re-watching",
            prefix=self._prefix,
            error=str(error) if error else "closed",
            retry_in=round(delay, 3),
        )
        self._generation += 1
        self.send_after(delay, _Rewatch(self._generation))

    def _apply(self, event: WatchEvent) -> None:
        match event:
            case Snapshot(items=items):
                self._failures = 0
                present = {kv.key for kv in items}
                for key in [k for k in self._table if k not in present]:
                    self._remove(key, "resync")
                self._ignored &= present
                for kv in items:
                    self._upsert(kv)
            case Put(kv=kv):
                self._upsert(kv)
            case Delete(key=key, expired=expired):
                self._ignored.discard(key)
                self._remove(key, "expired" if expired else "deleted")

    def _upsert(self, kv: KeyValue) -> None:
        key, value = kv.key, kv.value
        if self._leased_only and kv.lease is None:
            self._ignore(key)
            return
        self._ignored.discard(key)
        known = self._table.get(key)
        if known is not None and known[2] == value:
            return  # unchanged (a resync, or a lease refresh rewriting the same record)
        try:
            instance_id, instance = self._decode(key, value)
        except (ValueError, TypeError, msgspec.DecodeError, DiscoveryError) as exc:
            _log.warning("skipping a record that does not parse", key=key, error=str(exc))
            return
        self._table[key] = (instance_id, instance, value)
        self._broadcast(Joined(key, instance_id, instance))

    def _ignore(self, key: str) -> None:
        """A key no lease binds: drop it (if it was an instance) and warn, once per key."""
        self._remove(key, "unleased")
        if key not in self._ignored:
            self._ignored.add(key)
            _log.warning(
                "ignoring a record bound to no lease (written by hand?); delete it",
                key=key,
                prefix=self._prefix,
            )

    def _remove(self, key: str, reason: LeftReason) -> None:
        known = self._table.pop(key, None)
        if known is not None:
            self._broadcast(Left(key, known[0], reason))

    def _broadcast(self, message: Joined | Left) -> None:
        for subscriber in list(self._subscribers):
            self._send(subscriber, message)

    def _send(self, subscriber: ActorRef[Any], message: Joined | Left) -> None:
        try:
            subscriber.tell(message)
        except ActorDead:
            mon = self._subscribers.pop(subscriber, None)
            if mon is not None:
                self.demonitor(mon)
