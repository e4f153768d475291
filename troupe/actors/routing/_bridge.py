"""The bridge between a router's caller, on its own thread or loop, and the runtime's I/O loop.

Transports' clients are used only on the runtime's I/O loop: a caller on another event loop (a
web framework's) or on a plain thread is bridged, chunks flowing through a queue fed with
``call_soon_threadsafe`` and acknowledged in batches so that a slow reader holds the worker back
rather than filling memory.

The bridge is ``_Bridging``, a base class of the :class:`~troupe.actors.routing.Router` (whose
``generate`` and ``generate_sync`` enter it), and the credit and messages it passes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from troupe._support._ioloop import IOLoop
from troupe.errors import Cancelled

_WINDOW: Final = 64
"""Chunks a bridged request may run ahead of its reader before it waits for acknowledgement."""

_ITEM: Final = 0
_END: Final = 1
_FAIL: Final = 2

_Message = tuple[int, Any]
_Sink = Callable[[_Message], None]


@dataclass(frozen=True, slots=True)
class _Call:
    """One request as the caller made it."""

    request: Any
    instance_id: str | None
    deadline: float | None
    headers: dict[str, str] | None


class _Flow:
    """Credit between a bridged request (on the I/O loop) and its reader (elsewhere)."""

    __slots__ = ("acked", "room", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.room: asyncio.Event | None = None  # created on the I/O loop

    def ack(self, count: int) -> None:
        """Runs on the I/O loop: ``count`` more chunks were read."""
        self.acked += count
        if self.room is not None and self.sent - self.acked < _WINDOW:
            self.room.set()


def _finish(sink: _Sink, fut: concurrent.futures.Future[None]) -> None:
    """Done callback of a bridged request: tell the reader how it ended."""
    if fut.cancelled():
        sink((_FAIL, Cancelled("request cancelled: the runtime's I/O loop stopped it")))
        return
    exc = fut.exception()
    sink((_END, None) if exc is None else (_FAIL, exc))


def _acker(flow: _Flow, count: int) -> Callable[[], None]:
    return lambda: flow.ack(count)


class _Reader:
    """The reader's side of a bridged request, for the async and the blocking loop alike: turns
    each message into a chunk, the end, or the error, and returns credit as chunks are read."""

    __slots__ = ("_flow", "_io", "_unacked")

    def __init__(self, io: IOLoop, flow: _Flow) -> None:
        self._io = io
        self._flow = flow
        self._unacked = 0

    def read(self, message: _Message) -> tuple[bool, Any]:
        """``(True, chunk)``, or ``(False, None)`` at the end; raises the request's error."""
        kind, value = message
        if kind == _ITEM:
            self._unacked += 1
            if self._unacked >= _WINDOW // 2:
                self._io.call_soon(_acker(self._flow, self._unacked))
                self._unacked = 0
            return True, value
        if kind == _END:
            return False, None
        raise value


class _Bridging:
    """The bridge of a :class:`~troupe.actors.routing.Router`: its requests made off the I/O loop.

    A base class of the Router rather than an object of its own: these are the Router's methods
    (its ``generate`` and ``generate_sync`` enter them), kept apart from its routing; the
    attributes below are the Router's.
    """

    endpoint: str
    _io: IOLoop
    _lock: threading.Lock
    _bridged: set[concurrent.futures.Future[None]]

    if TYPE_CHECKING:

        def _check(self, instance_id: str | None) -> None: ...

        def _run(
            self,
            request: Any,
            instance_id: str | None,
            deadline: float | None,
            headers: dict[str, str] | None,
        ) -> AsyncGenerator[Any, None]: ...

    async def _generate_elsewhere(self, call: _Call) -> AsyncGenerator[Any, None]:
        """:meth:`generate` called off the I/O loop: bridged unless iterated on the I/O loop."""
        self._check(call.instance_id)
        if asyncio.get_running_loop() is self._io.loop:
            chunks = self._run(call.request, call.instance_id, call.deadline, call.headers)
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                await chunks.aclose()
            return
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[_Message] = asyncio.Queue()

        def sink(message: _Message) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, message)
            except RuntimeError:
                pass  # the caller's loop is closed: the reader is gone

        flow, fut = self._bridge(call, sink)
        reader = _Reader(self._io, flow)
        try:
            while True:
                more, value = reader.read(await inbox.get())
                if not more:
                    return
                yield value
        finally:
            fut.cancel()  # no-op once finished; otherwise cancels the request on the I/O loop

    def _generate_sync(self, call: _Call) -> Iterator[Any]:
        inbox: queue.SimpleQueue[_Message] = queue.SimpleQueue()
        flow, fut = self._bridge(call, inbox.put)
        reader = _Reader(self._io, flow)
        try:
            while True:
                more, value = reader.read(inbox.get())
                if not more:
                    return
                yield value
        finally:
            fut.cancel()

    def _bridge(self, call: _Call, sink: _Sink) -> tuple[_Flow, concurrent.futures.Future[None]]:
        flow = _Flow()
        fut = self._io.submit(self._pump(call, sink, flow))
        with self._lock:
            self._bridged.add(fut)

        def done(fut: concurrent.futures.Future[None]) -> None:
            with self._lock:
                self._bridged.discard(fut)
            _finish(sink, fut)

        fut.add_done_callback(done)
        return flow, fut

    async def _pump(self, call: _Call, sink: _Sink, flow: _Flow) -> None:
        """On the I/O loop: run the request and push its chunks to a reader elsewhere."""
        task = asyncio.current_task()
        if task is not None:
            task.set_name(f"Router-{self.endpoint}-bridge")
        flow.room = asyncio.Event()
        chunks = self._run(call.request, call.instance_id, call.deadline, call.headers)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                sink((_ITEM, chunk))
                flow.sent += 1
                if flow.sent - flow.acked >= _WINDOW:
                    flow.room.clear()
                    await flow.room.wait()
