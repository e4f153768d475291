"""The readiness channel between a supervised worker process and the process that started it.

:meth:`Runtime.spawn_workers <troupe.Runtime.spawn_workers>` (and ``troupe worker --workers N``)
starts each worker process with one end of a connected UNIX socket pair; the worker learns its
descriptor from ``--ready-fd N``. The worker writes one JSON line per event:

- ``serving`` once it serves (pid, instance id, request-plane address, status server URL);
- ``failed`` when it cannot start: its own one-line error, which the parent shows instead;
- ``draining`` when it begins to stop (unregistered, finishing requests in flight).

The parent reads them (:class:`~troupe.actors.ProcessActor`): a process that exits before
``serving`` *failed to start* (it is not restarted in a loop), one that exits after it *crashed*
(its supervisor restarts it). The socket is also the worker's lifeline: when the parent dies,
even by SIGKILL, the worker reads end-of-file and shuts down cleanly instead of serving on.

This module holds the messages, their codec (bytes in, messages out, no I/O) and the worker's end
(:class:`ParentLink`); the parent's end lives in the ProcessActor.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Final

import msgspec

from troupe._support._logging import get_logger
from troupe.errors import ConfigError

__all__ = [
    "MAX_LINE",
    "READY_FD_FLAG",
    "Draining",
    "Failed",
    "ParentLink",
    "Report",
    "Serving",
    "decode_report",
    "encode_report",
    "one_line",
]

_log = get_logger("troupe.readiness")

READY_FD_FLAG: Final = "--ready-fd"
"""The worker command's option that names the descriptor of its end of the channel."""

MAX_LINE: Final = 16 * 1024
"""The longest report line a parent reads; an error is cut to fit well within it."""


class Serving(msgspec.Struct, frozen=True, tag="serving"):
    """The worker serves: its endpoint is installed and registered in discovery."""

    pid: int
    instance_id: str
    address: str
    status_url: str | None = None


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    """The worker could not start; ``error`` is its one-line message."""

    error: str
    config: bool = False
    """Whether it was a configuration error (``troupe`` exits 2 for those)."""


class Draining(msgspec.Struct, frozen=True, tag="draining"):
    """The worker is stopping: unregistered, finishing the requests in flight."""


Report = Serving | Failed | Draining

_DECODER: Final = msgspec.json.Decoder(Report)


def encode_report(report: Report) -> bytes:
    """One report as one line (JSON and a newline)."""
    return msgspec.json.encode(report) + b"\n"


def decode_report(line: bytes) -> Report | None:
    """The report on one line, or None for anything else (a worker's own writes, garbage)."""
    try:
        return _DECODER.decode(line.strip())
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


def one_line(text: str, limit: int = 2000) -> str:
    """``text`` folded onto one line and cut to ``limit`` characters."""
    folded = " ".join(text.split())
    return folded if len(folded) <= limit else folded[: limit - 1] + "…"


class ParentLink:
    """The worker's end of the channel: reports to the parent and watches it.

    Args:
        fd: the descriptor passed with ``--ready-fd``; the link owns it from now on.

    Raises:
        ConfigError: ``fd`` is not an open socket.
    """

    def __init__(self, fd: int) -> None:
        try:
            self._sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ConfigError(READY_FD_FLAG, fd, "the descriptor of an open socket") from exc
        os.set_inheritable(fd, False)  # the handler's own subprocesses must not hold it
        self._lock = threading.Lock()
        self._closed = False
        self._watcher: threading.Thread | None = None

    def report(self, report: Report) -> bool:
        """Send ``report``; False if the parent is gone (the channel is closed)."""
        data = encode_report(report)
        with self._lock:
            if self._closed:
                return False
            try:
                self._sock.sendall(data)
            except OSError as exc:
                _log.debug("parent unreachable", error=str(exc))
                return False
        return True

    def watch_parent(self, on_gone: Callable[[], None]) -> None:
        """Call ``on_gone()`` once, from a thread, when the parent closes its end or dies."""
        if self._watcher is not None:
            return

        def watch() -> None:
            while True:
                try:
                    data = self._sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    break  # the parent's end is closed; the parent never writes otherwise
            with self._lock:
                closing = self._closed
            if not closing:
                _log.warning("the supervising process is gone; shutting down")
                on_gone()

        self._watcher = threading.Thread(target=watch, name="ParentLink-watch")
        self._watcher.start()

    def close(self) -> None:
        """Stop watching (the watcher thread is joined) and close the socket."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the watcher's recv
        if self._watcher is not None:
            self._watcher.join()
        self._sock.close()
