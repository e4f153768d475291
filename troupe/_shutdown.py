"""A runtime's shutdown request: SIGINT/SIGTERM, ``request_shutdown()`` or ``close()``.

While someone waits in :meth:`Shutdown.wait` a signal just wakes them; otherwise it unwinds
the main thread (``KeyboardInterrupt`` for SIGINT, ``SystemExit`` for SIGTERM) so a ``with
Runtime(...)`` block exits and closes the runtime. A second signal during shutdown is logged
and ignored: unwinding again would cut ``close()`` short and leave threads behind.
"""

from __future__ import annotations

import signal
import threading
import types
from typing import Any

from troupe._support._logging import get_logger

__all__ = ["Shutdown", "SignalHandlers"]

_log = get_logger("troupe.runtime")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalHandlers:
    """SIGINT and SIGTERM handled by :meth:`_on_signal` between :meth:`install` and
    :meth:`restore`."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Handle SIGINT and SIGTERM (only from the main thread; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        raise NotImplementedError


class Shutdown(SignalHandlers):
    """The shutdown event of one runtime, and its signal handlers while installed."""

    def __init__(self) -> None:
        super().__init__()
        self._event = threading.Event()
        self._waiting = False

    def request(self) -> None:
        """Ask a :meth:`wait` caller to return (thread-safe)."""
        self._event.set()

    def wait(self, timeout: float | None) -> bool:
        """Block until a request or a signal; False on timeout."""
        self._waiting = True
        try:
            return self._event.wait(timeout)
        finally:
            self._waiting = False

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._event.is_set():
            _log.info("signal received, already shutting down", signal=name)
            return
        _log.info("signal received, shutting down", signal=name)
        self._event.set()
        if not self._waiting:
            # Nobody waits on the event: unwind the main thread so the ``with`` block exits.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
