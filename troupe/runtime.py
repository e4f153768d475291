"""The Runtime: wires one process together.

A :class:`Runtime` owns the actor system, the asyncio I/O loop thread that owns every socket, the
clock, and (in later layers) the discovery backend, the lease and the request-plane server. Use it
as a context manager; leaving the block, :meth:`Runtime.close`, SIGINT or SIGTERM stop everything:
actors in reverse start order, then the loop, with every thread joined.
"""

from __future__ import annotations

import signal
import threading
import types
from collections.abc import Callable
from typing import Any, TypeVar

from troupe._clock import Clock, SystemClock
from troupe._ioloop import IOLoop
from troupe._logging import configure_logging, get_logger
from troupe.actors import Actor, ActorRef, ActorSystem
from troupe.config import Config
from troupe.errors import TroupeError

__all__ = ["Runtime"]

M = TypeVar("M")

_log = get_logger("troupe.runtime")

_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Runtime:
    """One per process (several may coexist in tests): actors, I/O loop, planes.

    Args:
        config: the resolved configuration; :meth:`from_env` reads it from the environment.
        clock: injected time (tests); a system clock owned by the runtime if omitted.
        handle_signals: install SIGINT/SIGTERM handlers while running in the main thread.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.config = config if config is not None else Config()
        self._owns_clock = clock is None
        self.clock: Clock = clock if clock is not None else SystemClock("troupe-clock")
        self.io = IOLoop("troupe-io")
        self.system = ActorSystem("troupe", clock=self.clock, io_loop=self.io)
        self._handle_signals = handle_signals
        self._previous_handlers: dict[int, Any] = {}
        self._shutdown = threading.Event()
        self._waiting = False
        self._state = "new"
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **kwargs: Any) -> Runtime:
        """Build a runtime from ``DYN_*`` / ``ETCD_*`` / ``NATS_*`` / ``POD_*`` variables.

        Raises:
            ConfigError: a variable has an invalid value (named in the message).
        """
        return cls(Config.from_env(environ), **kwargs)

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``new``, ``running`` or ``closed``."""
        return self._state

    def start(self) -> Runtime:
        """Configure logging, start the I/O loop and install signal handlers."""
        with self._lock:
            if self._state != "new":
                raise TroupeError(f"runtime cannot start from state {self._state}")
            self._state = "running"
        configure_logging(self.config.log)
        self.io.start()
        if self._handle_signals and threading.current_thread() is threading.main_thread():
            for sig in _SHUTDOWN_SIGNALS:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        _log.debug("runtime started", plane=self.config.request_plane.plane)
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop actors (reverse start order), the I/O loop and the clock; join every thread."""
        with self._lock:
            if self._state == "closed":
                return
            was_running = self._state == "running"
            self._state = "closed"
        self._shutdown.set()
        if was_running:
            self.system.shutdown(timeout=timeout)
            self.io.stop(timeout=timeout)
        if self._owns_clock:
            self.clock.close()
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()
        _log.debug("runtime closed")

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()

    # --- shutdown requests ---------------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Ask a :meth:`wait_for_shutdown` caller to return (thread-safe)."""
        self._shutdown.set()

    def wait_for_shutdown(self, timeout: float | None = None) -> bool:
        """Block until SIGINT/SIGTERM, :meth:`request_shutdown` or :meth:`close`.

        Returns ``True`` if shutdown was requested, ``False`` on timeout.
        """
        self._waiting = True
        try:
            return self._shutdown.wait(timeout)
        finally:
            self._waiting = False

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        _log.info("signal received, shutting down", signal=signal.Signals(signum).name)
        self._shutdown.set()
        if not self._waiting:
            # Nobody waits on the event: unwind the main thread so the ``with`` block exits.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

    # --- actors --------------------------------------------------------------------------------

    def spawn(self, factory: Callable[[], Actor[M]], *, name: str | None = None) -> ActorRef[M]:
        """Start a top-level actor in this runtime's actor system."""
        if self._state != "running":
            raise TroupeError("runtime is not running; use `with Runtime(...) as rt:`")
        return self.system.spawn(factory, name=name)
