"""Injected time: the clock that TTLs, backoff, leases and timers are computed against.

Every component that waits or schedules takes a :class:`Clock`. Production code uses
:class:`SystemClock` (monotonic time, one timer thread owned by whoever owns the clock); tests use
:class:`VirtualClock` and move time forward with :meth:`VirtualClock.advance` instead of sleeping.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "SystemClock", "TimerHandle", "VirtualClock"]


class TimerHandle:
    """A scheduled callback; :meth:`cancel` stops it from running if it has not run yet."""

    __slots__ = ("_callback", "_cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self._callback = callback
        self._cancelled = False

    def cancel(self) -> None:
        """Prevent the callback from running; harmless after it ran."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancelled

    def _run(self) -> None:
        if not self._cancelled:
            self._callback()


class Clock(Protocol):
    """What time-dependent code needs: the current time and a way to be called back later."""

    def now(self) -> float:
        """Seconds on a monotonic scale (only differences are meaningful)."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` once, ``delay`` seconds from now, on the clock's own thread.

        Callbacks must be quick and must not block: they typically ``tell`` an actor.
        """
        ...

    def close(self) -> None:
        """Stop the clock's timer thread, if it has one; pending callbacks are dropped."""
        ...


class _TimerQueue:
    """A heap of timer handles ordered by due time (ties keep scheduling order)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()

    def push(self, handle: TimerHandle) -> None:
        heapq.heappush(self._heap, (handle.when, next(self._seq), handle))

    def pop_due(self, now: float) -> TimerHandle | None:
        if self._heap and self._heap[0][0] <= now:
            return heapq.heappop(self._heap)[2]
        return None

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def clear(self) -> None:
        self._heap.clear()


class SystemClock:
    """Monotonic wall time with one lazily started timer thread.

    The thread is named ``troupe-clock`` and is joined by :meth:`close`; the owner (an
    :class:`~troupe.actors.ActorSystem`) closes it on shutdown.
    """

    def __init__(self, name: str = "troupe-clock") -> None:
        self._name = name
        self._queue = _TimerQueue()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def now(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Schedule ``callback`` on the timer thread after ``delay`` seconds."""
        handle = TimerHandle(self.now() + max(0.0, delay), callback)
        with self._cond:
            if self._closed:
                handle.cancel()
                return handle
            self._queue.push(handle)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name)
                self._thread.start()
            self._cond.notify()
        return handle

    def close(self) -> None:
        """Stop and join the timer thread; callbacks not yet due never run."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    due = self._queue.pop_due(self.now())
                    if due is not None:
                        break
                    nxt = self._queue.next_due()
                    self._cond.wait(None if nxt is None else max(0.0, nxt - self.now()))
            due._run()  # outside the lock: a callback may schedule another timer


class VirtualClock:
    """A clock that moves only when told to: deterministic tests of TTLs, backoff and leases.

    Callbacks run synchronously, in due order, in the thread that calls :meth:`advance`.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._queue = _TimerQueue()
        self._lock = threading.RLock()

    def now(self) -> float:
        """The virtual time."""
        with self._lock:
            return self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Schedule ``callback`` to run when virtual time reaches now + ``delay``."""
        with self._lock:
            handle = TimerHandle(self._now + max(0.0, delay), callback)
            self._queue.push(handle)
            return handle

    def advance(self, seconds: float) -> None:
        """Move time forward, running every callback that falls due, in order."""
        with self._lock:
            target = self._now + seconds
            while True:
                due = self._queue.pop_due(target)
                if due is None:
                    break
                self._now = max(self._now, due.when)
                due._run()
            self._now = target

    def pending(self) -> list[float]:
        """Due times of the callbacks not yet run nor cancelled (for assertions)."""
        with self._lock:
            return sorted(h.when for _, _, h in self._queue._heap if not h.cancelled)

    def close(self) -> None:
        """Drop every pending callback."""
        with self._lock:
            self._queue.clear()
