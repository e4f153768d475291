"""The system status server: ``/health``, ``/live`` and ``/metrics`` over plain HTTP/1.1.

Off by default (``DYN_SYSTEM_PORT=-1``). When enabled, the runtime starts one
:class:`StatusServer` on its I/O loop. It is a deliberately small asyncio server
(``asyncio.start_server``): one request per connection (``Connection: close``), ``GET`` and
``HEAD`` only, no request bodies. That is all Kubernetes probes and Prometheus scrapers need, and it
keeps a web framework out of every worker process. Malformed or oversized requests get a 4xx answer
and only their own connection is closed; the server keeps serving.

Routes (paths from :class:`~troupe.config.SystemConfig`):

- ``health_path`` (``DYN_SYSTEM_HEALTH_PATH``, default ``/health``): readiness. 200 with
  ``{"status": "ready", "endpoints": {name: "ready"}, "uptime": seconds}`` when the
  :class:`HealthReport` is ready, else 503 with ``"status": "notready"``. A process that
  supervises worker processes adds ``"workers": {name: {"worker-0": {...}}}``: each one's
  state, pid, address and own status URL.
- ``live_path`` (``DYN_SYSTEM_LIVE_PATH``, default ``/live``): liveness. 200 ``{"status": "live"}``
  whenever the I/O loop answers.
- ``/metrics``: :meth:`RuntimeMetrics.render` in the Prometheus text format.
- anything else: 404 with a JSON body.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import itertools
import types
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import msgspec

from troupe._support._logging import get_logger
from troupe._support._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from troupe._support._metrics import RuntimeMetrics
from troupe.config import SystemConfig
from troupe.errors import ConfigError, TroupeError

__all__ = ["METRICS_PATH", "HealthReport", "HealthSource", "StatusServer"]

_log = get_logger("troupe.status")

METRICS_PATH: Final = "/metrics"

SERVING: Final = "serving"
"""The worker state that counts as ready; ``starting``, ``draining`` and ``stopped`` do not."""

_HEAD_LIMIT: Final = 16 * 1024  # request line + headers; probes send a few hundred bytes
_JSON: Final = "application/json"
_REASONS: Final[Mapping[int, str]] = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_METHODS: Final = ("GET", "HEAD")


@dataclass(frozen=True, slots=True)
class HealthReport:
    """What the runtime says about its readiness, served on the health route.

    Attributes:
        ready: whether the process should receive traffic (200 vs 503).
        endpoints: endpoint name (``ns.component.endpoint``) to worker state (``starting``,
            ``serving``, ``draining``, ``stopped``); shown as ``ready`` (``serving``) or
            ``notready`` (any other state). Read-only. An endpoint served by worker
            processes (``spawn_workers``) is ``serving`` only while every one of them serves.
        workers: endpoint name to worker process id (``worker-0``) to a JSON-ready row
            describing it, for endpoints served by worker processes; shown as is. Read-only.
    """

    ready: bool
    endpoints: Mapping[str, str] = field(default_factory=dict)
    workers: Mapping[str, Mapping[str, Mapping[str, object]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", types.MappingProxyType(dict(self.endpoints)))
        object.__setattr__(self, "workers", types.MappingProxyType(dict(self.workers)))

    @classmethod
    def from_states(
        cls,
        states: Mapping[str, str],
        *,
        running: bool = True,
        workers: Mapping[str, Mapping[str, Mapping[str, object]]] | None = None,
    ) -> HealthReport:
        """The readiness rule: ready when the runtime is running and every endpoint serves.

        A runtime with no endpoints at all is ready as soon as it runs (a client-only process
        still wants a passing probe). One endpoint still ``starting``, or ``draining`` after
        SIGTERM, makes the whole process not ready, so load balancers stop sending to it.
        """
        ready = running and all(state == SERVING for state in states.values())
        return cls(ready=ready, endpoints=states, workers=workers or {})

    def to_json(self, uptime: float) -> dict[str, object]:
        """The health body."""
        body: dict[str, object] = {
            "status": "ready" if self.ready else "notready",
            "endpoints": {
                name: "ready" if state == SERVING else "notready"
                for name, state in sorted(self.endpoints.items())
            },
            "uptime": uptime,
        }
        if self.workers:
            body["workers"] = {name: dict(rows) for name, rows in sorted(self.workers.items())}
        return body


HealthSource = Callable[[], HealthReport | Awaitable[HealthReport]]
"""Produces the current :class:`HealthReport`, called on the I/O loop for every health request.

A plain function must not block (read state the workers keep up to date); a coroutine function
may await (``ref.ask_async(...)``) and is given ``health_timeout`` seconds.
"""


class _BadRequest(Exception):
    """Internal control flow: a request to answer with a 4xx/5xx; never leaves this module."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(detail)


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = _JSON
    extra_headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, head_only: bool = False) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Unknown')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            *(f"{name}: {value}" for name, value in self.extra_headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


def _json(
    status: int, body: Mapping[str, object], extra_headers: tuple[tuple[str, str], ...] = ()
) -> _Response:
    return _Response(status, msgspec.json.encode(body), extra_headers=extra_headers)


def _parse_head(head: bytes) -> tuple[str, str]:
    """Validate a request head; returns ``(method, path)`` (query string dropped)."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400, "request head is not ASCII") from None
    request_line, *header_lines = text[:-4].split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if not method.isalpha() or not method.isupper():
        raise _BadRequest(400, "malformed method")
    if not version.startswith("HTTP/"):
        raise _BadRequest(400, "malformed HTTP version")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(505, f"unsupported version {version}")
    if not target.startswith("/"):
        raise _BadRequest(400, "request target must be an absolute path")
    for line in header_lines:
        name, sep, _ = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "malformed header line")
    return method, target.partition("?")[0]


class StatusServer:
    """``/health``, ``/live`` and ``/metrics`` for one runtime, served on its asyncio loop.

    Args:
        config: host, port (0 = OS-assigned) and route paths; ``config.port`` must not be -1.
        metrics: the runtime's metrics (``/metrics`` and the health body's uptime).
        health: produces the readiness report (see :data:`HealthSource`).
        read_timeout: seconds a client gets to send its request head (slow clients get 408).
        health_timeout: seconds an async ``health`` may take; past it the answer is 503.
    """

    def __init__(
        self,
        config: SystemConfig,
        metrics: RuntimeMetrics,
        health: HealthSource,
        *,
        read_timeout: float = 5.0,
        health_timeout: float = 2.0,
    ) -> None:
        if not config.enabled:
            raise ConfigError("DYN_SYSTEM_PORT", config.port, "a port 0..65535 (-1 disables)")
        self._config = config
        self._metrics = metrics
        self._health = health
        self._read_timeout = read_timeout
        self._health_timeout = health_timeout
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[object]] = set()
        self._counter = itertools.count(1)
        self._port: int | None = None
        self._routes: dict[str, Callable[[], Awaitable[_Response]]] = {
            METRICS_PATH: self._metrics_route,
            config.live_path: self._live_route,
            config.health_path: self._health_route,  # last: wins if an operator reuses a path
        }

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The configured bind address (``DYN_SYSTEM_HOST``)."""
        return self._config.host

    @property
    def port(self) -> int:
        """The bound port (the OS-assigned one when configured as 0); after :meth:`start`."""
        if self._port is None:
            raise TroupeError("the status server is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start accepting connections.

        Raises:
            ConfigError: the port is in use (``DYN_SYSTEM_PORT``) or the host cannot be bound
                (``DYN_SYSTEM_HOST``).
        """
        if self._server is not None:
            return
        host, port = self._config.host, self._config.port
        try:
            server = await asyncio.start_server(self._serve, host, port, limit=_HEAD_LIMIT)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    "DYN_SYSTEM_PORT",
                    port,
                    f"a free port: {host}:{port} is already in use",
                ) from exc
            raise ConfigError(
                "DYN_SYSTEM_HOST",
                host,
                f"an address this host can bind on port {port} ({exc.strerror or exc})",
            ) from exc
        self._server = server
        # With port 0 and a host that resolves to several addresses, each socket gets its own
        # port; the first is reported (use an IP address to avoid the ambiguity).
        self._port = int(server.sockets[0].getsockname()[1])
        _log.info("status server listening", url=self.url)

    async def close(self) -> None:
        """Stop listening, abort open connections and wait for their tasks to end."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        if connections:
            await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()
        _log.debug("status server closed", url=self.url)

    # --- connections ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        task.set_name(f"StatusServer-conn-{next(self._counter)}")
        self._connections.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._read_timeout)
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    writer.write(_json(400, {"error": "incomplete request"}).encode())
                return  # else: the peer connected and left
            except asyncio.LimitOverrunError:
                writer.write(_json(431, {"error": "request head too large"}).encode())
                return
            except TimeoutError:
                writer.write(_json(408, {"error": "request head not received in time"}).encode())
                return
            method = "GET"
            try:
                method, path = _parse_head(head)
                response = await self._route(method, path)
            except _BadRequest as bad:
                response = _json(bad.status, {"error": bad.detail})
            writer.write(response.encode(head_only=method == "HEAD"))
            await writer.drain()
        except ConnectionError:
            pass  # the peer went away mid-answer; nothing to tell it
        finally:
            self._connections.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    async def _route(self, method: str, path: str) -> _Response:
        handler = self._routes.get(path)
        if handler is None:
            return _json(404, {"error": "not found", "path": path})
        if method not in _METHODS:
            return _json(
                405,
                {"error": f"method {method} not allowed"},
                (("Allow", ", ".join(_METHODS)),),
            )
        return await handler()

    # --- routes --------------------------------------------------------------------------------

    async def _live_route(self) -> _Response:
        return _json(200, {"status": "live"})

    async def _metrics_route(self) -> _Response:
        return _Response(200, self._metrics.render(), METRICS_CONTENT_TYPE)

    async def _health_route(self) -> _Response:
        uptime = self._metrics.uptime_seconds()
        try:
            produced = self._health()
            if inspect.isawaitable(produced):
                report = await asyncio.wait_for(produced, self._health_timeout)
            else:
                report = produced
        except (TroupeError, TimeoutError) as exc:
            _log.warning("health check failed", error=str(exc))
            body = HealthReport(ready=False).to_json(uptime)
            body["error"] = str(exc) or type(exc).__name__
            return _json(503, body)
        return _json(200 if report.ready else 503, report.to_json(uptime))
