"""ProcessActor: one OS process as a supervisable actor.

The actor starts the process and watches it from a thread of its own. When the process exits on
its own the actor stops too — normally for exit status 0, as a crash otherwise — so a
:class:`~troupe.actors.Supervisor` restarts it per its strategy, intensity and backoff. Stopping
the actor stops the process: SIGTERM (a troupe worker unregisters and drains), then SIGKILL after
``stop_timeout``.

With ``readiness=True`` the process is a troupe worker that reports on the channel of
:mod:`troupe._readiness`, and the actor goes through these states:

=========== ============================================ =====================================
state       entered when                                 exit of the process means
=========== ============================================ =====================================
starting    the process is started                       :class:`~troupe.errors.StartFailed`
serving     it reported ``serving``                      :class:`ProcessExited` (a crash), or
                                                         a normal stop for status 0
draining    it reported ``draining`` (it is stopping)    as for ``serving``
stopped     the actor stopped                            —
=========== ============================================ =====================================

A start failure carries the worker's own one-line error. A supervisor does not restart a child
whose first start fails: the cause (a port in use, an unreachable store) would fail it again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, Literal

import msgspec

from troupe._readiness import (
    MAX_LINE,
    READY_FD_FLAG,
    Draining,
    Failed,
    Report,
    Serving,
    decode_report,
)
from troupe._support._logging import get_logger
from troupe.actors._actor import Actor, ExitReason, Reply
from troupe.errors import ActorDead, ActorError, StartFailed

__all__ = [
    "AwaitServing",
    "Pid",
    "ProcessActor",
    "ProcessExited",
    "ProcessState",
    "ProcessStatus",
    "Status",
    "describe_exit",
]

_log = get_logger("troupe.actors.process")

ProcessState = Literal["starting", "serving", "draining", "stopped"]

_POLL_EXIT = 0.5  # seconds between checks that the process still runs while its channel is quiet


def describe_exit(code: int) -> str:
    """``exited with status 3`` or ``was killed by SIGKILL`` (Popen's negative codes)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


_STARTING_STOP_TIMEOUT = 2.0
"""Seconds between SIGTERM and SIGKILL for a worker that has not reported serving yet."""


class ProcessExited(ActorError):
    """A supervised process exited on its own with a non-zero status (after it served)."""

    def __init__(self, argv: Sequence[str], code: int, *, actor: str = "") -> None:
        self.argv = tuple(argv)
        self.code = code
        self.actor = actor
        who = actor or f"process {' '.join(argv[:4])}..."
        super().__init__(f"{who} {describe_exit(code)}")


class ProcessStatus(msgspec.Struct, frozen=True):
    """Where a process stands; ``serving`` is its report once it served (readiness only)."""

    state: ProcessState
    pid: int | None
    serving: Serving | None = None


class Pid(msgspec.Struct, frozen=True, tag=True):
    """Ask: the process id (None before start)."""


class Status(msgspec.Struct, frozen=True, tag=True):
    """Ask: the :class:`ProcessStatus`."""


class AwaitServing(msgspec.Struct, frozen=True, tag=True):
    """Ask: answers the :class:`~troupe._readiness.Serving` report once the process serves.

    Fails with :class:`~troupe.errors.StartFailed` if the process exits first. Without
    readiness it answers None at once.
    """


class _Reported(msgspec.Struct, frozen=True, tag=True):
    report: Report


class _Exited(msgspec.Struct, frozen=True, tag=True):
    code: int


ProcessMessage = Pid | Status | AwaitServing | _Reported | _Exited


class ProcessActor(Actor[ProcessMessage]):
    """Runs ``argv`` with ``env`` for as long as the actor lives.

    Args:
        argv: the command.
        env: its environment (this process's when None).
        stop_timeout: seconds between SIGTERM and SIGKILL when the actor stops.
        log: a file path that takes the process's stdout and stderr, appended, instead of this
            process's own streams; each restart appends to the same file.
        readiness: the process is a troupe worker: give it the readiness channel
            (``--ready-fd N`` is appended to ``argv``) and tell a start failure from a crash.
            It runs in a session of its own, so a terminal's Ctrl-C reaches only this process,
            which stops it in order; if this process dies, the worker sees its channel close
            and stops by itself.
        on_status: called with the new :class:`ProcessStatus` at each change of state, on the
            actor's thread; it must not block.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        stop_timeout: float = 10.0,
        log: str | os.PathLike[str] | None = None,
        readiness: bool = False,
        on_status: Callable[[ProcessStatus], None] | None = None,
    ) -> None:
        super().__init__()
        self._argv = list(argv)
        self._env = dict(env) if env is not None else None
        self._stop_timeout = stop_timeout
        self._log = log
        self._readiness = readiness
        self._on_status = on_status
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._watcher: threading.Thread | None = None
        self._state: ProcessState = "starting"
        self._serving: Serving | None = None
        self._failure: str | None = None  # the worker's own error line, if it sent one
        self._waiters: list[Reply] = []

    # --- lifecycle -----------------------------------------------------------------------------

    def started(self) -> None:
        argv = list(self._argv)
        child_end: socket.socket | None = None
        if self._readiness:
            self._channel, child_end = socket.socketpair()
            argv += [READY_FD_FLAG, str(child_end.fileno())]
        out: IO[bytes] | None = None
        try:
            if self._log is not None:
                out = open(self._log, "ab")  # noqa: SIM115 - closed below; the child has a copy
            self._proc = subprocess.Popen(
                argv,
                env=self._env,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                pass_fds=(child_end.fileno(),) if child_end is not None else (),
                start_new_session=self._readiness,
            )
        finally:
            if out is not None:
                out.close()
            if child_end is not None:
                child_end.close()  # the child holds it now: its exit closes the channel
        proc = self._proc
        self._watcher = threading.Thread(
            target=self._watch, args=(proc, self._channel), name=f"{self.name}-watch"
        )
        self._watcher.start()
        _log.debug("process started", pid=proc.pid, argv=" ".join(self._argv[:6]))
        self._set_state("starting")

    def stopped(self, reason: ExitReason, error: BaseException | None) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            # A worker that never served has nothing to drain: it gets a moment, not the grace.
            starting = self._readiness and self._state == "starting"
            try:
                proc.wait(
                    min(_STARTING_STOP_TIMEOUT, self._stop_timeout)
                    if starting
                    else self._stop_timeout
                )
            except subprocess.TimeoutExpired:
                if starting:
                    _log.debug("starting process still running; killing it", pid=proc.pid)
                else:
                    _log.warning("process ignored SIGTERM; killing it", pid=proc.pid)
                self._kill(proc)
                proc.wait()
        if self._watcher is not None:
            self._watcher.join()
        if self._channel is not None:
            self._channel.close()
        self._set_state("stopped")

    # --- messages ------------------------------------------------------------------------------

    def receive(self, message: ProcessMessage) -> Any:
        match message:
            case Pid():
                return self._proc.pid if self._proc is not None else None
            case Status():
                return self._status()
            case AwaitServing():
                if not self._readiness or self._serving is not None:
                    return self._serving
                self._waiters.append(self.defer())
                return None
            case _Reported(report=report):
                self._reported(report)
                return None
            case _Exited(code=code):
                self._exited(code)
                return None

    def _reported(self, report: Report) -> None:
        match report:
            case Serving() if self._state == "starting":
                self._serving = report
                self._set_state("serving")
                waiters, self._waiters = self._waiters, []
                for waiter in waiters:
                    waiter.set(report)
            case Draining() if self._state == "serving":
                self._set_state("draining")
            case Failed(error=error):
                self._failure = error  # the exit follows
            case _:
                _log.debug("report ignored", report=repr(report), state=self._state)

    def _exited(self, code: int) -> None:
        if self._readiness and self._state == "starting":
            detail = self._failure or f"{describe_exit(code)} before it served"
            self._fail(StartFailed(self.name, detail, code=code))
        elif code == 0:
            self.stop_self()
        else:
            self._fail(ProcessExited(self._argv, code, actor=self.name))

    def _fail(self, exc: ActorError) -> None:
        """Stop with ``exc`` as the exit reason: an expected failure, logged in one line."""
        pid = self._proc.pid if self._proc is not None else None
        if isinstance(exc, StartFailed):
            _log.debug("process failed to start", pid=pid, error=str(exc))
        else:  # the supervisor's "child exited, restarting" is the one line a crash costs
            _log.debug("process exited", pid=pid, error=str(exc))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.fail(exc)
        self._exit = ("error", exc)
        self._stop()

    # --- helpers -------------------------------------------------------------------------------

    def _status(self) -> ProcessStatus:
        pid = self._proc.pid if self._proc is not None else None
        return ProcessStatus(self._state, pid, self._serving)

    def _set_state(self, state: ProcessState) -> None:
        self._state = state
        if self._on_status is not None:
            self._on_status(self._status())

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        if self._readiness:  # its own session: take whatever it started along
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
        else:
            proc.kill()

    def _watch(self, proc: subprocess.Popen[bytes], channel: socket.socket | None) -> None:
        """On the watcher thread: forward the reports, then the exit status, to the actor."""
        if channel is not None:
            self._read_reports(proc, channel)
        code = proc.wait()
        self._tell(_Exited(code))

    def _read_reports(self, proc: subprocess.Popen[bytes], channel: socket.socket) -> None:
        channel.settimeout(_POLL_EXIT)
        buffer = b""
        while True:
            try:
                data = channel.recv(4096)
            except TimeoutError:
                if proc.poll() is None:
                    continue
                # Exited, yet the channel is open: a process it forked holds the other end.
                channel.settimeout(0.0)  # read what is buffered, then stop
                continue
            except OSError:
                return  # drained (non-blocking), or reset
            if not data:
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                report = decode_report(line)
                if report is not None:
                    self._tell(_Reported(report))
            if len(buffer) > MAX_LINE:
                buffer = b""  # not a report: something else writes to the channel

    def _tell(self, message: _Reported | _Exited) -> None:
        try:
            self.ref.tell(message)
        except ActorDead:
            pass  # stopped meanwhile: stopped() has taken care of the process
