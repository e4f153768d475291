"""Shared machinery of the ray, discovery and failure suites: processes, probes, loopback checks.

- :class:`WorkerProcesses` starts ``python -m troupe worker`` processes (no supervisor, so a
  killed one stays dead), SIGKILLs them on request, and reaps every one of them on exit.
- :class:`Probe` subscribes a small actor to a :class:`~troupe.actors.WatcherActor` and stamps
  every ``Joined``/``Left`` it receives with ``time.monotonic()``: what a router would see, and
  when.
- :func:`descendants`, :func:`tree_cpu_seconds` and :func:`listeners` find the processes a
  library started (Ray's renamed workers included) and check that they listen on loopback only.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Self

from troupe.actors import Actor, ActorRef, Joined, Left, Subscribe, WatcherActor
from troupe.messages import InstanceRecord, decode_record
from troupe.runtime import Runtime

__all__ = [
    "Event",
    "Listener",
    "Probe",
    "WorkerProcesses",
    "descendants",
    "foreign_peers",
    "listeners",
    "non_loopback",
    "reap",
    "scrubbed_env",
]

_TROUPE_PREFIXES = ("DYN_", "ETCD_", "NATS_", "POD_")


def reap(procs: Iterable[subprocess.Popen[bytes]], grace: float = 5.0) -> None:
    """Wait for every process to exit; SIGKILL what is left after ``grace`` seconds in all."""
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def scrubbed_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without troupe's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_TROUPE_PREFIXES)}
    env.update(extra)
    return env


# --- process trees -----------------------------------------------------------------------------


def _parents() -> dict[int, int]:
    """``pid -> ppid`` of every process visible in /proc."""
    table: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        table[int(entry.name)] = int(raw[raw.rindex(")") + 2 :].split()[1])
    return table


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (found by parent links: names may change)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass(frozen=True)
class Listener:
    """A listening socket: protocol, local address, port, owning pid and process name."""

    proto: str
    address: str
    port: int
    pid: int
    process: str


def listeners(pids: set[int]) -> list[Listener] | None:
    """Listening TCP/UDP sockets owned by ``pids`` (from ``ss``); None when ``ss`` is missing."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    found: list[Listener] = []
    for proto, flag in (("tcp", "-ltnpH"), ("udp", "-lunpH")):
        done = subprocess.run([ss, flag], capture_output=True, text=True, timeout=10, check=False)
        for line in done.stdout.splitlines():
            fields = line.split()
            if len(fields) < 6 or "pid=" not in fields[-1]:
                continue
            local = fields[3]
            host, _, port = local.rpartition(":")
            for owner in fields[-1].split("),("):
                name = owner.split('"')[1] if '"' in owner else "?"
                pid_text = owner.split("pid=", 1)[1].split(",", 1)[0]
                if pid_text.isdigit() and int(pid_text) in pids:
                    found.append(Listener(proto, host, int(port), int(pid_text), name))
    return found


def _is_loopback(host: str) -> bool:
    text = host.strip("[]").split("%", 1)[0]
    if text.startswith("::ffff:"):
        text = text.removeprefix("::ffff:")
    try:
        return ip_address(text).is_loopback
    except ValueError:
        return text == "localhost"


def non_loopback(found: list[Listener]) -> list[Listener]:
    """The listeners bound to anything but a loopback address (``*`` and ``0.0.0.0`` included)."""
    return [item for item in found if not _is_loopback(item.address)]


def foreign_peers(pids: set[int]) -> list[str] | None:
    """Remote ends of TCP connections owned by ``pids`` that are not loopback (``ss``)."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    done = subprocess.run([ss, "-tnpH"], capture_output=True, text=True, timeout=10, check=False)
    found: list[str] = []
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) < 6 or "pid=" not in fields[-1]:
            continue
        owners = {
            int(text.split(",", 1)[0])
            for text in fields[-1].split("pid=")[1:]
            if text.split(",", 1)[0].isdigit()
        }
        peer = fields[4]
        if owners & pids and not _is_loopback(peer.rpartition(":")[0]):
            found.append(peer)
    return found


# --- worker processes --------------------------------------------------------------------------


class WorkerProcesses:
    """``python -m troupe worker ENDPOINT HANDLER`` processes; every one reaped on exit.

    No supervisor: a SIGKILLed worker stays dead. Each worker's stderr goes to a log file in
    ``log_dir`` (read it when something goes wrong).
    """

    def __init__(self, log_dir: Path, env: Mapping[str, str]) -> None:
        self._log_dir = log_dir
        self._env = dict(env)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, endpoint: str, handler: str = "troupe.demo:words") -> subprocess.Popen[bytes]:
        """Start one worker; it registers once it serves (watch for its ``Joined``)."""
        index = len(self.procs)
        log = self._log_dir / f"worker-{index}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "troupe", "worker", endpoint, handler],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env,
            )
        self.procs.append(proc)
        return proc

    def log_tail(self, proc: subprocess.Popen[bytes], size: int = 1500) -> str:
        """The end of a worker's log."""
        index = self.procs.index(proc)
        try:
            return (self._log_dir / f"worker-{index}.log").read_text(errors="replace")[-size:]
        except OSError:
            return ""

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL one worker (a crash) and reap it."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def close(self) -> None:
        """SIGTERM every live worker, SIGKILL what is left after a short grace; reap all."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        reap(self.procs)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()


# --- the probe: a router's view of one prefix, timestamped -------------------------------------


@dataclass(frozen=True)
class Event:
    """A ``Joined`` or ``Left`` as the probe actor received it, at ``time.monotonic()``."""

    at: float
    message: Joined | Left


class _ProbeActor(Actor[Joined | Left]):
    """Stamps each event on arrival and hands it to the benchmark's thread."""

    def __init__(self, sink: queue.SimpleQueue[Event]) -> None:
        super().__init__()
        self._sink = sink

    def receive(self, message: Joined | Left) -> None:
        self._sink.put(Event(time.monotonic(), message))


def _decode(key: str, value: bytes) -> tuple[str, InstanceRecord]:
    record = decode_record(value, key=key)
    return record.instance_id, record


class Probe:
    """A WatcherActor on ``prefix`` with one subscriber that timestamps what it receives.

    The same path a RouterActor is fed by (``Runtime.router`` spawns a WatcherActor and
    subscribes to it). Use as a context manager; :meth:`close` stops both actors.
    """

    def __init__(self, rt: Runtime, prefix: str) -> None:
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        watched = rt.store
        events = self.events
        self._probe: ActorRef[Any] = rt.system.spawn(lambda: _ProbeActor(events))
        self._watcher: ActorRef[Any] = rt.system.spawn(
            lambda: WatcherActor(watched, prefix, _decode)
        )
        self._watcher.ask(Subscribe(self._probe), timeout=10)

    def next(self, deadline: float) -> Event | None:
        """The next event; None when none is queued and ``deadline`` (monotonic) has passed."""
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                return self.events.get_nowait()  # what already arrived still counts
            return self.events.get(timeout=remaining)
        except queue.Empty:
            return None

    def wait_for(self, match: Callable[[Joined | Left], bool], timeout: float) -> Event | None:
        """The first event matching ``match`` within ``timeout`` s (others are dropped)."""
        deadline = time.monotonic() + timeout
        while (event := self.next(deadline)) is not None:
            if match(event.message):
                return event
        return None

    def close(self) -> None:
        """Stop the watcher and the probe actor."""
        self._watcher.stop(timeout=5)
        self._probe.stop(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()
