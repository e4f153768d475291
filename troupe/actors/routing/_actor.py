"""The :class:`RouterActor`: the table of live instances of one endpoint, and its messages.

The actor subscribes to a :class:`~troupe.actors.WatcherActor`, owns the table of live instances
of one endpoint, and after every change publishes an immutable
:class:`~troupe.actors.routing.RouterSnapshot` through a shared
:class:`~troupe.actors.routing.SnapshotHolder`. A refused or failed connection or a broken stream
sets the instance aside for a few seconds: the :class:`~troupe.actors.routing.Router` handle tells
the actor :class:`SetAside`, and the actor routes to the instance again once the window ends.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import msgspec

from troupe._support._logging import get_logger
from troupe.actors._actor import Actor, ActorRef, ExitReason
from troupe.actors._watcher import Joined, Left, Subscribe, Unsubscribe
from troupe.actors.routing._snapshot import (
    RoutedInstance,
    RouterSnapshot,
    SnapshotHolder,
    choose_address,
)
from troupe.errors import ActorDead, ConfigError
from troupe.messages import WIRE_VERSION, InstanceRecord

# The whole router logs under one name, the one it had as a single module.
_log = get_logger("troupe.actors.router")


class SetAside(msgspec.Struct, frozen=True, tag=True):
    """Tell: exclude ``instance_id`` from routing for the actor's set-aside window."""

    instance_id: str


class _Reinclude(msgspec.Struct, frozen=True, tag=True):
    instance_id: str
    token: int


RouterMessage = Joined | Left | SetAside | _Reinclude


class RouterActor(Actor[RouterMessage]):
    """Owns the instance table of one endpoint and publishes snapshots of it.

    Args:
        watcher: the WatcherActor of the endpoint's prefix (its decoder must yield
            :class:`~troupe.discovery.InstanceRecord`); the actor subscribes on start.
        holder: where snapshots are published.
        set_aside_for: seconds (of the system clock) a failed instance stays excluded.
        instance_filter: if given, only records it returns ``True`` for are routed to; any
            other record counts as absent (a change that makes a record fail it removes the
            instance). Called on the actor's thread; it must not block or raise.

    A record whose ``wire`` is not :data:`~troupe.transports.WIRE_VERSION` is not routed to
    either (an older peer would hang or drop frames): it is listed in the snapshot's
    ``incompatible``, with one warning per instance, so that requests fail with
    :class:`~troupe.errors.IncompatibleInstances` rather than ``NoInstances``. The check is made
    when the record arrives, never per request.
    """

    def __init__(
        self,
        watcher: ActorRef[Any],
        holder: SnapshotHolder,
        *,
        set_aside_for: float = 5.0,
        instance_filter: Callable[[InstanceRecord], bool] | None = None,
    ) -> None:
        super().__init__()
        if not set_aside_for > 0:
            raise ConfigError("set_aside_for", set_aside_for, "a number of seconds > 0")
        self._watcher = watcher
        self._holder = holder
        self._set_aside_for = set_aside_for
        self._instance_filter = instance_filter
        self._table: dict[str, RoutedInstance] = {}
        self._set_aside: dict[str, float] = {}
        self._incompatible: dict[str, int] = {}  # instance_id -> its wire version
        self._tokens = itertools.count(1)
        self._timers: dict[str, tuple[int, Any]] = {}  # instance_id -> (token, TimerHandle)
        self._version = 0

    def started(self) -> None:
        self._watcher.tell(Subscribe(self.ref))

    def stopped(self, reason: ExitReason, error: BaseException | None) -> None:
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        try:
            self._watcher.tell(Unsubscribe(self.ref))
        except ActorDead:
            pass  # the watcher is gone; nothing to unsubscribe from

    def receive(self, message: RouterMessage) -> None:
        match message:
            case Joined(instance_id=instance_id, instance=record):
                self._joined(instance_id, record)
            case Left(instance_id=instance_id):
                self._drop(instance_id)
            case SetAside(instance_id=instance_id):
                if instance_id in self._table:
                    self._exclude(instance_id)
                    self._publish()
            case _Reinclude(instance_id=instance_id, token=token):
                current = self._timers.get(instance_id)
                if current is not None and current[0] == token:
                    self._include(instance_id)
                    self._publish()

    def _joined(self, instance_id: str, record: object) -> None:
        address = choose_address(record) if isinstance(record, InstanceRecord) else None
        if address is None:
            _log.warning(
                "ignoring an instance with no usable address",
                instance_id=instance_id,
                record=repr(record),
            )
            self._drop(instance_id)
            return
        assert isinstance(record, InstanceRecord)
        if self._instance_filter is not None and not self._instance_filter(record):
            self._drop(instance_id)  # filtered out: as if absent
            return
        if record.wire != WIRE_VERSION:
            self._incompatible_joined(instance_id, record)
            return
        self._incompatible.pop(instance_id, None)
        self._table[instance_id] = RoutedInstance(instance_id, address, record)
        self._publish()

    def _incompatible_joined(self, instance_id: str, record: InstanceRecord) -> None:
        """``record`` speaks another wire version: list it as incompatible, not routable."""
        if self._incompatible.get(instance_id) == record.wire:
            return  # known already (its record changed otherwise): nothing to publish or warn
        _log.warning(
            "not routing to an instance of another wire version: upgrade them together",
            endpoint=f"{record.namespace}.{record.component}.{record.endpoint}",
            instance_id=instance_id,
            instance_wire=record.wire,
            wire=WIRE_VERSION,
        )
        self._incompatible[instance_id] = record.wire
        if self._table.pop(instance_id, None) is not None:
            self._include(instance_id)
        self._publish()

    def _drop(self, instance_id: str) -> None:
        """Forget ``instance_id`` (it left, or no longer counts); publish if anything changed."""
        removed = self._table.pop(instance_id, None) is not None
        if removed:
            self._include(instance_id)
        if self._incompatible.pop(instance_id, None) is not None or removed:
            self._publish()

    def _exclude(self, instance_id: str) -> None:
        previous = self._timers.pop(instance_id, None)
        if previous is not None:
            previous[1].cancel()
        token = next(self._tokens)
        self._set_aside[instance_id] = self.system.clock.now() + self._set_aside_for
        timer = self.send_after(self._set_aside_for, _Reinclude(instance_id, token))
        self._timers[instance_id] = (token, timer)
        _log.info("instance set aside", instance_id=instance_id, seconds=self._set_aside_for)

    def _include(self, instance_id: str) -> None:
        self._set_aside.pop(instance_id, None)
        previous = self._timers.pop(instance_id, None)
        if previous is not None:
            previous[1].cancel()

    def _publish(self) -> None:
        self._version += 1
        self._holder.publish(
            RouterSnapshot.build(self._table, self._set_aside, self._version, self._incompatible)
        )
