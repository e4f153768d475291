"""What every test server shares: a subprocess on a free loopback port in its own temp directory.

:func:`find_binary` finds the server's executable, :func:`free_port` picks a port, and
:class:`_ServerProcess` starts, probes, stops and restarts the process;
:mod:`troupe.testing.servers` lists the servers built on it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from troupe.errors import TroupeError

__all__ = ["find_binary", "free_port"]

_LOOPBACK = "127.0.0.1"
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 5.0
_LOG_TAIL = 2000


def find_binary(name: str) -> str | None:
    """Path of the executable ``name``: beside ``sys.executable`` first, then on ``PATH``."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        return int(sock.getsockname()[1])


class _ServerProcess:
    """A server subprocess with a fixed port and a private temp directory (shared machinery)."""

    kind = "server"

    def __init__(self, binary: str | None, binary_name: str, port: int | None) -> None:
        found = binary or find_binary(binary_name)
        if found is None:
            raise TroupeError(f"{binary_name} not found beside {sys.executable} or on PATH")
        if not os.access(found, os.X_OK):
            raise TroupeError(f"{binary_name} not found (or not executable) at {found}")
        self.binary = found
        self._auto_port = port is None
        self.port = port if port is not None else free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"troupe-{self.kind}-"))
        self.log_path = self.dir / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # --- what each server defines -------------------------------------------------------------

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """One quick readiness probe."""
        raise NotImplementedError

    def _pick_new_ports(self) -> None:
        self.port = free_port()

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start the server and wait until it serves clients.

        Raises:
            TroupeError: it exited or did not become ready within ``timeout``; the message ends
                with the tail of its log.
        """
        if self.running:
            return
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                return
            except TroupeError:
                log = self.log_tail()
                if attempt + 1 < attempts and "address already in use" in log.lower():
                    self._pick_new_ports()  # another process took the port: try a fresh one
                    continue
                raise

    def _start_once(self, timeout: float) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"--- starting: {' '.join(self._argv())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise TroupeError(
                    f"{self.kind} exited with status {code} at start-up; log tail:\n"
                    + self.log_tail()
                )
            if self._ready():
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise TroupeError(
                    f"{self.kind} did not become ready within {timeout:g} s; log tail:\n"
                    + self.log_tail()
                )
            time.sleep(0.02)  # polling a child process at start-up; nothing to wait on

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if the server has not exited within ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the server (a crash) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    def restart(self, timeout: float = _START_TIMEOUT) -> None:
        """Stop and start again on the same port with the same data."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, size: int = _LOG_TAIL) -> str:
        """The last ``size`` characters the server logged."""
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} port={self.port} {state}>"
