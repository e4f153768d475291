"""OTP-style supervision: restart strategies, restart types, intensity and backoff.

A :class:`Supervisor` is an actor that starts its children in order, monitors them, and when one
stops decides, from the child's restart type and the supervisor's strategy, which children to
restart. Too many restarts within a window means the problem is not local: the supervisor stops
its children in reverse start order and crashes with
:class:`~troupe.errors.SupervisorEscalation`, so that *its* supervisor can act. Supervisors nest
into trees by being each other's children.

A child whose *first* start fails with :class:`~troupe.errors.StartFailed` is not restarted: the
cause is in the configuration or the environment, and would fail every restart the same way. For
a child given at construction the supervisor stops its other children and crashes with that
error (as OTP's ``start_link`` fails when a child's ``init`` does); a child added later with
:class:`StartChild` is only forgotten. A restart that fails to start counts as one more restart.

Time (the intensity window, backoff delays) comes from the actor system's injected clock.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from troupe._support._clock import TimerHandle
from troupe._support._logging import get_logger
from troupe.actors._actor import Actor, ActorRef, Down, ExitReason, MonitorRef
from troupe.errors import ActorError, ConfigError, StartFailed, SupervisorEscalation

__all__ = [
    "Backoff",
    "ChildInfo",
    "ChildSpec",
    "Intensity",
    "RestartType",
    "StartChild",
    "Strategy",
    "Supervisor",
    "TerminateChild",
    "WhichChildren",
]

RestartType = Literal["permanent", "transient", "temporary"]
"""``permanent``: always restarted; ``transient``: restarted only after a crash;
``temporary``: never restarted (and forgotten once it stops)."""

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
"""Which children restart when one stops: only it; all of them; it and those started after it."""

_STRATEGIES: tuple[str, ...] = ("one_for_one", "one_for_all", "rest_for_one")
_RESTART_TYPES: tuple[str, ...] = ("permanent", "transient", "temporary")

_log = get_logger("troupe.actors.supervisor")


@dataclass(frozen=True, slots=True)
class Intensity:
    """At most ``max_restarts`` restarts within ``within`` seconds, else escalate."""

    max_restarts: int = 3
    within: float = 5.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ConfigError("max_restarts", self.max_restarts, "an integer >= 0")
        if self.within <= 0:
            raise ConfigError("within", self.within, "seconds > 0")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before a restart: ``min * 2**(n-1)`` capped at ``max`` for the n-th recent restart
    of the same child, stretched by up to ``jitter`` (a fraction) at random. ``min=0`` restarts
    at once."""

    min: float = 0.0
    max: float = 5.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.min < 0 or self.max < self.min:
            raise ConfigError("backoff", (self.min, self.max), "0 <= min <= max")
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigError("backoff.jitter", self.jitter, "a fraction between 0 and 1")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The delay before restart number ``attempt`` (1-based) of a child."""
        if self.min <= 0.0 or attempt <= 0:
            return 0.0
        base = min(self.max, self.min * 2.0 ** (attempt - 1))
        return min(self.max, base * (1.0 + self.jitter * rng.random()))


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How to start one child, and when to restart it.

    Attributes:
        id: unique among the supervisor's children.
        start: builds a fresh actor (usually the actor class, or a ``functools.partial`` of it).
        restart: ``permanent`` / ``transient`` / ``temporary``.
        shutdown_timeout: how long to wait for the child to stop when the supervisor stops it.
    """

    id: str
    start: Callable[[], Actor[Any]]
    restart: RestartType = "permanent"
    shutdown_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.restart not in _RESTART_TYPES:
            raise ConfigError("restart", self.restart, choices=_RESTART_TYPES)


class ChildInfo(msgspec.Struct, frozen=True):
    """One row of :class:`WhichChildren`'s answer; ``ref`` is None while (re)starting."""

    id: str
    ref: ActorRef[Any] | None
    restart: RestartType
    restarts: int


class WhichChildren(msgspec.Struct, frozen=True, tag=True):
    """Ask: the children in start order, as a list of :class:`ChildInfo`."""


class StartChild(msgspec.Struct, frozen=True, tag=True):
    """Ask: add and start a child at the end of the start order; answers its ref."""

    spec: ChildSpec


class TerminateChild(msgspec.Struct, frozen=True, tag=True):
    """Ask: stop a child and forget it (it is not restarted); answers whether it existed."""

    id: str


class _RestartDue(msgspec.Struct, frozen=True, tag=True):
    generation: int


SupervisorMessage = WhichChildren | StartChild | TerminateChild | _RestartDue


@dataclass(slots=True, eq=False)
class _Child:
    spec: ChildSpec
    ref: ActorRef[Any] | None = None
    monitor: MonitorRef | None = None
    restarts: int = 0
    recent: list[float] = field(default_factory=list)
    added: bool = False  # by StartChild, after the supervisor started


class Supervisor(Actor[SupervisorMessage]):
    """Starts children in order, watches them, restarts them per its strategy.

    Args:
        children: child specs, started in this order when the supervisor starts.
        strategy: ``one_for_one`` (default), ``one_for_all`` or ``rest_for_one``.
        intensity: restart limit; when exceeded the supervisor escalates.
        backoff: delay before restarts.
        rng: random source for jitter (inject a seeded one for deterministic tests).
        stop_together: stop children all at once instead of one after the other in reverse
            start order, for independent children whose stops take time (worker processes
            draining); each still gets its ``shutdown_timeout``.
    """

    def __init__(
        self,
        children: Sequence[ChildSpec] = (),
        *,
        strategy: Strategy = "one_for_one",
        intensity: Intensity | None = None,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        stop_together: bool = False,
    ) -> None:
        super().__init__()
        if strategy not in _STRATEGIES:
            raise ConfigError("strategy", strategy, choices=_STRATEGIES)
        ids = [c.id for c in children]
        if len(set(ids)) != len(ids):
            raise ConfigError("children", ids, "unique child ids")
        self._strategy = strategy
        self._intensity = intensity or Intensity()
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._stop_together = stop_together
        self._children = [_Child(spec) for spec in children]
        self._restart_log: list[float] = []
        self._generation = 0
        self._timer: TimerHandle | None = None
        self._waiting: list[_Child] = []

    # --- lifecycle -----------------------------------------------------------------------------

    def started(self) -> None:
        for child in self._children:
            self._start(child)

    def stopped(self, reason: ExitReason, error: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._stop_children(self._children)

    # --- messages ------------------------------------------------------------------------------

    def receive(self, message: SupervisorMessage) -> Any:
        match message:
            case WhichChildren():
                return [
                    ChildInfo(c.spec.id, c.ref, c.spec.restart, c.restarts) for c in self._children
                ]
            case StartChild(spec=spec):
                if any(c.spec.id == spec.id for c in self._children):
                    # A bad request is the asker's problem, not a reason for us to crash.
                    self.defer().fail(ConfigError("child id", spec.id, "an id not already in use"))
                    return None
                child = _Child(spec, added=True)
                self._children.append(child)
                self._start(child)
                return child.ref
            case TerminateChild(id=child_id):
                for child in self._children:
                    if child.spec.id == child_id:
                        self._stop_children([child])
                        self._children.remove(child)
                        self._waiting = [c for c in self._waiting if c is not child]
                        return True
                return False
            case _RestartDue(generation=generation):
                if generation == self._generation:
                    self._restart_waiting()
                return None

    def on_down(self, down: Down) -> None:
        child = next((c for c in self._children if c.ref == down.ref), None)
        if child is None:
            return  # a child we stopped on purpose, or already forgotten
        child.ref = None
        child.monitor = None
        self._child_exited(child, down.reason, down.error)

    # --- the decision --------------------------------------------------------------------------

    def _child_exited(self, child: _Child, reason: ExitReason, error: BaseException | None) -> None:
        if isinstance(error, StartFailed) and child.restarts == 0:
            if child.added:
                _log.warning(
                    "child failed to start, forgotten",
                    supervisor=self.name,
                    child=child.spec.id,
                    error=str(error),
                )
                self._children.remove(child)
            else:
                self._give_up(child, error)
            return
        restart = child.spec.restart
        if restart == "temporary" or (restart == "transient" and reason == "normal"):
            _log.info(
                "child exited, not restarted",
                supervisor=self.name,
                child=child.spec.id,
                reason=reason,
            )
            if restart == "temporary":
                self._children.remove(child)
            return
        _log.warning(
            "child exited, restarting",
            supervisor=self.name,
            child=child.spec.id,
            reason=reason,
            error=repr(error) if error else None,
            strategy=self._strategy,
        )
        now = self.system.clock.now()
        self._restart_log = [t for t in self._restart_log if now - t < self._intensity.within]
        self._restart_log.append(now)
        if len(self._restart_log) > self._intensity.max_restarts:
            self._escalate(error)
            return
        child.recent = [t for t in child.recent if now - t < self._intensity.within]
        child.recent.append(now)

        index = self._children.index(child)
        if self._strategy == "one_for_one":
            group = [child]
        elif self._strategy == "one_for_all":
            group = list(self._children)
        else:
            group = self._children[index:]
        self._stop_children([c for c in group if c is not child])

        waiting = set(map(id, self._waiting)) | set(map(id, group))
        self._waiting = [c for c in self._children if id(c) in waiting]
        self._generation += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        delay = self._backoff.delay(len(child.recent), self._rng)
        if delay > 0.0:
            self._timer = self.send_after(delay, _RestartDue(self._generation))
        else:
            self._restart_waiting()

    def _escalate(self, last: BaseException | None) -> None:
        _log.error(
            "restart intensity exceeded, escalating",
            supervisor=self.name,
            max_restarts=self._intensity.max_restarts,
            within=self._intensity.within,
            last=str(last) if last is not None else None,
        )
        self._stop_children(self._children)
        escalation = SupervisorEscalation(
            self.name, self._intensity.max_restarts, self._intensity.within
        )
        escalation.__cause__ = last  # the child's error that was one restart too many
        self._crash_quietly(escalation)

    def _give_up(self, child: _Child, error: StartFailed) -> None:
        """A child's first start failed: stop the others and stop with its error."""
        _log.debug("child failed to start, stopping", supervisor=self.name, child=child.spec.id)
        self._stop_children(self._children)
        self._crash_quietly(error)

    def _crash_quietly(self, error: ActorError) -> None:
        """Crash with ``error`` as the exit reason, without the generic crash log's traceback:
        the failure is expected, described by ``error`` and logged above."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting = []
        self._exit = ("error", error)
        self._stop()

    def _restart_waiting(self) -> None:
        self._timer = None
        waiting, self._waiting = self._waiting, []
        for child in waiting:
            if child in self._children and child.ref is None:
                child.restarts += 1
                self._start(child)

    # --- children ------------------------------------------------------------------------------

    def _start(self, child: _Child) -> None:
        ref = self.system.spawn(
            child.spec.start, name=f"{self.name}/{child.spec.id}", parent=self.ref
        )
        child.ref = ref
        child.monitor = self.monitor(ref)

    def _stop_children(self, children: Sequence[_Child]) -> None:
        """Stop the given children in reverse start order (or all at once, with
        ``stop_together``), without triggering restarts."""
        stopping: list[tuple[_Child, ActorRef[Any]]] = []
        for child in reversed(children):
            ref, mon = child.ref, child.monitor
            child.ref = None
            child.monitor = None
            if mon is not None:
                self.demonitor(mon)
            if ref is None:
                continue
            if self._stop_together:
                ref.stop(timeout=0)  # asks it to stop; joined below
                stopping.append((child, ref))
            elif not ref.stop(timeout=child.spec.shutdown_timeout):
                self._late(child)
        started = time.monotonic()  # real time: these are thread joins, not restart policy
        for child, ref in stopping:
            left = child.spec.shutdown_timeout - (time.monotonic() - started)
            if not ref.join(max(0.0, left)):
                self._late(child)

    def _late(self, child: _Child) -> None:
        _log.error(
            "child did not stop in time",
            supervisor=self.name,
            child=child.spec.id,
            timeout=child.spec.shutdown_timeout,
        )
