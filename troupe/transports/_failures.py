"""What a worker does when an endpoint handler raises: tell its caller, and tell the operator.

The caller gets an :class:`~troupe.messages._frames.Error` frame naming the exception's class
and message (:func:`error_frame`), with the traceback as text when the worker logs at debug level
(``DYN_LOG=debug``); the caller raises it as :class:`~troupe.errors.RemoteError`. The worker logs
the traceback, at most ``burst`` of them per endpoint in each ``window`` seconds
(:class:`TracebackBudget`, sans-IO), then one line saying how many more failures it left out,
so a handler failing on every request cannot flood the log.

Troupe errors a handler raises on purpose (``Overloaded``, ``DeadlineExceeded``,
``InvalidRequest``, ...) are answers, not failures: they reach the caller with their own type and
are not logged. A cancelled request never gets here (``CancelledError`` is no ``Exception``).
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import Final

from troupe._support._logging import get_logger
from troupe.errors import TroupeError
from troupe.messages._frames import Error, RequestId

__all__ = ["FailureReporter", "TracebackBudget", "error_frame"]

_log = get_logger("troupe.transports.failures")

_MAX_ERROR_MESSAGE: Final = 16 * 1024
_MAX_TRACEBACK: Final = 16 * 1024
_MAX_LOGGED_MESSAGE: Final = 500

DEFAULT_BURST: Final = 5
"""Tracebacks an endpoint may log per window."""
DEFAULT_WINDOW: Final = 60.0
"""Seconds of a window, from the first failure it counts."""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "... (truncated)"


def _message(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when the handler's exception cannot be shown."""
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not keep the caller waiting
        return f"<{type(exc).__name__}: str() failed>"


def traceback_text(exc: BaseException) -> str:
    """``exc``'s traceback as Python prints it, its start cut when long (the innermost frames,
    at the end, are the ones that tell)."""
    text = "".join(traceback.format_exception(exc))
    if len(text) <= _MAX_TRACEBACK:
        return text
    cut = len(text) - _MAX_TRACEBACK
    return f"... ({cut} characters cut)\n" + text[cut:]


def error_frame(
    request_id: RequestId, exc: BaseException, *, with_traceback: bool = False
) -> Error:
    """The :class:`Error` frame reporting ``exc`` (class name and message) to the caller.

    Args:
        with_traceback: send the traceback text too (a worker logging at debug level).
    """
    return Error(
        request_id,
        type(exc).__name__,
        _cut(_message(exc), _MAX_ERROR_MESSAGE),
        traceback_text(exc) if with_traceback else "",
    )


class _Window:
    __slots__ = ("logged", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 0
        self.suppressed = 0


class TracebackBudget:
    """Which handler failures are logged with their traceback; sans-IO (time is passed in).

    Each endpoint may log ``burst`` tracebacks in a window of ``window`` seconds that opens at
    its first failure; the failures after them in that window are counted, and :meth:`due`
    hands the count back once the window has ended.

    Args:
        burst: tracebacks per endpoint per window (>= 1).
        window: seconds (> 0).
    """

    __slots__ = ("_burst", "_unreported", "_window", "_windows")

    def __init__(self, burst: int = DEFAULT_BURST, window: float = DEFAULT_WINDOW) -> None:
        if type(burst) is not int or burst < 1:
            raise ValueError(f"burst must be an int >= 1, not {burst!r}")
        if not window > 0:
            raise ValueError(f"window must be > 0 seconds, not {window!r}")
        self._burst = burst
        self._window = float(window)
        self._windows: dict[str, _Window] = {}
        self._unreported: dict[str, int] = {}  # counts of windows that ended before due() ran

    @property
    def burst(self) -> int:
        """Tracebacks per endpoint per window."""
        return self._burst

    @property
    def window(self) -> float:
        """Seconds of a window."""
        return self._window

    def admit(self, endpoint: str, now: float) -> bool:
        """A handler of ``endpoint`` failed at ``now``: whether to log its traceback.

        ``False`` counts the failure as suppressed.
        """
        window = self._windows.get(endpoint)
        if window is None or now >= window.start + self._window:
            if window is not None and window.suppressed:
                self._unreported[endpoint] = self._unreported.get(endpoint, 0) + window.suppressed
            window = self._windows[endpoint] = _Window(now)
        if window.logged < self._burst:
            window.logged += 1
            return True
        window.suppressed += 1
        return False

    def next_due(self) -> float | None:
        """When :meth:`due` will next have something to report (``0.0``: at once); ``None``
        when nothing waits."""
        if self._unreported:
            return 0.0
        ends = [w.start + self._window for w in self._windows.values() if w.suppressed]
        return min(ends, default=None)

    def due(self, now: float) -> list[tuple[str, int]]:
        """The failures suppressed in windows that ended by ``now``: ``(endpoint, count)``.

        Each count is handed back once; ended windows are forgotten.
        """
        report = dict(self._unreported)
        self._unreported.clear()
        for endpoint, window in list(self._windows.items()):
            if now >= window.start + self._window:
                del self._windows[endpoint]
                if window.suppressed:
                    report[endpoint] = report.get(endpoint, 0) + window.suppressed
        return sorted(report.items())

    def flush(self) -> list[tuple[str, int]]:
        """Every failure suppressed and not yet reported, windows ended or not (at shutdown)."""
        report = dict(self._unreported)
        self._unreported.clear()
        for endpoint, window in self._windows.items():
            if window.suppressed:
                report[endpoint] = report.get(endpoint, 0) + window.suppressed
        self._windows.clear()
        return sorted(report.items())


class FailureReporter:
    """Turns a handler's exception into its caller's :class:`Error` frame and the worker's log.

    Used on the event loop that owns the server. It owns one timer, armed while suppressed
    failures wait to be reported at the end of their window; :meth:`close` stops it and reports
    what is left.

    Args:
        budget: how many tracebacks to log (:class:`TracebackBudget`; 5 per endpoint per minute
            by default).
    """

    __slots__ = ("_budget", "_timer")

    def __init__(self, budget: TracebackBudget | None = None) -> None:
        self._budget = budget if budget is not None else TracebackBudget()
        self._timer: asyncio.TimerHandle | None = None

    def report(self, endpoint: str, request_id: RequestId, exc: Exception) -> Error:
        """The frame answering a request whose handler raised ``exc``; logs a handler failure."""
        if isinstance(exc, TroupeError):  # raised on purpose: an answer, not a failure
            return error_frame(request_id, exc)
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._log_suppressed(self._budget.due(now))
        if self._budget.admit(endpoint, now):
            kind = type(exc).__name__
            message = _cut(_message(exc), _MAX_LOGGED_MESSAGE)
            _log.error(
                "handler raised",
                endpoint=endpoint,
                error=f"{kind}: {message}" if message else kind,
                exc_info=exc,
            )
        elif self._timer is None:
            self._arm(loop)
        return error_frame(request_id, exc, with_traceback=_log.isEnabledFor(logging.DEBUG))

    def close(self) -> None:
        """Stop the timer; log the failures still suppressed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._log_suppressed(self._budget.flush())

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        when = self._budget.next_due()
        if when is not None:
            self._timer = loop.call_at(when, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._log_suppressed(self._budget.due(loop.time()))
        self._arm(loop)

    def _log_suppressed(self, counts: list[tuple[str, int]]) -> None:
        budget = self._budget
        for endpoint, count in counts:
            _log.error(
                f"suppressed {count} more handler failure tracebacks",
                endpoint=endpoint,
                limit=f"{budget.burst} per {budget.window:g} s",
            )
