"""ProcessActor: a process as an actor; with readiness, a start failure apart from a crash.

The "workers" here are small Python scripts that speak the readiness channel by hand, so each
outcome (fails with a message, dies silently, serves then crashes, ignores SIGTERM) is certain.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from troupe.actors import ActorSystem, Down, ProcessActor
from troupe.actors._process import AwaitServing, Pid, ProcessExited, ProcessStatus, Status
from troupe.errors import ActorDead, StartFailed
from troupe.testing._wait import eventually

# argv: ["-c", MODE, "--ready-fd", N]
SCRIPT = """
import json, signal, socket, sys, time
mode = sys.argv[1]
link = socket.socket(fileno=int(sys.argv[sys.argv.index("--ready-fd") + 1]))
def send(report):
    link.sendall((json.dumps(report) + "\\n").encode())
serving = {"type": "serving", "pid": 1, "instance_id": "i", "address": "tcp://h:1"}
if mode == "fail":
    send({"type": "failed", "error": "port 1 in use", "config": True})
    sys.exit(2)
if mode == "silent":
    sys.exit(5)
if mode == "garbage-then-serve":
    link.sendall(b"not a report\\n" + b"x" * 40000)
    link.sendall(b"\\n")
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
send(serving)
if mode == "serve-then-crash":
    sys.exit(3)
if mode == "serve-then-exit":
    sys.exit(0)
if mode == "serve-drain-exit":
    send({"type": "draining"})
    time.sleep(0.2)
    sys.exit(0)
link.recv(1)  # until the parent goes away
time.sleep(60 if mode == "ignore-term" else 0)
"""


@pytest.fixture
def system() -> Iterator[ActorSystem]:
    sys_ = ActorSystem("process-test")
    yield sys_
    sys_.shutdown()


class Watched:
    """A ProcessActor in readiness mode, its states and its Down."""

    def __init__(self, system: ActorSystem, mode: str, **kwargs: Any) -> None:
        self.states: list[ProcessStatus] = []
        self.downs: list[Down] = []
        self.down = threading.Event()
        self.ref = system.spawn(
            lambda: ProcessActor(
                [sys.executable, "-c", SCRIPT, mode],
                readiness=True,
                on_status=self.states.append,
                **kwargs,
            ),
            name=f"proc-{mode}",
        )
        system.watch(self.ref, self._on_down)

    def _on_down(self, down: Down) -> None:
        self.downs.append(down)
        self.down.set()

    def error(self) -> BaseException | None:
        assert self.down.wait(20), "the actor did not stop"
        return self.downs[0].error


def test_a_reported_start_failure_is_start_failed_with_the_workers_line(
    system: ActorSystem,
) -> None:
    proc = Watched(system, "fail")
    failure: BaseException | None = None
    try:
        proc.ref.ask(AwaitServing(), timeout=20)
    except StartFailed as exc:  # the ask was waiting when the process exited
        failure = exc
    except ActorDead as dead:  # the ask came after the actor had stopped
        failure = dead.__cause__
    assert isinstance(failure, StartFailed)
    assert failure.detail == "port 1 in use"
    assert failure.code == 2
    assert proc.error() is failure
    assert [s.state for s in proc.states] == ["starting", "stopped"]


def test_a_silent_exit_before_serving_is_a_start_failure_too(system: ActorSystem) -> None:
    proc = Watched(system, "silent")
    error = proc.error()
    assert isinstance(error, StartFailed)
    assert error.detail == "exited with status 5 before it served"


def test_a_crash_after_serving_is_process_exited(system: ActorSystem) -> None:
    proc = Watched(system, "serve-then-crash")
    error = proc.error()
    assert isinstance(error, ProcessExited)
    assert error.code == 3
    assert str(error) == "proc-serve-then-crash exited with status 3"
    assert [s.state for s in proc.states] == ["starting", "serving", "stopped"]


def test_a_clean_exit_after_serving_is_a_normal_stop(system: ActorSystem) -> None:
    proc = Watched(system, "serve-drain-exit")
    assert proc.error() is None
    assert proc.downs[0].reason == "normal"
    assert [s.state for s in proc.states] == ["starting", "serving", "draining", "stopped"]


def test_await_serving_answers_the_report_and_garbage_is_skipped(system: ActorSystem) -> None:
    proc = Watched(system, "garbage-then-serve")
    serving = proc.ref.ask(AwaitServing(), timeout=20)
    assert serving.address == "tcp://h:1"
    status = proc.ref.ask(Status())
    assert status.state == "serving"
    assert status.pid == proc.ref.ask(Pid())
    assert proc.ref.stop(timeout=20)
    assert proc.states[-1].state == "stopped"
    with pytest.raises(ActorDead):
        proc.ref.ask(Status())


def test_stopping_kills_a_process_that_ignores_sigterm(system: ActorSystem) -> None:
    proc = Watched(system, "ignore-term", stop_timeout=0.5)
    proc.ref.ask(AwaitServing(), timeout=20)
    pid = proc.ref.ask(Pid())
    assert proc.ref.stop(timeout=20)

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    eventually(gone)


def test_without_readiness_the_exit_status_decides(system: ActorSystem) -> None:
    down = threading.Event()
    downs: list[Down] = []
    ref = system.spawn(lambda: ProcessActor([sys.executable, "-c", "import sys; sys.exit(4)"]))
    system.watch(ref, lambda d: (downs.append(d), down.set()))
    assert down.wait(20)
    assert isinstance(downs[0].error, ProcessExited)
    assert downs[0].error.code == 4
