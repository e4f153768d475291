"""The :class:`Frontend`: hypercorn serving the Starlette app on the caller's event loop.

The frontend's event loop (the main thread under ``troupe frontend``, the test's loop in tests)
is not the runtime's I/O loop: HTTP parsing and SSE framing stay off the thread that owns the
request-plane sockets, and ``Router.generate`` bridges the two without blocking either.

The socket is bound before hypercorn starts (so port 0 works and :attr:`Frontend.port` is the
real one); hypercorn runs as one task owned by the frontend. :meth:`Frontend.close` drains first:
``/health`` answers 503 and new generations 503 while in-flight ones get ``grace`` seconds,
then hypercorn stops (cancelling what is left, which cancels those requests on their workers).

With :attr:`FrontendSettings.tls` the frontend serves HTTPS: its TLS context is built before
anything else starts (a bad file is a ConfigError naming the option) and its URLs say
``https``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import sys
import types
from collections.abc import AsyncIterator
from typing import Final

from hypercorn.config import Config as HypercornConfig
from starlette.applications import Starlette

from troupe._support._hypercorn import Served, StartFailed, launch
from troupe._support._logging import get_logger
from troupe.errors import ConfigError, TroupeError
from troupe.frontend._app import FrontendSettings, FrontendState, build_app, route_options
from troupe.frontend._metrics import FrontendMetrics
from troupe.frontend._models import ModelRegistry
from troupe.runtime import Runtime

__all__ = ["Frontend"]

_log = get_logger("troupe.frontend")

_BACKLOG: Final = 1024
# Every-interface addresses, and the loopback address that reaches such a socket from its host.
_LOOPBACK: Final = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
# Seconds hypercorn waits for connections at shutdown, after the frontend has drained.
_GRACEFUL_TIMEOUT: Final = 1.0


def _http_url(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class Frontend:
    """The OpenAI-compatible HTTP frontend of one runtime.

    Use ``async with Frontend(rt, settings) as fe:`` on any event loop (or :meth:`start` and
    :meth:`close`). One frontend per runtime: its metrics live in the runtime's registry.

    Args:
        rt: a running runtime (discovery and request plane from its configuration).
        settings: host, port, HTTPS and API key, routing and shutdown settings.
    """

    def __init__(self, rt: Runtime, settings: FrontendSettings | None = None) -> None:
        self.rt = rt
        self.settings = settings if settings is not None else FrontendSettings()
        self.metrics = FrontendMetrics(rt.metrics.registry)
        self.registry = ModelRegistry(
            rt,
            policy=self.settings.router_mode,
            kv=self.settings.kv,
            idle=self.settings.router_idle,
            options=route_options(self.settings, self.metrics),
        )
        self.state = FrontendState(rt, self.registry, self.metrics, self.settings)
        self._started: asyncio.Future[None] | None = None
        self.app: Starlette = build_app(self.state, lifespan=self._lifespan)
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._shutdown: asyncio.Event | None = None
        self._served: Served | None = None  # hypercorn's handle (its open connections)
        self._port = 0
        self._bound_host: str | None = None  # the address the socket is bound to, once it is
        self._closed = False

    @property
    def port(self) -> int:
        """The bound port (the OS's choice when the settings say 0)."""
        return self._port

    @property
    def scheme(self) -> str:
        """``https`` when the settings name TLS files, else ``http``."""
        return "http" if self.settings.tls is None else "https"

    @property
    def bound_url(self) -> str:
        """``http://host:port`` (``https`` with TLS) as bound: the socket's own address and
        port (``0.0.0.0`` or ``[::]`` when bound to every interface; the OS's port when the
        settings say 0)."""
        host = self._bound_host if self._bound_host is not None else self.settings.host
        return _http_url(self.scheme, host, self._port)

    @property
    def url(self) -> str:
        """``http://host:port`` (``https`` with TLS) to reach the frontend from this host:
        :attr:`bound_url`, with the loopback address in place of an every-interface one."""
        host = self._bound_host if self._bound_host is not None else self.settings.host
        return _http_url(self.scheme, _LOOPBACK.get(host, host), self._port)

    @property
    def listening(self) -> str:
        """Where the frontend listens, in words: :attr:`bound_url`, followed by :attr:`url`
        when they differ (``http://0.0.0.0:8000 (every interface); from this host:
        http://127.0.0.1:8000``)."""
        bound, url = self.bound_url, self.url
        return bound if bound == url else f"{bound} (every interface); from this host: {url}"

    async def start(self) -> Frontend:
        """Watch discovery for models, bind the socket and start serving.

        Raises:
            ConfigError: the port is in use, the host cannot be bound, or a TLS file is
                missing or invalid.
            TroupeError: hypercorn failed to start.
        """
        if self._task is not None or self._closed:
            raise TroupeError("the frontend was already started")
        settings = self.settings
        tls = None if settings.tls is None else settings.tls.server_context()
        kv = settings.kv
        if settings.router_mode == "kv" and (kv is None or not kv.approximate or kv.replica_sync):
            # KV events: reach the event plane now, so an unreachable NATS is a start-up error.
            await asyncio.to_thread(lambda: self.rt.event_plane)
        await asyncio.to_thread(self.registry.start)  # opens the store once (blocking)
        try:
            if self._closed:
                raise TroupeError("the frontend was closed while starting")
            sock = self._bind()
        except BaseException:
            await asyncio.to_thread(self.registry.close)  # its actors must not outlive us
            raise
        bound = sock.getsockname()
        self._bound_host, self._port = str(bound[0]), int(bound[1])
        self._sock = sock
        loop = asyncio.get_running_loop()
        started = self._started = loop.create_future()
        # Owned before anything is awaited: a close() during the start-up stops it.
        served = launch(
            self.app, self._hypercorn_config(), sock, name=f"frontend-http-{self._port}", tls=tls
        )
        self._task, self._shutdown, self._served = served.task, served.shutdown, served
        try:
            await served.wait_started(started)  # stops hypercorn itself if this fails
        except BaseException as exc:
            if self._task is served.task:
                self._task = self._shutdown = None
            if self._sock is sock:
                self._sock = None
            sock.close()
            await asyncio.to_thread(self.registry.close)
            if not isinstance(exc, StartFailed):
                raise
            if self._closed:
                raise TroupeError("the frontend was closed while starting") from exc.cause
            raise TroupeError(f"frontend failed to start: {exc.cause!r}") from exc.cause
        if self._closed:  # close() ran during the start-up and stops hypercorn
            raise TroupeError("the frontend was closed while starting")
        _log.info("frontend listening", bound=self.bound_url, url=self.url)
        return self

    async def drain(self, grace: float | None = None) -> bool:
        """Refuse new generations (503) and wait for those in flight; ``True`` if all ended."""
        self.state.draining = True
        wait = self.settings.grace if grace is None else grace
        return await self.state.wait_idle(wait)

    async def close(self, grace: float | None = None) -> None:
        """Drain (up to ``grace`` seconds), stop hypercorn, stop watching discovery."""
        if self._closed:
            return
        self._closed = True
        # Taken together now: a start-up failing meanwhile drops both (and stops hypercorn).
        task, shutdown = self._task, self._shutdown
        try:
            if task is not None and shutdown is not None:
                if not await self.drain(grace):
                    _log.warning("closing with generations in flight", count=self.state.inflight)
                shutdown.set()
                self._task = None
                await asyncio.wait((task,))
                if not task.cancelled() and task.exception() is not None:
                    _log.error("frontend server stopped with an error", exc_info=task.exception())
        finally:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            await asyncio.to_thread(self.registry.close)

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (or the server task ends), then :meth:`close`."""
        task = self._task
        if task is None:
            raise TroupeError("the frontend is not started")
        stopper = asyncio.create_task(stop.wait(), name="frontend-stop-wait")
        try:
            await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            await asyncio.wait((stopper,))
            await self.close()

    async def __aenter__(self) -> Frontend:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.close()

    # --- internals ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self._started is not None and not self._started.done():
            self._started.set_result(None)
        yield

    def _bind(self) -> socket.socket:
        host, port = self.settings.host, self.settings.port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise ConfigError("--host", host, f"a host name this machine resolves ({exc})") from exc
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    "--port", port, f"a free port: {host}:{port} is in use (0 lets the OS pick)"
                ) from exc
            raise ConfigError("--host", host, f"an address this machine can bind ({exc})") from exc
        return sock

    def _hypercorn_config(self) -> HypercornConfig:
        config = HypercornConfig()
        config.keep_alive_max_requests = sys.maxsize
        config.graceful_timeout = _GRACEFUL_TIMEOUT
        config.backlog = _BACKLOG
        config.include_server_header = False
        config.accesslog = None
        config.errorlog = logging.getLogger("troupe.frontend.hypercorn")
        return config
