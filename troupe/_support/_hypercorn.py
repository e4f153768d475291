"""Running an ASGI app under hypercorn on a socket we bound, on the running loop.

Shared by the HTTP/2 request plane's server and the OpenAI frontend: both bind their own socket
(so port 0 and bind errors are theirs to report), then need hypercorn serving it, a way to know
that the app's lifespan startup ran, and a shutdown trigger.

:func:`launch` hands back the :class:`Served` handle *before* anything is awaited, so the caller
owns the task from the start: a ``close()`` that runs while the start-up is awaited finds it, and
a cancelled start-up stops it (:meth:`Served.wait_started`).

hypercorn's own ``worker_serve`` is replaced by :func:`_serve`, the same steps for one plain
socket, so that each connection is handled by :class:`_Connection`, which corrects two defects of
hypercorn 0.18 that a hostile or broken peer turns into unbounded resources:

* a connection its peer closed (HTTP/1.1 keep-alive, or HTTP/2 without GOAWAY) stayed in
  ``CLOSE_WAIT``, its file descriptor held, until the keep-alive timeout (100 s on the HTTP/2
  plane);
* an HTTP/2 peer that grants no flow-control window made every write of a response return at
  once, so one stream buffered all its handler produced (see :class:`_StreamBuffer`).

The handle also counts the open connections (:attr:`Served.connections`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

from hypercorn.asyncio.lifespan import Lifespan
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Event, RawData, Updated
from hypercorn.protocol.h2 import (
    BUFFER_HIGH_WATER,
    BUFFER_LOW_WATER,
    BufferCompleteError,
    H2Protocol,
    StreamBuffer,
)
from hypercorn.typing import AppWrapper, ASGIFramework, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown, wrap_app

from troupe._support._logging import get_logger

__all__ = ["Served", "StartFailed", "launch", "serve_on_socket"]

_log = get_logger("troupe.hypercorn")

# Seconds a client gets to finish its TLS handshake (asyncio's default is 60): a peer that
# connects and stays silent holds a connection no longer than this.
_TLS_HANDSHAKE_TIMEOUT = 10.0


class StartFailed(Exception):
    """hypercorn ended before the app's lifespan startup ran; ``cause`` is why (or None)."""

    def __init__(self, cause: BaseException | None) -> None:
        self.cause = cause
        super().__init__(repr(cause))


class Served:
    """hypercorn serving one socket: its task and its shutdown trigger.

    Setting :attr:`shutdown` stops hypercorn gracefully (``config.graceful_timeout``); await
    :attr:`task` afterwards (or call :meth:`stop`).
    """

    __slots__ = ("_connections", "shutdown", "task")

    def __init__(
        self,
        task: asyncio.Task[None],
        shutdown: asyncio.Event,
        connections: dict[asyncio.Task[None], asyncio.StreamWriter] | None = None,
    ) -> None:
        self.task = task
        self.shutdown = shutdown
        self._connections = connections if connections is not None else {}

    @property
    def connections(self) -> int:
        """Client connections open now (each one's handler ends once its socket is closed)."""
        return len(self._connections)

    def error(self) -> BaseException | None:
        """Why the task ended: its exception, or None (running, cancelled or ended cleanly)."""
        task = self.task
        if not task.done() or task.cancelled():
            return None
        return task.exception()

    async def wait_started(self, started: asyncio.Future[None]) -> None:
        """Wait for ``started`` (resolved by the app's lifespan startup).

        On any exception while waiting, the cancellation of the caller included, hypercorn is
        stopped (shutdown set, task cancelled and awaited) before it propagates.

        Raises:
            StartFailed: hypercorn ended first; ``started`` is cancelled. The socket is left to
                the caller (close it).
        """
        try:
            await asyncio.wait((self.task, started), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            started.cancel()
            await self.abort()
            raise
        if not started.done():
            started.cancel()
            raise StartFailed(self.error())

    async def stop(self) -> BaseException | None:
        """Trigger the graceful shutdown, wait for the task; return :meth:`error`."""
        self.shutdown.set()
        await asyncio.wait((self.task,))
        return self.error()

    async def abort(self) -> None:
        """Stop at once: trigger the shutdown, cancel the task and wait for it."""
        self.shutdown.set()
        self.task.cancel()
        await asyncio.wait((self.task,))
        self.error()  # retrieved: no "exception was never retrieved" for a failed task


def launch(
    app: Any,
    config: HypercornConfig,
    sock: socket.socket,
    *,
    name: str,
    tls: ssl.SSLContext | None = None,
) -> Served:
    """Start serving ``app`` on ``sock`` in a new task named ``name``; the caller owns it.

    ``tls``: serve HTTPS with this server context (its ALPN chooses HTTP/2 or HTTP/1.1); a
    handshake that fails, or takes over ``_TLS_HANDSHAKE_TIMEOUT`` seconds, drops only its
    connection. Nothing is awaited: store the handle, then :meth:`Served.wait_started`.
    """
    shutdown = asyncio.Event()
    connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
    task = asyncio.get_running_loop().create_task(
        _serve(
            wrap_app(cast("ASGIFramework", app), 0, "asgi"),
            config,
            sock,
            shutdown.wait,
            connections,
            name=name,
            tls=tls,
        ),
        name=name,
    )
    return Served(task, shutdown, connections)


class _StreamBuffer(StreamBuffer):
    """hypercorn's buffer of one HTTP/2 response, whose writer waits while the peer reads nothing.

    In hypercorn 0.18 a write waits (above 32 KiB buffered) until the sending side pops less than
    16 KiB, which is meant to say "the buffer is nearly empty" but also holds when the peer's
    window is 0 and nothing at all is popped: every write then returns at once, and a peer that
    never opens its window makes the stream keep everything its handler produces. Here a write
    waits until the buffer itself is below the low-water mark.
    """

    async def push(self, data: bytes) -> None:
        if self._complete:
            raise BufferCompleteError
        self.buffer.extend(data)
        await self._is_empty.clear()
        if len(self.buffer) >= BUFFER_HIGH_WATER:
            await self._paused.clear()  # a release meant for an earlier write does not count
            await self._paused.wait()

    async def pop(self, max_length: int) -> bytes:
        length = min(len(self.buffer), max_length)
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        if len(self.buffer) < BUFFER_LOW_WATER:
            await self._paused.set()
        if not self.buffer:
            await self._is_empty.set()
        return data


class _StreamBuffers(dict[int, StreamBuffer]):
    """An :class:`H2Protocol`'s ``stream_buffers`` whose new entries are :class:`_StreamBuffer`."""

    def __setitem__(self, key: int, value: StreamBuffer) -> None:
        if type(value) is StreamBuffer:
            value.__class__ = _StreamBuffer  # same layout; hypercorn builds them itself
        super().__setitem__(key, value)


def _cancelled() -> bool:
    """Whether the running task is being cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _Connection(TCPServer):
    """hypercorn's handler of one connection, with three corrections.

    Closed by the peer: hypercorn 0.18 stops reading at EOF (or a read error) but leaves the
    connection's keep-alive timer running, and only closes the socket once every task of the
    connection has ended, that timer included, so a keep-alive connection the client closed
    stayed in ``CLOSE_WAIT`` for the whole ``keep_alive_timeout``. Here the timer is stopped when
    reading ends and never started again (a request still running ends on its
    ``http.disconnect``, as before).

    HTTP/2: once the connection speaks HTTP/2 (its protocol's first write, the SETTINGS frame,
    comes before any stream), its response buffers are :class:`_StreamBuffer`; and when reading
    ends they are closed, which releases the writes still waiting on them (hypercorn left them
    waiting for ever, and the connection with them).
    """

    _reading_ended = False
    _h2_fixed = False

    async def protocol_send(self, event: Event) -> None:
        if not self._h2_fixed and type(event) is RawData:
            self._fix_h2()
        elif type(event) is Updated and event.idle and (self._reading_ended or _cancelled()):
            # Nothing can arrive any more, or the connection is being stopped (hypercorn would
            # start the timer in its task group as it shuts down, and fail): no keep-alive timer.
            return
        await super().protocol_send(event)

    def _fix_h2(self) -> None:
        protocol = self.protocol.protocol
        if isinstance(protocol, H2Protocol):
            protocol.stream_buffers = _StreamBuffers(protocol.stream_buffers)
            for buffer in protocol.stream_buffers.values():
                if type(buffer) is StreamBuffer:
                    buffer.__class__ = _StreamBuffer
            self._h2_fixed = True

    async def _read_data(self) -> None:
        await super()._read_data()
        self._reading_ended = True
        await self.idle_task.stop()
        protocol = self.protocol.protocol
        if isinstance(protocol, H2Protocol):
            # hypercorn's HTTP/2 sender stops at the connection's end without releasing the
            # responses that wait for window or for their last bytes to leave: they (and this
            # connection, which waits for them) would wait for ever.
            for buffer in list(protocol.stream_buffers.values()):
                await buffer.close()


async def _serve(
    app: AppWrapper,
    config: HypercornConfig,
    sock: socket.socket,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    connections: dict[asyncio.Task[None], asyncio.StreamWriter],
    *,
    name: str,
    tls: ssl.SSLContext | None = None,
) -> None:
    """hypercorn's ``worker_serve`` for one plain listening socket, with :class:`_Connection`.

    Lifespan startup, then accept until ``shutdown_trigger`` returns; then stop accepting, give
    the open connections ``config.graceful_timeout`` seconds, close those still open, and run
    the lifespan shutdown. ``connections`` holds every open connection's task and writer.
    """
    loop = asyncio.get_running_loop()
    state: LifespanState = {}
    lifespan = Lifespan(app, config, loop, state)
    lifespan_task = loop.create_task(lifespan.handle_lifespan(), name=f"{name}-lifespan")
    try:
        await lifespan.wait_for_startup()
        if lifespan_task.done() and (error := lifespan_task.exception()) is not None:
            raise error
    except BaseException:
        await _stop(lifespan_task)
        raise
    context = WorkerContext(None)

    def ended(task: asyncio.Task[None]) -> None:
        del connections[task]
        if not task.cancelled() and (error := task.exception()) is not None:
            _log.error("HTTP connection failed", server=name, exc_info=error)

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback: asyncio's own task for a coroutine callback logs a spurious error
        # when it is cancelled (Python 3.11), which the shutdown does to what outlives the grace.
        connection = _Connection(app, loop, config, context, state, reader, writer)
        task = loop.create_task(connection.run(), name=f"{name}-connection")
        connections[task] = writer
        task.add_done_callback(ended)

    server = await asyncio.start_server(
        connected,
        backlog=config.backlog,
        sock=sock,
        ssl=tls,
        ssl_handshake_timeout=None if tls is None else _TLS_HANDSHAKE_TIMEOUT,
    )
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(raise_shutdown(shutdown_trigger), name=f"{name}-shutdown")
            group.create_task(raise_shutdown(context.terminate.wait), name=f"{name}-terminate")
    except BaseExceptionGroup as group_error:
        _, others = group_error.split((ShutdownError, KeyboardInterrupt))
        if others is not None:
            raise others from None
    finally:
        await context.terminated.set()  # HTTP/2 connections send GOAWAY, idle ones close
        server.close()
        if connections:
            await asyncio.wait(set(connections), timeout=config.graceful_timeout)
        # The grace is over: close what is left at once (an unread response would otherwise
        # hold its socket open) and stop its handler.
        left = dict(connections)
        for task, writer in left.items():
            writer.transport.abort()
            task.cancel()
        if left:
            await asyncio.wait(left)
        await server.wait_closed()
        try:
            await lifespan.wait_for_shutdown()
        finally:
            await _stop(lifespan_task)


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it; its exception, if any, counts as retrieved."""
    task.cancel()
    await asyncio.wait((task,))
    if not task.cancelled():
        task.exception()


async def serve_on_socket(
    app: Any,
    config: HypercornConfig,
    sock: socket.socket,
    *,
    started: asyncio.Future[None],
    name: str,
) -> tuple[asyncio.Task[None], asyncio.Event]:
    """Serve ``app`` on ``sock``; return the server task and its shutdown trigger once started.

    :func:`launch` then :meth:`Served.wait_started`: on failure or cancellation hypercorn is
    stopped before the exception propagates.

    Raises:
        StartFailed: hypercorn ended first; ``started`` is cancelled. The socket is left to the
            caller (close it).
    """
    served = launch(app, config, sock, name=name)
    await served.wait_started(started)
    return served.task, served.shutdown
