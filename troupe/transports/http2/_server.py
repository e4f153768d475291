"""The worker side of the HTTP/2 plane: :class:`Http2Server`, an ASGI app served by hypercorn.

On the worker, hypercorn's default of closing an HTTP/2 connection after 1,000 requests is raised
out of reach, and request bodies are collected as a list joined once. Each connection is one
caller for the admission limits, and what the worker holds for its callers beyond running
handlers (bodies being read, replies hypercorn has not sent) is bounded by ``max_buffered``
(see ``docs/request-planes.md``, "What a caller can make the worker hold").
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import sys
from typing import Final, cast

from hypercorn.config import Config as HypercornConfig

from troupe._support._hypercorn import Served, StartFailed, launch
from troupe._support._logging import get_logger
from troupe._support._net import advertised_host, detect_host, format_hostport
from troupe.config import Http2Config, HttpConfig
from troupe.errors import (
    ConfigError,
    MessageTooLarge,
    ProtocolError,
    TransportClosed,
    TransportError,
    TroupeError,
)
from troupe.messages._frames import Cancel, Error, Request, RequestId, decode
from troupe.transports._base import Server, TransportSettings
from troupe.transports.http2._exchange import (
    _FRAME_HEADERS,
    _Budget,
    _Exchange,
    _Receive,
    _respond_frame,
    _respond_text,
    _Scope,
    _Send,
)
from troupe.transports.http2._tls import server_context
from troupe.transports.http2._wire import DEFAULT_MAX_MESSAGE_SIZE, SCHEME, TLS_SCHEME

_log = get_logger("troupe.transports.http2")

# hypercorn closes an HTTP/2 connection after keep_alive_max_requests requests (default 1,000).
_UNLIMITED_REQUESTS: Final = sys.maxsize
# Seconds close() waits for the app's calls to return, after the runner has stopped every
# request (so only the last bytes of each response are still on their way).
_GRACEFUL_TIMEOUT: Final = 2.0
# The least seconds hypercorn then gets to close its connections: what is left of
# _GRACEFUL_TIMEOUT when calls were running at close() (a slow reader keeps the whole grace),
# this when none was. hypercorn closes an idle connection at once, but never counts as
# idle a connection whose last stream the caller reset (RST_STREAM before the request body
# ended: hypercorn 0.18 sends no idle update for it) and would wait for its whole
# graceful_timeout; with no call running, nothing is left to wait for.
_CLOSE_FLUSH: Final = 0.1
# The most concurrent streams a worker advertises (see _hypercorn_config).
_SERVER_MAX_STREAMS: Final = 900
# Listening backlog: bursts of callers connecting at once.
_BACKLOG: Final = 1024
# Cancels that arrived before their request, remembered so the request is refused on arrival.
_EARLY_CANCEL_MEMORY: Final = 4096
# Error replies that have no request id yet (the body was not a request).
_NO_ID: Final = 0
# Bytes the worker may hold for callers outside running handlers, by default, in largest
# messages (see Http2Server's max_buffered).
_BUFFERED_MESSAGES: Final = 8


class Http2Server(Server):
    """Serves endpoints over HTTP/2 (h2c, or TLS with ALPN h2) with hypercorn on the running loop.

    Args:
        http: host, port and root path (``DYN_HTTP_RPC_*``); with ``DYN_HTTP_RPC_TLS_CERT`` and
            ``_KEY`` it serves TLS and advertises ``https://`` (client certificates are required
            with ``DYN_HTTP_RPC_TLS_CLIENT_AUTH``; see ``docs/security.md``).
        http2: protocol settings (``DYN_HTTP2_*``); see ``docs/request-planes.md`` for which of
            them hypercorn can honour.
        max_message_size: the largest request body accepted and reply frame sent, in bytes.
        max_buffered: the most bytes held for callers outside running handlers (request bodies
            being read, replies a caller has not taken): beyond it requests are refused with
            ``Overloaded``. Default: 8 times ``max_message_size`` (256 MiB).
    """

    def __init__(
        self,
        http: HttpConfig | None = None,
        http2: Http2Config | None = None,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_buffered: int | None = None,
    ) -> None:
        super().__init__("http2")
        if max_message_size <= 0:
            raise ConfigError("max_message_size", max_message_size, "a positive number of bytes")
        if max_buffered is None:
            max_buffered = _BUFFERED_MESSAGES * max_message_size
        if max_buffered <= 0:
            raise ConfigError("max_buffered", max_buffered, "a positive number of bytes")
        self._budget = _Budget(max_buffered)
        self._http = http if http is not None else HttpConfig()
        self._http2 = http2 if http2 is not None else Http2Config()
        self._max = max_message_size
        root = self._http.root_path.rstrip("/")
        self._root = root
        self._prefix = root + "/"
        self._address: str | None = None
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._shutdown: asyncio.Event | None = None
        self._served: Served | None = None  # hypercorn's handle (its open connections)
        self._started: asyncio.Future[None] | None = None
        self._closed = False
        self._exchanges: dict[RequestId, _Exchange] = {}
        self._early_cancels: dict[RequestId, None] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._hypercorn: HypercornConfig | None = None
        self._calls = 0  # ASGI http calls running
        self._no_calls = asyncio.Event()
        self._no_calls.set()

    @property
    def address(self) -> str:
        """``http(s)://host:port/root``, with the real port (a routable host when bound to all)."""
        if self._address is None:
            raise TransportError("HTTP/2 server is not started")
        return self._address

    # --- lifecycle -------------------------------------------------------------------------------

    def _bind(self) -> tuple[socket.socket, str]:
        config = self._http
        host = config.host if config.host is not None else detect_host()
        try:
            infos = socket.getaddrinfo(
                host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError as exc:
            raise ConfigError(
                "DYN_HTTP_RPC_HOST", host, f"a host name this machine resolves ({exc})"
            ) from exc
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            # Rebinding right after a restart must not wait for TIME_WAIT; on Linux this still
            # refuses a port another socket listens on.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(sockaddr)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    "DYN_HTTP_RPC_PORT",
                    config.port,
                    f"a free port: {format_hostport(host, config.port)} is already in use; "
                    "choose another port, or set DYN_HTTP_RPC_PORT=0 to let the OS pick one",
                ) from exc
            raise ConfigError(
                "DYN_HTTP_RPC_HOST", host, f"an address this machine can bind ({exc})"
            ) from exc
        return sock, str(sockaddr[0])

    def _hypercorn_config(self) -> HypercornConfig:
        http2 = self._http2
        config = HypercornConfig()
        config.keep_alive_max_requests = _UNLIMITED_REQUESTS
        # hypercorn's priority tree refuses a 1,001st stream by failing the whole connection,
        # and a stream leaves the tree a little after h2 counts it closed: keep a margin.
        streams = min(http2.max_concurrent_streams, _SERVER_MAX_STREAMS)
        # A connection is one caller for the admission limits: a caller that reaches its limit
        # opens another connection rather than being refused.
        per_caller = self._runner.max_inflight_per_caller
        config.h2_max_concurrent_streams = min(streams, per_caller) if per_caller else streams
        # Best effort: hypercorn 0.18 does not advertise this in its SETTINGS (see the docs).
        config.h2_max_inbound_frame_size = http2.max_frame_size
        # Outlive the caller's idle pool: the caller always retires an idle connection first, so
        # it never sends a request on a connection the worker is closing.
        config.keep_alive_timeout = http2.pool_idle_timeout + http2.keep_alive_timeout
        config.graceful_timeout = _GRACEFUL_TIMEOUT
        config.backlog = _BACKLOG
        config.include_date_header = False
        config.include_server_header = False
        config.accesslog = None
        config.errorlog = logging.getLogger("troupe.transports.http2.hypercorn")
        return config

    async def start(self) -> None:
        """Bind the socket and start hypercorn on the running loop.

        Raises:
            ConfigError: the port is in use (names ``DYN_HTTP_RPC_PORT``), the host cannot be
                bound (names ``DYN_HTTP_RPC_HOST``), or a TLS file cannot be used (names its
                ``DYN_HTTP_RPC_TLS_*`` variable).
            TransportError: hypercorn failed to start.
            TransportClosed: the server was closed.
        """
        if self._closed:
            raise TransportClosed("HTTP/2 server is closed")
        if self._task is not None:
            return
        tls = server_context(self._http)  # before binding: a bad file leaves nothing behind
        sock, bound = self._bind()
        port = int(sock.getsockname()[1])
        loop = asyncio.get_running_loop()
        self._sock = sock
        started = self._started = loop.create_future()
        self._hypercorn = self._hypercorn_config()
        # Owned before anything is awaited: a close() during the start-up stops it.
        served = launch(self._asgi, self._hypercorn, sock, name=f"http2-server-{port}", tls=tls)
        self._task, self._shutdown, self._served = served.task, served.shutdown, served
        try:
            await served.wait_started(started)  # stops hypercorn itself if this fails
        except StartFailed as exc:
            self._forget(served)
            if self._closed:
                raise TransportClosed("HTTP/2 server was closed while starting") from exc.cause
            raise TransportError(f"HTTP/2 server failed to start: {exc.cause!r}") from exc.cause
        except BaseException:
            self._forget(served)
            raise
        if self._closed:  # close() ran during the start-up and stops hypercorn
            raise TransportClosed("HTTP/2 server was closed while starting")
        host = format_hostport(advertised_host(bound), port)
        self._address = f"{SCHEME if tls is None else TLS_SCHEME}://{host}{self._root}"
        _log.debug("HTTP/2 server listening", address=self._address, bound=bound)

    async def close(self, grace: float = 0.0) -> None:
        """Stop serving: running requests get ``grace`` seconds, then callers get StreamBroken."""
        if self._closed:
            return
        self._closed = True
        writing = self._calls > 0  # responses may still be on their way to a slow reader
        await self._runner.close(grace)
        for exchange in list(self._exchanges.values()):
            exchange.abort()
        task, self._task = self._task, None
        if task is not None:
            assert self._shutdown is not None
            flush = _CLOSE_FLUSH
            if writing or self._calls:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + _GRACEFUL_TIMEOUT
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await self._no_calls.wait()
                # Their last bytes may still be on their way to a slow reader, who keeps what
                # is left of the grace (see _CLOSE_FLUSH).
                flush = max(_CLOSE_FLUSH, deadline - loop.time())
            if self._hypercorn is not None:
                # Read by hypercorn when the shutdown starts.
                self._hypercorn.graceful_timeout = flush
            self._shutdown.set()
            await asyncio.wait((task,))
            if not task.cancelled() and task.exception() is not None:
                _log.error("HTTP/2 server stopped with an error", exc_info=task.exception())
        if self._watchers:
            for watcher in self._watchers:
                watcher.cancel()
            await asyncio.wait(self._watchers)
        if self._sock is not None:
            self._sock.close()  # hypercorn closed it already; closing again is harmless
            self._sock = None

    def _forget(self, served: Served) -> None:
        """A failed or cancelled start-up: hypercorn has stopped; drop it and the socket."""
        if self._task is served.task:
            self._task = self._shutdown = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # --- the ASGI app ----------------------------------------------------------------------------

    async def _asgi(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        kind = scope["type"]
        if kind == "http":
            self._calls += 1
            self._no_calls.clear()
            try:
                await self._http_call(scope, receive, send)
            finally:
                self._calls -= 1
                if not self._calls:
                    self._no_calls.set()
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        # Anything else (a websocket) is refused by returning: hypercorn closes it.

    async def _lifespan(self, receive: _Receive, send: _Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
                if self._started is not None and not self._started.done():
                    self._started.set_result(None)
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http_call(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        # Read the whole body first, whatever the answer: hypercorn fails the whole connection
        # if DATA arrives for a stream whose app already finished.
        body = await self._read_body(receive)
        if body is None:
            return  # the caller went away
        data, size = body
        if scope["method"] != "POST":
            await _respond_text(send, 405, "only POST is served here")
            return
        path = scope["path"]
        if not path.startswith(self._prefix):
            await _respond_text(send, 404, f"no troupe endpoints under {path!r}")
            return
        if size > self._max:
            exc: TroupeError = MessageTooLarge(size, self._max)
            await _respond_frame(send, 413, Error(_NO_ID, "MessageTooLarge", str(exc)))
            return
        if data is None:  # not kept: the worker holds too much for its callers already
            await _respond_frame(send, 503, self._refuse_buffered(_NO_ID))
            return
        try:
            frame = decode(data)
        except ProtocolError as exc:
            await _respond_frame(send, 400, Error(_NO_ID, "ProtocolError", str(exc)))
            return
        del data  # the request holds the payload from here
        kind = type(frame)
        if kind is Request:
            await self._serve(cast(Request, frame), scope.get("client"), receive, send)
        elif kind is Cancel:
            self._cancel(cast(Cancel, frame).id)
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            message = f"expected a Request or Cancel frame, got {kind.__name__}"
            await _respond_frame(send, 400, Error(_NO_ID, "ProtocolError", message))

    async def _read_body(self, receive: _Receive) -> tuple[bytes | None, int] | None:
        """The request body (``None``: not kept) and its size; ``None`` if the caller left.

        Past the size limit, or once the bodies being read would exceed ``max_buffered``, the
        rest is read and dropped (hypercorn fails the connection if a stream's DATA outlives
        its answer); the body is counted in the budget while it is read.
        """
        chunks: list[bytes] = []
        size = 0
        limit = self._max
        budget = self._budget
        counted = 0
        kept = True
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return None
                piece = message.get("body", b"")
                size += len(piece)
                if kept and size <= limit:
                    if budget.take_body(len(piece)):
                        counted += len(piece)
                        chunks.append(piece)
                    else:
                        kept = False
                        chunks.clear()
                elif chunks:
                    chunks.clear()
                if not message.get("more_body", False):
                    break
            return (b"".join(chunks) if kept else None), size
        finally:
            budget.bodies -= counted

    def _refuse_buffered(self, rid: RequestId) -> Error:
        """Count and build the refusal of a request while the budget is exceeded."""
        self.metrics.add_refused("buffered")
        budget = self._budget
        message = (
            f"worker holds {budget.held} bytes for its callers (limit {budget.limit}); retry later"
        )
        return Error(rid, "Overloaded", message)

    async def _serve(
        self, request: Request, caller: object, receive: _Receive, send: _Send
    ) -> None:
        """Run ``request`` for ``caller`` (its connection: one caller for admission limits)."""
        rid = request.id
        if rid in self._exchanges:
            message = f"duplicate request id {rid!r}"
            await _respond_frame(send, 409, Error(rid, "ProtocolError", message))
            return
        if rid in self._early_cancels:
            del self._early_cancels[rid]
            await _respond_frame(send, 200, Error(rid, "Cancelled", "cancelled before it started"))
            return
        if self._budget.exceeded:
            await _respond_frame(send, 200, self._refuse_buffered(rid))
            return
        await send({"type": "http.response.start", "status": 200, "headers": _FRAME_HEADERS})
        loop = asyncio.get_running_loop()
        exchange = _Exchange(send, self._max, self._budget, loop)
        refusal = self._runner.start(rid, request, exchange.send, caller)
        if refusal is not None:
            try:
                await exchange.send(refusal)
            finally:
                self._budget.replies -= exchange.stranded
            return
        self._exchanges[rid] = exchange
        watcher = loop.create_task(
            self._watch(receive, rid, exchange), name=f"http2-disconnect-{rid}"
        )
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        try:
            await exchange.done
            if not exchange.clean:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if not exchange.closed:  # this call itself was cancelled (hypercorn shutting down)
                exchange.abort()
                self._runner.cancel(rid, "disconnected")
            if self._exchanges.get(rid) is exchange:
                del self._exchanges[rid]
            watcher.cancel()
            self._budget.replies -= exchange.stranded  # hypercorn has let go of the stream

    async def _watch(self, receive: _Receive, rid: RequestId, exchange: _Exchange) -> None:
        """After the body, only ``http.disconnect`` can arrive: the stream is gone."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not exchange.closed:
                    exchange.abort()
                    self._runner.cancel(rid, "disconnected")
                return

    def _cancel(self, rid: RequestId) -> None:
        exchange = self._exchanges.get(rid)
        if exchange is not None:
            if not exchange.closed:
                exchange.abort()
            # Even while its last frame is written: it may wait for a window the caller never
            # opens, and the request's place in the admission limits with it.
            self._runner.cancel(rid, "cancelled")
            return
        # The cancel overtook its request (or the request already finished): remember it.
        early = self._early_cancels
        early[rid] = None
        if len(early) > _EARLY_CANCEL_MEMORY:
            del early[next(iter(early))]


def create_server(settings: TransportSettings) -> Http2Server:
    """An HTTP/2 server configured by ``settings.request_plane.http`` and ``.http2``."""
    plane = settings.request_plane
    return Http2Server(plane.http, plane.http2)
