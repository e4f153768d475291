"""What a router publishes: a :class:`RouterSnapshot`, held in one attribute of a holder.

The :class:`~troupe.actors.routing.RouterActor` owns the table of live instances of one endpoint
and, after every change, publishes an immutable :class:`RouterSnapshot` by assigning one attribute
of a shared :class:`SnapshotHolder`. The :class:`~troupe.actors.routing.Router` handle (what users
call) reads that attribute without any mailbox hop (DESIGN §3). :func:`choose_address` picks the
address a record is called on, whose scheme names the transport.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from troupe.messages import InstanceRecord

ADDRESS_PREFERENCE: Final[tuple[str, ...]] = ("tcp", "http", "nats", "inproc")
"""The order in which a record's transport addresses are preferred (independent of
``DYN_REQUEST_PLANE``: the client is chosen by the address's scheme)."""


@dataclass(frozen=True, slots=True)
class RoutedInstance:
    """One routable instance: its id, the address chosen from its record, and the record."""

    instance_id: str
    address: str
    record: InstanceRecord


@dataclass(frozen=True, slots=True)
class RouterSnapshot:
    """What callers read without a mailbox hop; replaced as a whole, never mutated.

    Attributes:
        instances: every known instance, sorted by id (set-aside ones included).
        available: the instances not set aside, sorted by id: what policies choose from.
        set_aside: ``instance_id -> clock time`` until which the instance is excluded.
        by_id: every known instance by id.
        version: increases with every publication.
        incompatible: ``instance_id -> wire version`` of the instances that speak another wire
            version than :data:`~troupe.transports.WIRE_VERSION`: known, but never routed to.
    """

    instances: tuple[RoutedInstance, ...] = ()
    available: tuple[RoutedInstance, ...] = ()
    set_aside: Mapping[str, float] = field(default_factory=lambda: types.MappingProxyType({}))
    by_id: Mapping[str, RoutedInstance] = field(default_factory=lambda: types.MappingProxyType({}))
    version: int = 0
    incompatible: Mapping[str, int] = field(default_factory=lambda: types.MappingProxyType({}))

    @classmethod
    def build(
        cls,
        table: Mapping[str, RoutedInstance],
        set_aside: Mapping[str, float],
        version: int,
        incompatible: Mapping[str, int] | None = None,
    ) -> RouterSnapshot:
        """A snapshot of ``table`` with ``set_aside`` excluded from :attr:`available`."""
        instances = tuple(table[key] for key in sorted(table))
        return cls(
            instances=instances,
            available=tuple(i for i in instances if i.instance_id not in set_aside),
            set_aside=types.MappingProxyType(dict(set_aside)),
            by_id=types.MappingProxyType(dict(table)),
            version=version,
            incompatible=types.MappingProxyType(dict(incompatible or {})),
        )


class SnapshotHolder:
    """Holds the current :class:`RouterSnapshot` in one attribute, :attr:`current`.

    The RouterActor is its only writer (:meth:`publish`); readers just read ``current``.
    Waiters (:meth:`wait_sync`, :meth:`add_listener`) are woken on every publication.
    """

    __slots__ = ("_cond", "_listeners", "current")

    def __init__(self) -> None:
        self.current = RouterSnapshot()
        self._cond = threading.Condition()
        self._listeners: set[Callable[[], None]] = set()

    def publish(self, snapshot: RouterSnapshot) -> None:
        """Make ``snapshot`` current and wake every waiter."""
        with self._cond:
            self.current = snapshot
            self._cond.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def wait_sync(
        self, predicate: Callable[[RouterSnapshot], bool], timeout: float | None
    ) -> RouterSnapshot | None:
        """Block until ``predicate(current)`` holds; the snapshot, or ``None`` on timeout."""
        with self._cond:
            if self._cond.wait_for(lambda: predicate(self.current), timeout):
                return self.current
        return None

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on the publisher's thread; it must not block) on publications."""
        with self._cond:
            self._listeners.add(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener``."""
        with self._cond:
            self._listeners.discard(listener)


def choose_address(record: InstanceRecord) -> str | None:
    """The address to call ``record`` on: the first of :data:`ADDRESS_PREFERENCE` it has."""
    transport = record.transport
    for plane in ADDRESS_PREFERENCE:
        address = transport.get(plane)
        if address:
            return address
    return None
