"""Supervision as in OTP: strategies, restart types, intensity escalation, backoff, trees.

Time is a VirtualClock: backoff delays and the intensity window move only when the test says so.
"""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from troupe._support._clock import VirtualClock
from troupe.actors import (
    Actor,
    ActorRef,
    ActorSystem,
    Backoff,
    ChildInfo,
    ChildSpec,
    Down,
    Intensity,
    StartChild,
    Supervisor,
    TerminateChild,
    WhichChildren,
)
from troupe.errors import ActorDead, ConfigError, StartFailed, SupervisorEscalation
from troupe.testing._wait import eventually


class Ping(msgspec.Struct, frozen=True, tag=True):
    pass


class Crash(msgspec.Struct, frozen=True, tag=True):
    pass


class Quit(msgspec.Struct, frozen=True, tag=True):
    pass


ChildMsg = Ping | Crash | Quit


class Child(Actor[ChildMsg]):
    def __init__(self, log: list[tuple[str, str]], label: str) -> None:
        super().__init__()
        self.log = log
        self.label = label

    def started(self) -> None:
        self.log.append(("start", self.label))

    def stopped(self, reason: Any, error: BaseException | None) -> None:
        self.log.append(("stop", self.label))

    def receive(self, message: ChildMsg) -> Any:
        match message:
            case Ping():
                return self.label
            case Crash():
                raise RuntimeError(f"{self.label} crashed")
            case Quit():
                self.stop_self()
        return None


class Flaky(Child):
    """A child whose n-th start fails with StartFailed when ``plan[n]`` is True."""

    def __init__(self, log: list[tuple[str, str]], label: str, plan: list[bool]) -> None:
        super().__init__(log, label)
        self.plan = plan

    def started(self) -> None:
        super().started()
        if self.plan and self.plan.pop(0):
            raise StartFailed(self.label, "port 1 in use")


def spec(log: list[tuple[str, str]], label: str, restart: Any = "permanent") -> ChildSpec:
    return ChildSpec(label, functools.partial(Child, log, label), restart=restart)


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def system(clock: VirtualClock) -> Iterator[ActorSystem]:
    sys_ = ActorSystem("sup-test", clock=clock)
    yield sys_
    sys_.shutdown()


def children(sup: ActorRef[Any]) -> list[ChildInfo]:
    result: list[ChildInfo] = sup.ask(WhichChildren())
    return result


def refs(sup: ActorRef[Any]) -> dict[str, ActorRef[Any] | None]:
    return {c.id: c.ref for c in children(sup)}


def all_running(sup: ActorRef[Any]) -> dict[str, ActorRef[Any]] | None:
    current = refs(sup)
    if all(r is not None and r.is_alive() for r in current.values()):
        return {k: v for k, v in current.items() if v is not None}
    return None


def start(system: ActorSystem, specs: list[ChildSpec], **kwargs: Any) -> ActorRef[Any]:
    return system.spawn(lambda: Supervisor(specs, **kwargs), name="sup")


def test_children_start_in_order_and_stop_in_reverse(system: ActorSystem) -> None:
    log: list[tuple[str, str]] = []
    sup = start(system, [spec(log, "a"), spec(log, "b"), spec(log, "c")])
    running = eventually(lambda: all_running(sup))
    assert [r.ask(Ping()) for r in running.values()] == ["a", "b", "c"]
    sup.stop()
    assert [e for e in log if e[0] == "start"] == [("start", "a"), ("start", "b"), ("start", "c")]
    assert [e for e in log if e[0] == "stop"] == [("stop", "c"), ("stop", "b"), ("stop", "a")]
    assert all(not r.is_alive() for r in running.values())


def test_one_for_one_restarts_only_the_crashed_child(system: ActorSystem) -> None:
    log: list[tuple[str, str]] = []
    sup = start(system, [spec(log, "a"), spec(log, "b")], strategy="one_for_one")
    before = eventually(lambda: all_running(sup))
    before["a"].tell(Crash())
    after = eventually(lambda: (r := all_running(sup)) and r["a"] != before["a"] and r)
    assert after["b"] == before["b"]
    assert after["a"].ask(Ping()) == "a"
    assert {c.id: c.restarts for c in children(sup)} == {"a": 1, "b": 0}


def test_one_for_all_restarts_every_child_stopping_others_in_reverse(system: ActorSystem) -> None:
    log: list[tuple[str, str]] = []
    sup = start(system, [spec(log, "a"), spec(log, "b"), spec(log, "c")], strategy="one_for_all")
    before = eventually(lambda: all_running(sup))
    log.clear()
    before["a"].tell(Crash())
    after = eventually(lambda: (r := all_running(sup)) and all(r[k] != before[k] for k in r) and r)
    assert set(after) == {"a", "b", "c"}
    stops = [label for kind, label in log if kind == "stop"]
    assert stops == ["a", "c", "b"]  # the crashed one first, then the others in reverse order
    starts = [label for kind, label in log if kind == "start"]
    assert starts == ["a", "b", "c"]


def test_rest_for_one_restarts_the_child_and_those_after_it(system: ActorSystem) -> None:
    log: list[tuple[str, str]] = []
    sup = start(system, [spec(log, "a"), spec(log, "b"), spec(log, "c")], strategy="rest_for_one")
    before = eventually(lambda: all_running(sup))
    before["b"].tell(Crash())
    after = eventually(
        lambda: (r := all_running(sup)) and r["b"] != before["b"] and r["c"] != before["c"] and r
    )
    assert after["a"] == before["a"]


@pytest.mark.parametrize(
    ("restart", "on_crash", "on_normal"),
    [
        ("permanent", True, True),
        ("transient", True, False),
        ("temporary", False, False),
    ],
)
def test_restart_types(system: ActorSystem, restart: Any, on_crash: bool, on_normal: bool) -> None:
    log: list[tuple[str, str]] = []
    for how, expected in ((Crash(), on_crash), (Quit(), on_normal)):
        sup = start(system, [spec(log, "x", restart), spec(log, "keep")])
        first = eventually(lambda: all_running(sup))["x"]  # noqa: B023
        first.tell(how)
        eventually(lambda: not first.is_alive())  # noqa: B023
        if expected:
            eventually(lambda: (r := refs(sup).get("x")) is not None and r != first)  # noqa: B023
        else:
            # Wait until the supervisor has handled the Down: a ping through it is ordered after.
            eventually(lambda: refs(sup).get("x") is None)  # noqa: B023
            if restart == "temporary":
                assert "x" not in refs(sup)
        sup.stop()


def test_intensity_exceeded_stops_children_in_reverse_and_escalates(
    system: ActorSystem, clock: VirtualClock
) -> None:
    log: list[tuple[str, str]] = []
    downs: list[Down] = []
    died = threading.Event()
    sup = start(
        system,
        [spec(log, "a"), spec(log, "b"), spec(log, "c")],
        intensity=Intensity(max_restarts=2, within=10.0),
    )
    system.watch(sup, lambda d: (downs.append(d), died.set()))
    for n in range(2):
        current = eventually(lambda: all_running(sup))
        current["b"].tell(Crash())
        eventually(lambda: children(sup)[1].restarts == n + 1)  # noqa: B023
        clock.advance(1.0)
    current = eventually(lambda: all_running(sup))
    log.clear()
    current["b"].tell(Crash())  # the third restart within 10 s: too many
    assert died.wait(5)
    assert downs[0].reason == "error"
    assert isinstance(downs[0].error, SupervisorEscalation)
    assert str(downs[0].error.__cause__) == "b crashed"  # the crash that was one too many
    assert [label for kind, label in log if kind == "stop"] == ["b", "c", "a"]
    assert all(not r.is_alive() for r in current.values())
    with pytest.raises(ActorDead):
        sup.ask(WhichChildren())


def test_restarts_outside_the_window_do_not_accumulate(
    system: ActorSystem, clock: VirtualClock
) -> None:
    log: list[tuple[str, str]] = []
    sup = start(system, [spec(log, "a")], intensity=Intensity(max_restarts=1, within=5.0))
    for n in range(4):
        current = eventually(lambda: all_running(sup))
        current["a"].tell(Crash())
        eventually(lambda: children(sup)[0].restarts == n + 1)  # noqa: B023
        clock.advance(6.0)  # each restart falls out of the window before the next crash
    assert sup.is_alive()


def test_backoff_delays_restarts_on_the_injected_clock(
    system: ActorSystem, clock: VirtualClock
) -> None:
    log: list[tuple[str, str]] = []
    sup = start(
        system,
        [spec(log, "a")],
        backoff=Backoff(min=1.0, max=3.0),
        intensity=Intensity(max_restarts=10, within=100.0),
    )
    expected_delays = [1.0, 2.0, 3.0, 3.0]  # doubling, capped at max
    for n, delay in enumerate(expected_delays):
        current = eventually(lambda: all_running(sup))
        current["a"].tell(Crash())
        eventually(lambda: len(clock.pending()) == 1)
        assert clock.pending() == [pytest.approx(clock.now() + delay)]
        clock.advance(delay * 0.99)
        assert refs(sup)["a"] is None  # not yet restarted
        clock.advance(delay * 0.02)
        eventually(lambda: children(sup)[0].restarts == n + 1)  # noqa: B023


def test_backoff_jitter_stays_within_bounds() -> None:
    rng = random.Random(7)
    backoff = Backoff(min=1.0, max=10.0, jitter=0.5)
    delays = [backoff.delay(2, rng) for _ in range(200)]
    assert all(2.0 <= d <= 3.0 for d in delays)
    assert len({round(d, 6) for d in delays}) > 100
    assert Backoff().delay(3, rng) == 0.0


def test_nested_supervisors_escalation_is_handled_by_the_parent(system: ActorSystem) -> None:
    log: list[tuple[str, str]] = []
    inner_specs = [spec(log, "leaf")]
    inner = ChildSpec(
        "inner",
        lambda: Supervisor(inner_specs, intensity=Intensity(max_restarts=0, within=10.0)),
    )
    top = start(system, [inner, spec(log, "sibling")], intensity=Intensity(5, 10.0))
    first = eventually(lambda: all_running(top))
    leaf = eventually(lambda: all_running(first["inner"]))["leaf"]
    leaf.tell(Crash())  # inner allows 0 restarts: it escalates; top restarts it (one_for_one)
    new = eventually(lambda: (r := all_running(top)) and r["inner"] != first["inner"] and r)
    assert new["sibling"] == first["sibling"]
    new_leaf = eventually(lambda: all_running(new["inner"]))["leaf"]
    assert new_leaf != leaf
    assert new_leaf.ask(Ping()) == "leaf"


def test_dynamic_children(system: ActorSystem) -> None:
    log: list[tuple[str, str]] = []
    sup = start(system, [spec(log, "a")])
    ref = sup.ask(StartChild(spec(log, "b")))
    assert ref.ask(Ping()) == "b"
    assert [c.id for c in children(sup)] == ["a", "b"]
    assert sup.ask(TerminateChild("a")) is True
    assert sup.ask(TerminateChild("nope")) is False
    assert [c.id for c in children(sup)] == ["b"]
    with pytest.raises(ConfigError):  # a duplicate id is refused; the supervisor carries on
        sup.ask(StartChild(spec(log, "b")))
    assert [c.id for c in children(sup)] == ["b"]


def test_a_child_whose_first_start_fails_is_not_restarted_the_supervisor_gives_up(
    system: ActorSystem,
) -> None:
    log: list[tuple[str, str]] = []
    downs: list[Down] = []
    died = threading.Event()
    flaky = ChildSpec("b", functools.partial(Flaky, log, "b", [True]))
    sup = start(
        system,
        [spec(log, "a"), flaky, spec(log, "c")],
        intensity=Intensity(max_restarts=10, within=10.0),
    )
    system.watch(sup, lambda d: (downs.append(d), died.set()))
    assert died.wait(5)
    assert isinstance(downs[0].error, StartFailed)  # the child's own error, not an escalation
    assert downs[0].error.detail == "port 1 in use"
    assert log.count(("start", "b")) == 1  # never restarted
    assert {label for kind, label in log if kind == "stop"} >= {"a", "c"}


def test_a_restart_that_fails_to_start_counts_as_a_restart(system: ActorSystem) -> None:
    log: list[tuple[str, str]] = []
    flaky = ChildSpec("b", functools.partial(Flaky, log, "b", [False, True, False]))
    sup = start(system, [spec(log, "a"), flaky], intensity=Intensity(5, 10.0))
    first = eventually(lambda: all_running(sup))
    first["b"].tell(Crash())  # restart 1 fails to start; restart 2 serves
    eventually(lambda: (r := all_running(sup)) and children(sup)[1].restarts == 2 and r)
    assert sup.is_alive()
    assert log.count(("start", "b")) == 3


def test_a_dynamic_child_that_fails_to_start_is_forgotten(system: ActorSystem) -> None:
    log: list[tuple[str, str]] = []
    sup = start(system, [spec(log, "a")])
    before = eventually(lambda: all_running(sup))
    sup.ask(StartChild(ChildSpec("d", functools.partial(Flaky, log, "d", [True]))))
    eventually(lambda: [c.id for c in children(sup)] == ["a"])
    assert sup.is_alive()
    assert all_running(sup) == before
    assert log.count(("start", "d")) == 1


class Meets(Actor[Ping]):
    """Its stop waits for every sibling's stop to begin: only stops made together finish."""

    def __init__(self, barrier: threading.Barrier, met: list[bool]) -> None:
        super().__init__()
        self.barrier = barrier
        self.met = met

    def stopped(self, reason: Any, error: BaseException | None) -> None:
        try:
            self.barrier.wait(timeout=5)
            self.met.append(True)
        except threading.BrokenBarrierError:
            self.met.append(False)


def test_stop_together_stops_children_at_once(system: ActorSystem) -> None:
    barrier = threading.Barrier(3)
    met: list[bool] = []
    specs = [ChildSpec(f"m{n}", functools.partial(Meets, barrier, met)) for n in range(3)]
    sup = start(system, specs, stop_together=True)
    eventually(lambda: all_running(sup))
    assert sup.stop(timeout=10)
    assert met == [True, True, True]


def test_invalid_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        Supervisor([], strategy="one_for_some")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ChildSpec("x", Child, restart="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Intensity(max_restarts=-1)
    with pytest.raises(ConfigError):
        Backoff(min=2.0, max=1.0)
