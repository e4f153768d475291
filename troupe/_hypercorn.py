"""Running an ASGI app under hypercorn on a socket we bound, on the running loop.

Shared by the HTTP/2 request plane's server and the OpenAI frontend: both bind their own socket
(so port 0 and bind errors are theirs to report), then need hypercorn serving it, a way to know
that the app's lifespan startup ran, and a shutdown trigger.

:func:`launch` hands back the :class:`Served` handle *before* anything is awaited, so the caller
owns the task from the start: a ``close()`` that runs while the start-up is awaited finds it, and
a cancelled start-up stops it (:meth:`Served.wait_started`).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.typing import ASGIFramework
from hypercorn.utils import wrap_app

__all__ = ["Served", "StartFailed", "launch", "serve_on_socket"]


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

    __slots__ = ("shutdown", "task")

    def __init__(self, task: asyncio.Task[None], shutdown: asyncio.Event) -> None:
        self.task = task
        self.shutdown = shutdown

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


def launch(app: Any, config: HypercornConfig, sock: socket.socket, *, name: str) -> Served:
    """Start serving ``app`` on ``sock`` in a new task named ``name``; the caller owns it.

    Nothing is awaited: store the handle, then :meth:`Served.wait_started`.
    """
    shutdown = asyncio.Event()
    task = asyncio.get_running_loop().create_task(
        worker_serve(
            wrap_app(cast("ASGIFramework", app), 0, "asgi"),
            config,
            sockets=Sockets([], [sock], []),
            shutdown_trigger=shutdown.wait,
        ),
        name=name,
    )
    return Served(task, shutdown)


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
