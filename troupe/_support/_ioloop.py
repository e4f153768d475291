"""The runtime's I/O loop: one asyncio event loop on one named thread that owns every socket.

Actors never block their mailbox on network I/O; they submit coroutines here
(:meth:`IOLoop.submit`) and receive the outcome as a message. uvloop is used when installed (it
roughly halves asyncio's per-message cost on this kind of machine).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from troupe.errors import TroupeError

__all__ = ["IOLoop"]

T = TypeVar("T")


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop  # noqa: PLC0415 - optional dependency

            return uvloop.new_event_loop()
        except ImportError:
            pass
    return asyncio.new_event_loop()


class IOLoop:
    """An asyncio loop running on its own thread until :meth:`stop`."""

    def __init__(self, name: str = "troupe-io", *, use_uvloop: bool = True) -> None:
        self._name = name
        self._use_uvloop = use_uvloop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (after :meth:`start`)."""
        if self._loop is None:
            raise TroupeError("the I/O loop is not started")
        return self._loop

    @property
    def thread(self) -> threading.Thread | None:
        """The loop's thread, while it runs."""
        return self._thread

    def in_loop_thread(self) -> bool:
        """Whether the caller runs on the loop's own thread."""
        return threading.current_thread() is self._thread

    def start(self) -> None:
        """Start the loop thread and wait until the loop runs."""
        if self._thread is not None:
            return
        self._loop = _new_loop(self._use_uvloop)
        self._thread = threading.Thread(target=self._run, name=self._name)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            self._drain(loop)
            loop.close()

    @staticmethod
    def _drain(loop: asyncio.AbstractEventLoop) -> None:
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop from any thread; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block the calling (non-loop) thread for its result."""
        if self.in_loop_thread():
            coro.close()
            raise TroupeError("IOLoop.run() called from the I/O loop itself; await instead")
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def call_soon(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` on the loop thread as soon as possible (thread-safe)."""
        self.loop.call_soon_threadsafe(callback)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Cancel the loop's tasks, stop it and join its thread."""
        thread = self._thread
        if thread is None or self._loop is None:
            return
        if thread is threading.current_thread():
            raise TroupeError("IOLoop.stop() called from the I/O loop thread")
        with contextlib.suppress(RuntimeError):  # already closed
            self._loop.call_soon_threadsafe(self._loop.stop)
        thread.join(timeout)
        self._thread = None
