"""Running an ASGI app under hypercorn on a socket we bound, on the running loop.

Shared by the HTTP/2 request plane's server and the OpenAI frontend: both bind their own socket
(so port 0 and bind errors are theirs to report), then need hypercorn serving it, a way to know
that the app's lifespan startup ran, and a shutdown trigger.
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

__all__ = ["StartFailed", "serve_on_socket"]


class StartFailed(Exception):
    """hypercorn ended before the app's lifespan startup ran; ``cause`` is why (or None)."""

    def __init__(self, cause: BaseException | None) -> None:
        self.cause = cause
        super().__init__(repr(cause))


async def serve_on_socket(
    app: Any,
    config: HypercornConfig,
    sock: socket.socket,
    *,
    started: asyncio.Future[None],
    name: str,
) -> tuple[asyncio.Task[None], asyncio.Event]:
    """Serve ``app`` on ``sock``; return the server task and its shutdown trigger once started.

    ``started`` must be resolved by the app's lifespan startup. Setting the returned event
    stops hypercorn gracefully (``config.graceful_timeout``); await the task afterwards.

    Raises:
        StartFailed: hypercorn ended first; ``started`` is cancelled. The socket is left to the
            caller (close it).
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
    await asyncio.wait((task, started), return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        started.cancel()
        raise StartFailed(task.exception())
    return task, shutdown
