"""ProcessActor: one OS process as a supervisable actor.

The actor starts the process and watches it from the I/O loop. When the process exits on its own
the actor stops too — normally for exit status 0, as a crash otherwise — so a
:class:`~troupe.actors.Supervisor` restarts it per its strategy, intensity and backoff. Stopping
the actor stops the process: SIGTERM (a troupe worker unregisters and drains), then SIGKILL after
``stop_timeout``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from troupe._logging import get_logger
from troupe.actors._actor import Actor, ExitReason
from troupe.errors import ActorError

__all__ = ["Pid", "ProcessActor", "ProcessExited"]

_log = get_logger("troupe.actors.process")


class ProcessExited(ActorError):
    """A supervised process exited on its own with a non-zero status."""

    def __init__(self, argv: Sequence[str], code: int) -> None:
        self.argv = tuple(argv)
        self.code = code
        super().__init__(f"process {' '.join(argv[:4])}... exited with status {code}")


class Pid(msgspec.Struct, frozen=True, tag=True):
    """Ask: the process id (None before start)."""


class _Exited(msgspec.Struct, frozen=True, tag=True):
    code: int


class ProcessActor(Actor[Pid | _Exited]):
    """Runs ``argv`` with ``env`` for as long as the actor lives.

    ``log`` (a file path) takes the process's stdout and stderr, appended, instead of this
    process's own streams; each restart appends to the same file.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        stop_timeout: float = 10.0,
        log: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self._argv = list(argv)
        self._env = dict(env) if env is not None else None
        self._stop_timeout = stop_timeout
        self._log = log
        self._proc: subprocess.Popen[bytes] | None = None

    def started(self) -> None:
        if self._log is None:
            self._proc = subprocess.Popen(self._argv, env=self._env)
        else:
            with open(self._log, "ab") as out:  # the child keeps its own copy of the descriptor
                self._proc = subprocess.Popen(
                    self._argv, env=self._env, stdout=out, stderr=subprocess.STDOUT
                )
        proc = self._proc
        self.run_io(asyncio.to_thread(proc.wait), lambda f: _Exited(f.result()))
        _log.info("process started", pid=proc.pid, argv=" ".join(self._argv[:6]))

    def receive(self, message: Pid | _Exited) -> Any:
        match message:
            case Pid():
                return self._proc.pid if self._proc is not None else None
            case _Exited(code=code):
                if code == 0:
                    self.stop_self()
                    return None
                raise ProcessExited(self._argv, code)

    def stopped(self, reason: ExitReason, error: BaseException | None) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(self._stop_timeout)
        except subprocess.TimeoutExpired:
            _log.warning("process ignored SIGTERM; killing it", pid=proc.pid)
            proc.kill()
            proc.wait()
