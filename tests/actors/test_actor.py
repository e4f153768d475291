"""The actor core: typed refs, ask/tell, ActorDead, asyncio bridge, monitors, timers."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import msgspec
import pytest

from troupe._support._clock import VirtualClock
from troupe._support._ioloop import IOLoop
from troupe.actors import Actor, ActorRef, ActorSystem, Down, Reply
from troupe.errors import ActorDead, AskTimeout, UnexpectedMessage
from troupe.testing._wait import eventually


class Get(msgspec.Struct, frozen=True, tag=True):
    pass


class Add(msgspec.Struct, frozen=True, tag=True):
    n: int


class Boom(msgspec.Struct, frozen=True, tag=True):
    pass


class Block(msgspec.Struct, frozen=True, tag=True):
    release: Any  # threading.Event
    then_crash: bool = False


class Slow(msgspec.Struct, frozen=True, tag=True):
    seconds: float


class Other(msgspec.Struct, frozen=True, tag=True):
    pass


CounterMsg = Get | Add | Boom | Block | Slow


class Counter(Actor[CounterMsg]):
    def __init__(self) -> None:
        super().__init__()
        self.value = 0

    def receive(self, message: CounterMsg) -> Any:
        match message:
            case Add(n=n):
                self.value += n
                return self.value
            case Get():
                return self.value
            case Boom():
                raise RuntimeError("boom")
            case Block(release=release, then_crash=then_crash):
                release.wait(10)
                if then_crash:
                    raise RuntimeError("crashed while blocked")
                return "released"
            case Slow(seconds=seconds):
                time.sleep(seconds)  # simulated work inside the actor, not a test wait
                return "slow done"


@pytest.fixture
def system() -> Any:
    sys_ = ActorSystem("test")
    yield sys_
    sys_.shutdown()


def test_tell_then_ask_returns_reply(system: ActorSystem) -> None:
    ref = system.spawn(Counter)
    ref.tell(Add(2))
    ref.tell(Add(3))
    assert ref.ask(Get()) == 5


def test_message_outside_the_union_is_rejected_before_the_mailbox(system: ActorSystem) -> None:
    ref = system.spawn(Counter)
    with pytest.raises(UnexpectedMessage) as info:
        ref.tell(Other())  # type: ignore[arg-type]
    assert "Other" in str(info.value)
    assert "Add" in info.value.accepted
    with pytest.raises(TypeError):
        ref.ask("not a struct")  # type: ignore[arg-type]
    assert ref.ask(Get()) == 0  # the actor is unharmed


def test_union_members_must_be_msgspec_structs() -> None:
    with pytest.raises(TypeError, match=r"not a msgspec\.Struct"):

        class Bad(Actor[int]):  # type: ignore[type-var]
            pass


def test_ask_to_stopped_actor_fails_at_once(system: ActorSystem) -> None:
    ref = system.spawn(Counter)
    assert ref.stop()
    start = time.monotonic()
    with pytest.raises(ActorDead) as info:
        ref.ask(Get(), timeout=30)
    assert time.monotonic() - start < 1.0
    assert info.value.reason == "normal"
    with pytest.raises(ActorDead):
        ref.tell(Add(1))


def test_ask_pending_when_actor_dies_fails_at_once_not_at_timeout(system: ActorSystem) -> None:
    ref = system.spawn(Counter)
    release = threading.Event()
    ref.tell(Block(release, then_crash=True))
    pending = ref.ask_future(Get())  # queued behind the blocked message
    start = time.monotonic()
    release.set()
    with pytest.raises(ActorDead) as info:
        pending.result(timeout=30)
    assert time.monotonic() - start < 2.0
    assert info.value.reason == "error"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_exception_in_ask_crashes_the_actor_and_fails_the_asker(system: ActorSystem) -> None:
    ref = system.spawn(Counter)
    with pytest.raises(ActorDead) as info:
        ref.ask(Boom(), timeout=30)
    assert str(info.value.__cause__) == "boom"
    assert eventually(lambda: not ref.is_alive())
    assert ref.exit_reason == "error"


def test_ask_timeout_leaves_actor_alive(system: ActorSystem) -> None:
    ref = system.spawn(Counter)
    release = threading.Event()
    ref.tell(Block(release))
    with pytest.raises(AskTimeout) as info:
        ref.ask(Get(), timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    release.set()
    assert ref.ask(Get()) == 0


async def test_ask_async_does_not_block_the_event_loop(system: ActorSystem) -> None:
    ref = system.spawn(Counter)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    assert await ref.ask_async(Slow(0.3), timeout=10) == "slow done"
    during = ticks - before
    stop.set()
    await task
    assert during >= 10, f"the loop ticked only {during} times during a 300 ms actor call"


async def test_ask_async_dead_and_timeout(system: ActorSystem) -> None:
    ref = system.spawn(Counter)
    release = threading.Event()
    ref.tell(Block(release))
    with pytest.raises(AskTimeout):
        await ref.ask_async(Get(), timeout=0.05)
    release.set()
    ref.stop()
    with pytest.raises(ActorDead):
        await ref.ask_async(Get(), timeout=30)


class Watcher(Actor[Get]):
    def __init__(self, downs: list[Down], got: threading.Event) -> None:
        super().__init__()
        self.downs = downs
        self.got = got

    def receive(self, message: Get) -> Any:
        return len(self.downs)

    def on_down(self, down: Down) -> None:
        self.downs.append(down)
        self.got.set()


def _watcher(system: ActorSystem) -> tuple[ActorRef[Get], list[Down], threading.Event]:
    downs: list[Down] = []
    got = threading.Event()
    return system.spawn(lambda: Watcher(downs, got)), downs, got


def test_monitor_delivers_down_exactly_once_with_reason(system: ActorSystem) -> None:
    watcher, downs, got = _watcher(system)
    target = system.spawn(Counter)
    system.monitor(target, watcher)
    system.monitor(target, watcher)  # two monitors, two Downs; one per monitor
    target.tell(Boom())
    assert got.wait(5)
    eventually(lambda: watcher.ask(Get()) == 2)
    assert all(d.ref == target and d.reason == "error" for d in downs)
    assert isinstance(downs[0].error, RuntimeError)
    target.stop()  # stopping a dead actor delivers nothing more
    assert watcher.ask(Get()) == 2


def test_monitor_of_dead_actor_delivers_at_once_and_demonitor_silences(
    system: ActorSystem,
) -> None:
    watcher, downs, got = _watcher(system)
    dead = system.spawn(Counter)
    dead.stop()
    system.monitor(dead, watcher)
    assert got.wait(5)
    assert downs[0].reason == "normal"

    other = system.spawn(Counter)
    mon = system.monitor(other, watcher)
    other._cell.remove_monitor(mon)
    other.stop()
    assert watcher.ask(Get()) == 1


class Deferring(Actor[Get | Add]):
    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Reply] = []

    def receive(self, message: Get | Add) -> Any:
        match message:
            case Get():
                self.waiting.append(self.defer())
                return "ignored"
            case Add(n=n):
                for reply in self.waiting:
                    reply.set(n)
                self.waiting.clear()
        return None


def test_deferred_reply_and_death_with_deferred_reply(system: ActorSystem) -> None:
    ref = system.spawn(Deferring)
    fut = ref.ask_future(Get())
    ref.tell(Add(7))
    assert fut.result(5) == 7
    fut2 = ref.ask_future(Get())
    ref.stop()
    with pytest.raises(ActorDead):
        fut2.result(5)


class Timed(Actor[Add | Get]):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def receive(self, message: Add | Get) -> Any:
        match message:
            case Add(n=n):
                self.total += n
            case Get():
                self.send_after(10.0, Add(5))
        return self.total


def test_send_after_uses_the_injected_clock() -> None:
    clock = VirtualClock()
    system = ActorSystem("timed", clock=clock)
    try:
        ref = system.spawn(Timed)
        ref.ask(Get())
        assert clock.pending() == [10.0]
        clock.advance(9.9)
        assert ref.ask(Add(0)) == 0
        clock.advance(0.1)
        eventually(lambda: ref.ask(Add(0)) == 5)
    finally:
        system.shutdown()


class Piping(Actor[Get | Add | Other]):
    result: int | None = None

    def receive(self, message: Get | Add | Other) -> Any:
        match message:
            case Get():
                self.run_io(asyncio.sleep(0.01, result=41), lambda f: Add(f.result() + 1))
            case Add(n=n):
                self.result = n
            case Other():
                return self.result
        return None


def test_run_io_returns_the_outcome_as_a_message() -> None:
    io = IOLoop("test-io")
    io.start()
    system = ActorSystem("io", io_loop=io)
    try:
        ref = system.spawn(Piping)
        ref.tell(Get())
        eventually(lambda: ref.ask(Other()) == 42)
    finally:
        system.shutdown()
        io.stop()


def test_systems_are_isolated_and_shutdown_joins_every_thread() -> None:
    before = set(threading.enumerate())
    a, b = ActorSystem("a"), ActorSystem("b")
    ra = a.spawn(Counter, name="counter-a")
    rb = b.spawn(Counter, name="counter-b")
    assert a.actors() == [ra]
    assert b.actors() == [rb]
    assert any(t.name == "counter-a" for t in threading.enumerate())
    a.shutdown()
    assert not ra.is_alive()
    assert rb.is_alive()
    b.shutdown()
    assert set(threading.enumerate()) <= before
