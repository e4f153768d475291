"""RouterActor and Router: which instance serves the next request, and sending it there.

The :class:`RouterActor` subscribes to a :class:`~troupe.actors.WatcherActor`, owns the table of
live instances of one endpoint, and after every change publishes an immutable
:class:`RouterSnapshot` by assigning one attribute of a shared :class:`SnapshotHolder`. The
:class:`Router` handle (what users call) reads that attribute without any mailbox hop (DESIGN
§3), picks an instance with its policy (a table lookup), and streams the answer over the
transport named by the instance's address. A refused or failed connection or a broken stream
sets the instance aside for a few seconds (told to the actor); with ``migration_limit`` the
request is re-sent to another instance, the handler seeing ``ctx.attempt``. A stream that already
delivered chunks continues rather than repeats: it moves only to an instance whose handler is
resumable (told ``ctx.received``), or through the router's ``resume`` hook. An instance that
answers ``Overloaded`` before its first chunk (at its admission limit, or draining) is skipped for
the next untried one (with :class:`Retries`, capped, and tried again after a jittered pause once
every instance refused). A :class:`Policy` sees the request, its headers and the requests in
flight per instance, counted here for every caller of the handle.

Transports' clients are used only on the runtime's I/O loop: a caller on another event loop (a
web framework's) or on a plain thread is bridged, chunks flowing through a queue fed with
``call_soon_threadsafe`` and acknowledged in batches so that a slow reader holds the worker back
rather than filling memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import queue
import random
import threading
import time
import types
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import msgspec

from troupe._endpoint import Endpoint, parse_endpoint
from troupe._ioloop import IOLoop
from troupe._logging import get_logger
from troupe._payload import decode_payload, encode_payload
from troupe.actors._actor import Actor, ActorRef, ExitReason
from troupe.actors._system import ActorSystem
from troupe.actors._watcher import Joined, Left, Subscribe, Unsubscribe, WatcherActor
from troupe.discovery import InstanceRecord, KeyValueStore, decode_record
from troupe.errors import (
    ActorDead,
    Cancelled,
    ConfigError,
    ConnectionLost,
    ConnectTimeout,
    IncompatibleInstances,
    InstanceNotFound,
    NoInstances,
    Overloaded,
    StreamBroken,
    StreamNotResumable,
    TroupeError,
)
from troupe.transports import WIRE_VERSION, NetworkManager

__all__ = [
    "ADDRESS_PREFERENCE",
    "MIGRATABLE",
    "POLICIES",
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

_log = get_logger("troupe.actors.router")

ADDRESS_PREFERENCE: Final[tuple[str, ...]] = ("tcp", "http", "nats", "inproc")
"""The order in which a record's transport addresses are preferred (independent of
``DYN_REQUEST_PLANE``: the client is chosen by the address's scheme)."""

MIGRATABLE: Final[tuple[type[TroupeError], ...]] = (ConnectTimeout, ConnectionLost, StreamBroken)
"""Failures that set the instance aside and may be migrated to another instance. Errors raised
by the handler (``RemoteError``, ``Overloaded``, ...) and timeouts are not: they propagate."""

Resume = Callable[[Any, list[Any]], Any]
"""A router's ``resume`` hook: ``resume(request, received) -> request``. Given the original
request and the chunks its caller already received (decoded, in order, from every earlier
attempt), it returns the request that makes another instance produce only the rest of the answer
(e.g. the prompt extended with the tokens generated so far and a smaller ``max_tokens``)."""

_WINDOW: Final = 64
"""Chunks a bridged request may run ahead of its reader before it waits for acknowledgement."""


# --- the published snapshot --------------------------------------------------------------------


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


# --- the actor ---------------------------------------------------------------------------------


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


# --- policies ----------------------------------------------------------------------------------


class Policy(Protocol):
    """Which instance serves a request: the router's one seam for choosing (see docs/routing.md).

    ``choose`` runs on the runtime's I/O loop for every attempt of every request (retries and
    migrations included, over the instances that attempt may use); it must be quick and must
    not block or raise.
    """

    def choose(
        self,
        candidates: tuple[RoutedInstance, ...],
        load: Mapping[str, int],
        request: Any,
        headers: Mapping[str, str] | None,
    ) -> RoutedInstance:
        """The instance to send ``request`` to.

        Args:
            candidates: the instances this attempt may use, sorted by id; never empty.
            load: requests in flight per instance id (absent: none), counted by the router for
                every caller of it (a frontend and scripts sharing it alike); live, read-only.
            request: the request as the caller passed it (before encoding); after a migration
                through a ``resume`` hook, the rewritten request.
            headers: the caller's headers, if any.
        """
        ...


class _RoundRobin:
    """Each of N instances once per N calls (while the set does not change)."""

    def __init__(self, rng: random.Random) -> None:
        self._counter = itertools.count()

    def choose(
        self,
        candidates: tuple[RoutedInstance, ...],
        load: Mapping[str, int],
        request: Any,
        headers: Mapping[str, str] | None,
    ) -> RoutedInstance:
        return candidates[next(self._counter) % len(candidates)]


class _Random:
    """Uniformly at random."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(
        self,
        candidates: tuple[RoutedInstance, ...],
        load: Mapping[str, int],
        request: Any,
        headers: Mapping[str, str] | None,
    ) -> RoutedInstance:
        return candidates[self._rng.randrange(len(candidates))]


class _LeastLoaded:
    """Power of two choices: of two random instances, the one with fewer requests in flight."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(
        self,
        candidates: tuple[RoutedInstance, ...],
        load: Mapping[str, int],
        request: Any,
        headers: Mapping[str, str] | None,
    ) -> RoutedInstance:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        if load.get(second.instance_id, 0) < load.get(first.instance_id, 0):
            return second
        return first


POLICIES: Final[Mapping[str, Callable[[random.Random], Policy]]] = {
    "round_robin": _RoundRobin,
    "random": _Random,
    "least_loaded": _LeastLoaded,
}
"""Policy name → factory. Direct routing is ``generate(..., instance_id=...)``; a
:class:`Policy` object may be passed instead of a name."""


def _validate(policy: str | Policy, migration_limit: int) -> Callable[[random.Random], Policy]:
    if isinstance(policy, str):
        factory = POLICIES.get(policy)
        if factory is None:
            raise ConfigError("policy", policy, choices=tuple(POLICIES))
    elif callable(getattr(policy, "choose", None)):
        factory = _given(policy)
    else:
        raise ConfigError("policy", policy, f"one of {', '.join(POLICIES)} or a Policy object")
    if not isinstance(migration_limit, int) or migration_limit < 0:
        raise ConfigError("migration_limit", migration_limit, "an integer >= 0")
    return factory


def _given(policy: Policy) -> Callable[[random.Random], Policy]:
    return lambda rng: policy


@dataclass(frozen=True, slots=True)
class Retries:
    """How a router tries again when no instance took a request.

    Attributes:
        overload_tries: attempts answered ``Overloaded`` (before any chunk) that a request may
            make, the first included, before that error reaches the caller. Each goes to an
            instance not tried yet; once every instance refused, the next round starts after
            a pause. ``None``: each instance once, no pause (a request fails with
            ``Overloaded`` once every instance refused it).
        overload_pause: seconds before a new round once every instance refused: doubled at
            each round, times a random factor in [0.5, 1.5) (so that refused requests do not
            come back in step).
        replacement_wait: seconds a migration waits for a new instance to register when every
            known instance was tried (``0``: the failure reaches the caller at once).

    Raises:
        ConfigError: a value out of range.
    """

    overload_tries: int | None = None
    overload_pause: float = 0.01
    replacement_wait: float = 0.0

    def __post_init__(self) -> None:
        tries = self.overload_tries
        if tries is not None and (not isinstance(tries, int) or tries < 1):
            raise ConfigError("overload_tries", tries, "an integer >= 1, or None")
        if not self.overload_pause >= 0:
            raise ConfigError("overload_pause", self.overload_pause, "seconds >= 0")
        if not self.replacement_wait >= 0:
            raise ConfigError("replacement_wait", self.replacement_wait, "seconds >= 0")

    def pause(self, rounds: int, rng: random.Random) -> float:
        """Seconds to wait before round ``rounds + 1`` (``rounds`` >= 1 rounds all refused)."""
        return self.overload_pause * 2.0 ** (rounds - 1) * (0.5 + rng.random())


class RouteObserver(Protocol):
    """Told (on the runtime's I/O loop; it must not block) when a request tries again."""

    def retried(self, endpoint: str) -> None:
        """A request refused with ``Overloaded`` is sent to another attempt."""
        ...

    def migrated(self, endpoint: str) -> None:
        """A request whose instance failed is sent to another instance."""
        ...


# --- the bridge between the caller's thread or loop and the I/O loop ---------------------------

_ITEM: Final = 0
_END: Final = 1
_FAIL: Final = 2

_Message = tuple[int, Any]
_Sink = Callable[[_Message], None]


@dataclass(frozen=True, slots=True)
class _Call:
    """One request as the caller made it."""

    request: Any
    instance_id: str | None
    deadline: float | None
    headers: dict[str, str] | None


class _Flow:
    """Credit between a bridged request (on the I/O loop) and its reader (elsewhere)."""

    __slots__ = ("acked", "room", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.room: asyncio.Event | None = None  # created on the I/O loop

    def ack(self, count: int) -> None:
        """Runs on the I/O loop: ``count`` more chunks were read."""
        self.acked += count
        if self.room is not None and self.sent - self.acked < _WINDOW:
            self.room.set()


def _finish(sink: _Sink, fut: concurrent.futures.Future[None]) -> None:
    """Done callback of a bridged request: tell the reader how it ended."""
    if fut.cancelled():
        sink((_FAIL, Cancelled("request cancelled: the runtime's I/O loop stopped it")))
        return
    exc = fut.exception()
    sink((_END, None) if exc is None else (_FAIL, exc))


# --- the handle --------------------------------------------------------------------------------


class Router:
    """Sends requests for one endpoint to its instances; safe to share between threads.

    Args:
        actor: the endpoint's RouterActor (told ``SetAside`` on failures).
        holder: the holder the actor publishes snapshots to.
        network: the clients, used only on ``io``.
        io: the runtime's I/O loop.
        endpoint: the endpoint's name on the request plane, ``"{namespace}.{component}.{name}"``.
        policy: a key of :data:`POLICIES`, or a :class:`Policy`.
        migration_limit: how many times a request whose instance fails (connect failure or a
            stream broken before its end) is re-sent to another instance.
        resume: called when a stream that already delivered chunks is migrated; see
            :data:`Resume`. Without it such a stream moves only to instances whose handler is
            resumable, and fails with :class:`~troupe.errors.StreamNotResumable` when none is.
        retries: how requests refused with ``Overloaded`` are retried, and how long a migration
            waits for a replacement instance (:class:`Retries`; default: each instance once,
            no wait).
        observer: told when a request is retried or migrated (e.g. to count them).
        rng: randomness of the ``random`` and ``least_loaded`` policies and of the pauses.
        set_aside_for: the actor's set-aside window; a failed instance is excluded by this
            handle at once, for at most that long, until the actor's snapshot excludes it.
        owned: actors stopped by :meth:`close` (the RouterActor and its watcher, when the
            router was built by :func:`spawn_router`).

    Raises:
        ConfigError: unknown policy or negative migration limit.
    """

    def __init__(
        self,
        actor: ActorRef[RouterMessage],
        holder: SnapshotHolder,
        network: NetworkManager,
        io: IOLoop,
        endpoint: str,
        *,
        policy: str | Policy = "round_robin",
        migration_limit: int = 0,
        resume: Resume | None = None,
        retries: Retries | None = None,
        observer: RouteObserver | None = None,
        rng: random.Random | None = None,
        owned: tuple[ActorRef[Any], ...] = (),
        set_aside_for: float = 5.0,
    ) -> None:
        factory = _validate(policy, migration_limit)
        if resume is not None and not callable(resume):
            raise ConfigError("resume", resume, "a callable resume(request, received) -> request")
        self._actor = actor
        self._holder = holder
        self._network = network
        self._io = io
        self.endpoint = endpoint
        self.policy = policy if isinstance(policy, str) else type(policy).__name__
        self.migration_limit = migration_limit
        self.retries = retries if retries is not None else Retries()
        self._resume = resume
        self._observer = observer
        self._rng = rng or random.Random()
        self._policy = factory(self._rng)
        self._inflight: dict[str, int] = {}  # written only on the I/O loop
        # Instances seen failing, until the actor's snapshot sets them aside (I/O loop only).
        self._down: dict[str, float] = {}
        self._set_aside_for = set_aside_for
        self._owned = owned
        self._bridged: set[concurrent.futures.Future[None]] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"<Router {self.endpoint} policy={self.policy} "
            f"instances={len(self._holder.current.instances)}>"
        )

    # --- instances -----------------------------------------------------------------------------

    @property
    def snapshot(self) -> RouterSnapshot:
        """The current snapshot (no mailbox hop)."""
        return self._holder.current

    @property
    def load(self) -> dict[str, int]:
        """Requests in flight per instance id (absent: none), over every caller of this router:
        what its policy sees (a copy)."""
        return dict(self._inflight)

    def instance_ids(self) -> list[str]:
        """The ids of every known instance (set-aside ones included), sorted."""
        return [i.instance_id for i in self._holder.current.instances]

    async def wait_for_instances(self, timeout: float | None = None) -> list[str]:
        """Wait until at least one instance is known; return the known ids.

        Raises:
            NoInstances: none appeared within ``timeout`` seconds.
            IncompatibleInstances: none appeared, but instances of another wire version did.
        """
        if await self.wait_for_snapshot(lambda s: bool(s.instances), timeout) is None:
            raise self._no_instances(self._holder.current)
        return self.instance_ids()

    async def wait_for_snapshot(
        self, predicate: Callable[[RouterSnapshot], bool], timeout: float | None = None
    ) -> RouterSnapshot | None:
        """Wait until a published snapshot satisfies ``predicate``; None after ``timeout``.

        Event-driven: ``predicate`` is checked now and after every snapshot the router's actor
        publishes (an instance joined, left, was set aside or came back), on the calling loop.
        """
        current = self._holder.current
        if predicate(current):
            return current
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(_resolve, woken)
            except RuntimeError:
                pass  # the waiting loop is closed; nobody is left to wake

        self._holder.add_listener(wake)
        try:
            async with asyncio.timeout(timeout):
                while not predicate(current := self._holder.current):
                    await woken
                    woken = loop.create_future()
        except TimeoutError:
            return None
        finally:
            self._holder.remove_listener(wake)
        return current

    def wait_for_instances_sync(self, timeout: float | None = None) -> list[str]:
        """Blocking :meth:`wait_for_instances`, for scripts (not from an event loop)."""
        if self._holder.wait_sync(lambda s: bool(s.instances), timeout) is None:
            raise self._no_instances(self._holder.current)
        return self.instance_ids()

    # --- requests ------------------------------------------------------------------------------

    def generate(
        self,
        request: Any,
        *,
        instance_id: str | None = None,
        deadline: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Send ``request`` and yield the decoded chunks of the answer.

        Works from any event loop: on the runtime's I/O loop directly, elsewhere through a
        bridge. Closing the generator early, or cancelling the task iterating it, cancels the
        request (the worker's handler sees ``ctx.is_stopped()``). Nothing is sent before the
        first iteration.

        Args:
            request: any msgpack-encodable object.
            instance_id: route to this instance only (no migration).
            deadline: UNIX epoch seconds after which the answer is useless.
            headers: string metadata for the handler's context.

        Raises:
            NoInstances: no instance serves the endpoint (at the first iteration).
            IncompatibleInstances: the only instances (or ``instance_id``) speak another wire
                version (at the first iteration).
            InstanceNotFound: ``instance_id`` is not a known instance (at the first iteration).
            TransportError: the typed failure of the last attempt (``StreamBroken``,
                ``ConnectTimeout``, ``RequestTimeout``, ``RemoteError``, ...).
            Overloaded: the worker is at its admission limit.
        """
        if asyncio._get_running_loop() is self._io.loop:
            # On the I/O loop the answer is _run itself: no generator layer in between.
            return self._run(request, instance_id, deadline, headers)
        return self._generate_elsewhere(_Call(request, instance_id, deadline, headers))

    async def _generate_elsewhere(self, call: _Call) -> AsyncGenerator[Any, None]:
        """:meth:`generate` called off the I/O loop: bridged unless iterated on the I/O loop."""
        self._check(call.instance_id)
        if asyncio.get_running_loop() is self._io.loop:
            chunks = self._run(call.request, call.instance_id, call.deadline, call.headers)
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()
            return
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[_Message] = asyncio.Queue()

        def sink(message: _Message) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, message)
            except RuntimeError:
                pass  # the caller's loop is closed: the reader is gone

        flow, fut = self._bridge(call, sink)
        try:
            unacked = 0
            while True:
                kind, value = await inbox.get()
                if kind == _ITEM:
                    unacked += 1
                    if unacked >= _WINDOW // 2:
                        self._io.call_soon(_acker(flow, unacked))
                        unacked = 0
                    yield value
                elif kind == _END:
                    return
                else:
                    raise value
        finally:
            fut.cancel()  # no-op once finished; otherwise cancels the request on the I/O loop

    def generate_sync(
        self,
        request: Any,
        *,
        instance_id: str | None = None,
        deadline: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Iterator[Any]:
        """Blocking :meth:`generate` for scripts and threads; never call it from an event loop.

        Closing the iterator early (``break``, ``close()``) cancels the request.

        Raises:
            TroupeError: called from a thread running an event loop.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise TroupeError("generate_sync() called from an event loop; use generate()")
        self._check(instance_id)
        return self._generate_sync(_Call(request, instance_id, deadline, headers))

    def _generate_sync(self, call: _Call) -> Iterator[Any]:
        inbox: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        flow, fut = self._bridge(call, inbox.put)
        try:
            unacked = 0
            while True:
                kind, value = inbox.get()
                if kind == _ITEM:
                    unacked += 1
                    if unacked >= _WINDOW // 2:
                        self._io.call_soon(_acker(flow, unacked))
                        unacked = 0
                    yield value
                elif kind == _END:
                    return
                else:
                    raise value
        finally:
            fut.cancel()

    def close(self, timeout: float = 5.0) -> None:
        """Cancel bridged requests in flight and stop the actors this router owns."""
        with self._lock:
            bridged = list(self._bridged)
        for fut in bridged:
            fut.cancel()
        for ref in self._owned:
            ref.stop(timeout=timeout)

    # --- internals -----------------------------------------------------------------------------

    def _check(self, instance_id: str | None) -> None:
        """Fail at once, on the caller's thread, when nothing can be routed to."""
        snapshot = self._holder.current
        if instance_id is not None:
            if instance_id not in snapshot.by_id:
                raise self._not_found(snapshot, instance_id)
        elif not snapshot.instances:
            raise self._no_instances(snapshot)

    def _no_instances(self, snapshot: RouterSnapshot) -> NoInstances:
        """The error for "nothing to route to": incompatible instances, if any, are named."""
        if snapshot.incompatible and not snapshot.instances:
            return IncompatibleInstances(self.endpoint, snapshot.incompatible, WIRE_VERSION)
        return NoInstances(self.endpoint)

    def _not_found(self, snapshot: RouterSnapshot, instance_id: str) -> NoInstances:
        """The error for a direct request to an instance that is not routable."""
        wire = snapshot.incompatible.get(instance_id)
        if wire is not None:
            return IncompatibleInstances(self.endpoint, {instance_id: wire}, WIRE_VERSION)
        return InstanceNotFound(self.endpoint, instance_id)

    def _bridge(self, call: _Call, sink: _Sink) -> tuple[_Flow, concurrent.futures.Future[None]]:
        flow = _Flow()
        fut = self._io.submit(self._pump(call, sink, flow))
        with self._lock:
            self._bridged.add(fut)

        def done(fut: concurrent.futures.Future[None]) -> None:
            with self._lock:
                self._bridged.discard(fut)
            _finish(sink, fut)

        fut.add_done_callback(done)
        return flow, fut

    async def _pump(self, call: _Call, sink: _Sink, flow: _Flow) -> None:
        """On the I/O loop: run the request and push its chunks to a reader elsewhere."""
        task = asyncio.current_task()
        if task is not None:
            task.set_name(f"Router-{self.endpoint}-bridge")
        flow.room = asyncio.Event()
        chunks = self._run(call.request, call.instance_id, call.deadline, call.headers)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                sink((_ITEM, chunk))
                flow.sent += 1
                if flow.sent - flow.acked >= _WINDOW:
                    flow.room.clear()
                    await flow.room.wait()

    def _pick(
        self,
        instance_id: str | None,
        retry: _Retry | None,
        request: Any = None,
        headers: Mapping[str, str] | None = None,
        resuming: bool = False,
    ) -> RoutedInstance:
        """The instance for the next attempt. ``resuming``: only resumable instances (a stream
        that delivered chunks moves on without a resume hook)."""
        snapshot = self._holder.current
        down = self._down
        if instance_id is None and retry is None and not down:
            candidates = snapshot.available
            if candidates:
                return self._policy.choose(candidates, self._inflight, request, headers)
        if instance_id is not None:
            target = snapshot.by_id.get(instance_id)
            if target is None:
                raise self._not_found(snapshot, instance_id)
            return target
        excluded = retry.tried if retry is not None else set()
        if resuming:
            return self._pick_resumable(snapshot, excluded, request, headers)
        candidates = snapshot.available
        if down:
            candidates = self._without_down(snapshot, candidates)
        if excluded:
            candidates = tuple(i for i in candidates if i.instance_id not in excluded)
        if not candidates:
            # Everything is set aside (or was tried): trying one beats failing outright.
            candidates = tuple(i for i in snapshot.instances if i.instance_id not in excluded)
            if not candidates:
                raise self._no_instances(snapshot)
        return self._policy.choose(candidates, self._inflight, request, headers)

    def _without_down(
        self, snapshot: RouterSnapshot, candidates: tuple[RoutedInstance, ...]
    ) -> tuple[RoutedInstance, ...]:
        """``candidates`` less the instances this handle saw fail and the actor has not set
        aside yet (its snapshot follows a mailbox hop later; under load, requests picked in
        between would go to the dead instance too). Forgets those the snapshot now covers."""
        down = self._down
        now = time.monotonic()
        for key, until in list(down.items()):
            if until <= now or key in snapshot.set_aside or key not in snapshot.by_id:
                del down[key]
        if not down:
            return candidates
        return tuple(i for i in candidates if i.instance_id not in down)

    def _pick_resumable(
        self,
        snapshot: RouterSnapshot,
        tried: set[str],
        request: Any,
        headers: Mapping[str, str] | None,
    ) -> RoutedInstance:
        candidates = tuple(
            i for i in snapshot.available if i.instance_id not in tried and i.record.resumable
        )
        if not candidates:
            candidates = tuple(
                i for i in snapshot.instances if i.instance_id not in tried and i.record.resumable
            )
        if not candidates:
            raise self._no_instances(snapshot)
        return self._policy.choose(candidates, self._inflight, request, headers)

    def _can_move(
        self, tried: set[str], resuming: bool, snapshot: RouterSnapshot | None = None
    ) -> bool:
        """Whether an untried instance is left (a resumable one when ``resuming``)."""
        if snapshot is None:
            snapshot = self._holder.current
        return any(
            i.instance_id not in tried and (not resuming or i.record.resumable)
            for i in snapshot.instances
        )

    async def _move(
        self, exc: TroupeError, target: RoutedInstance, tried: set[str], received: int
    ) -> None:
        """Return when an instance is left to take over the failed request (waiting up to
        ``retries.replacement_wait`` for one to register); raise ``exc`` (or
        :class:`StreamNotResumable`) otherwise."""
        resuming = received > 0 and self._resume is None
        wait = self.retries.replacement_wait
        if wait and not self._can_move(tried, resuming):
            _log.info("waiting for a replacement instance", endpoint=self.endpoint, seconds=wait)
            await self.wait_for_snapshot(lambda s: self._can_move(tried, resuming, s), wait)
        if not self._can_move(tried, resuming):
            if resuming and self._can_move(tried, False):
                raise StreamNotResumable(
                    self.endpoint, received, str(exc), address=target.address
                ) from exc
            raise exc
        _log.info(
            "migrating request",
            endpoint=self.endpoint,
            failed=target.instance_id,
            received=received,
            error=str(exc),
        )
        if self._observer is not None:
            self._observer.migrated(self.endpoint)

    async def _retry_refused(self, exc: Overloaded, retry: _Retry, resuming: bool) -> None:
        """After an ``Overloaded`` answer: return when another attempt may go (after a pause
        when every instance refused); raise ``exc`` when the tries are spent."""
        retries = self.retries
        limit = retries.overload_tries
        if limit is not None and retry.refusals >= limit:
            raise exc
        if not self._can_move(retry.tried, resuming):
            if limit is None:
                raise exc  # each instance once
            # Every instance refused: a new round over them, after a pause.
            retry.tried.difference_update(retry.refused)
            retry.refused.clear()
            if not self._can_move(retry.tried, resuming):
                raise exc  # the others failed outright
            retry.rounds += 1
            await asyncio.sleep(retries.pause(retry.rounds, self._rng))
        _log.debug("instance overloaded; trying another", endpoint=self.endpoint)
        if self._observer is not None:
            self._observer.retried(self.endpoint)

    def _resent(
        self, request: Any, payload: bytes, held: list[Any] | None, received: int
    ) -> tuple[Any, bytes, int]:
        """The request of the next attempt, its payload and the ``received`` count its
        handler is told: the ``resume`` hook's request (the handler starts afresh), or the
        same request with the count of chunks to skip."""
        if received and self._resume is not None:
            assert held is not None
            rewritten = self._resume(request, list(held))
            return rewritten, encode_payload(rewritten), 0
        return request, payload, received

    def _set_aside(self, instance_id: str) -> None:
        self._down[instance_id] = time.monotonic() + self._set_aside_for
        try:
            self._actor.tell(SetAside(instance_id))
        except ActorDead:
            pass  # the router actor is stopping; there is no table to update any more

    async def _run(
        self,
        request: Any,
        instance_id: str | None,
        deadline: float | None,
        headers: dict[str, str] | None,
    ) -> AsyncGenerator[Any, None]:
        """On the I/O loop: choose, send, stream; skip instances that answer ``Overloaded``
        before any chunk (as :attr:`retries` allows); migrate on instance failures, continuing
        (never repeating) a stream that already delivered chunks."""
        payload: bytes | None = None
        retry: _Retry | None = None  # created on the first failure: most requests never fail
        attempt = 0
        received = 0  # chunks yielded to the caller, over every attempt
        hook = self._resume is not None
        held: list[Any] | None = [] if hook and self.migration_limit else None
        sent_received = 0  # what the current attempt's handler is told it may skip
        current = request  # what this attempt sends: the resume hook's rewrite after a move
        inflight = self._inflight
        while True:
            target = self._pick(instance_id, retry, current, headers, received > 0 and not hook)
            if payload is None:
                payload = encode_payload(request)
            key = target.instance_id
            inflight[key] = inflight.get(key, 0) + 1
            before = received
            try:
                try:
                    stream = await self._network.client_for(target.address).request(
                        target.address,
                        self.endpoint,
                        payload,
                        deadline=deadline,
                        headers=headers,
                        attempt=attempt,
                        received=sent_received,
                    )
                    try:
                        async for chunk in stream:
                            value = decode_payload(chunk)
                            received += 1
                            if held is not None:
                                held.append(value)
                            yield value
                    finally:
                        stream.close()
                    return
                except Overloaded as exc:
                    # Refused at admission (full, or draining): nothing was generated there.
                    if received != before or instance_id is not None:
                        raise
                    retry = _Retry.after(retry, key, refused=True)
                    await self._retry_refused(exc, retry, received > 0 and not hook)
                except MIGRATABLE as exc:
                    self._set_aside(key)
                    retry = _Retry.after(retry, key)
                    if instance_id is not None or attempt >= self.migration_limit:
                        raise
                    await self._move(exc, target, retry.tried, received)
                    attempt += 1
                    current, payload, sent_received = self._resent(request, payload, held, received)
            finally:
                left = inflight[key] - 1
                if left:
                    inflight[key] = left
                else:
                    del inflight[key]


class _Retry:
    """What one request's failed attempts left: the instances it tried, those that refused it
    in this round, and how often it was refused."""

    __slots__ = ("refusals", "refused", "rounds", "tried")

    def __init__(self) -> None:
        self.tried: set[str] = set()
        self.refused: set[str] = set()
        self.refusals = 0
        self.rounds = 0

    @staticmethod
    def after(retry: _Retry | None, key: str, *, refused: bool = False) -> _Retry:
        """``retry`` (created if ``None``) with ``key`` tried (and counted as a refusal)."""
        if retry is None:
            retry = _Retry()
        retry.tried.add(key)
        if refused:
            retry.refused.add(key)
            retry.refusals += 1
        return retry


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _acker(flow: _Flow, count: int) -> Callable[[], None]:
    return lambda: flow.ack(count)


# --- wiring ------------------------------------------------------------------------------------


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
