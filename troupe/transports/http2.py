"""The HTTP/2 request plane (``http://host:port/root``): hypercorn on the worker, h2 on the caller.

The worker serves an ASGI app with hypercorn on the caller's running event loop (the runtime's I/O
loop), on a socket it binds itself, so port 0 reports the real port and a taken port fails with
one clear error. Both ends speak HTTP/2 with prior knowledge (h2c); plain HTTP/1.1 is served too,
for debugging with ``curl``.

Wire format: ``POST {root}/{endpoint}`` carries one msgpack-encoded
:class:`~troupe.transports._codec.Request`; the response body is a stream of length-prefixed reply
frames (``Chunk``... then ``End`` or ``Error``) written as the handler produces them.
``POST {root}/_cancel`` carries a :class:`~troupe.transports._codec.Cancel`. The body decides what
a POST means (the path is for people and proxies), so an endpoint may even be called ``_cancel``.
A stream that goes away (reset, or its connection closed: ``http.disconnect``) cancels its
request too.

The caller does not use httpx/httpcore, whose HTTP/2 client has defects that break a streaming
request plane (details in ``docs/request-planes.md``):

* with two or more idle response streams open on a connection, httpcore parks the frames of the
  others until more traffic arrives, so a new request's headers can wait forever;
* a response abandoned early sends no ``RST_STREAM``; its unread DATA eats the connection's
  flow-control window until the whole connection stalls;
* one large ``bytes`` body uploads in quadratic time.

Instead :class:`Http2Client` drives ``h2`` (the sans-IO HTTP/2 state machine httpx uses as well)
from one :class:`asyncio.Protocol` per connection: every frame is handled as it arrives, DATA is
acknowledged at once, an abandoned response is cancelled and drained (or reset), and bodies are
sent frame by frame from a ``memoryview``. It also honours the ``DYN_HTTP2_*`` settings that
httpx cannot: frame size, streams per connection, windows and keep-alive pings.

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
import functools
import itertools
import logging
import secrets
import socket
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, TypeAlias, cast
from urllib.parse import quote, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hypercorn.config import Config as HypercornConfig

from troupe._hypercorn import Served, StartFailed, launch
from troupe.config import Http2Config, HttpConfig
from troupe.errors import (
    ConfigError,
    ConnectionLost,
    ConnectTimeout,
    DeadlineExceeded,
    MessageTooLarge,
    ProtocolError,
    RequestTimeout,
    StreamBroken,
    TransportClosed,
    TransportError,
    TroupeError,
    UnknownEndpoint,
)
from troupe.transports._base import Client, ResponseStream, Server, TransportSettings
from troupe.transports._codec import (
    PREFIX_SIZE,
    Cancel,
    Chunk,
    End,
    Error,
    FrameBuffer,
    Reply,
    Request,
    RequestId,
    decode,
    encode,
    encode_framed,
    encode_request,
)
from troupe.transports._net import advertised_host, detect_host, format_hostport, split_address

__all__ = [
    "CANCEL_PATH",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "FRAMES_CONTENT_TYPE",
    "SCHEME",
    "Http2Client",
    "Http2Server",
    "create_client",
    "create_server",
]

SCHEME: Final = "http"
CANCEL_PATH: Final = "_cancel"
"""The path segment (under the root path) that cancel messages are posted to."""
DEFAULT_MAX_MESSAGE_SIZE: Final = 32 * 1024 * 1024
"""Largest encoded request or reply frame, in bytes (no ``DYN_HTTP_*`` setting exists for it)."""
DEFAULT_CONNECT_TIMEOUT: Final = 3.0
"""Seconds to wait for a connection (no ``DYN_HTTP_*`` setting exists for it)."""

FRAMES_CONTENT_TYPE: Final = b"application/vnd.troupe.frames"
"""The content type of request bodies and of response bodies that carry reply frames."""

_log = logging.getLogger("troupe.transports.http2")

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
# Bytes of a non-frame error body kept for the error message.
_ERROR_BODY_PREVIEW: Final = 512
# Flow-control windows the caller grants: RFC 9113's default, and the large one used when
# DYN_HTTP2_ADAPTIVE_WINDOW is on (h2 cannot size windows by measured bandwidth-delay product).
_DEFAULT_WINDOW: Final = 65_535
_LARGE_WINDOW: Final = 16 * 1024 * 1024
# Seconds a worker may keep sending after a Cancel before the caller resets the stream.
_DRAIN_LIMIT: Final = 5.0
# Seconds Http2Client.close waits for its sockets to close.
_CLOSE_WAIT: Final = 2.0
_PING_DATA: Final = b"troupe\x00\x00"

_FRAME_HEADERS: Final = [(b"content-type", FRAMES_CONTENT_TYPE)]
_TEXT_HEADERS: Final = [(b"content-type", b"text/plain; charset=utf-8")]

_Scope: TypeAlias = Mapping[str, Any]
_Message: TypeAlias = Mapping[str, Any]
_Receive: TypeAlias = Callable[[], Awaitable[_Message]]
_Send: TypeAlias = Callable[[dict[str, Any]], Awaitable[None]]


# --- worker side -------------------------------------------------------------------------------


class _Budget:
    """The bytes the worker holds for its callers beyond what running handlers hold themselves.

    :attr:`bodies`: request bodies while they are read; a piece that would take them over
    :attr:`limit` is refused (the request is then answered ``Overloaded``). :attr:`replies`:
    reply frames handed to hypercorn that it has not taken yet (a caller that grants no
    flow-control window leaves them there; after a cancel or a stop they stay until the stream
    or the connection ends); never refused, their writers wait (bounded by the admission
    limits). New requests are refused while the two together reach the limit, but a body
    (a ``Cancel`` among them, which lets replies go) is still read while bodies alone fit.
    """

    __slots__ = ("bodies", "limit", "replies")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bodies = 0
        self.replies = 0

    def take_body(self, size: int) -> bool:
        """Count ``size`` more bytes of bodies if they fit under the limit; whether they did."""
        if self.bodies + size > self.limit:
            return False
        self.bodies += size
        return True

    @property
    def held(self) -> int:
        """Bytes counted now."""
        return self.bodies + self.replies

    @property
    def exceeded(self) -> bool:
        """Whether the bytes held have reached the limit."""
        return self.bodies + self.replies >= self.limit


class _Exchange:
    """The response side of one request being served: writes reply frames into its HTTP body.

    The request's runner task writes chunks; the final frame (``End``/``Error``, or a ``Chunk``
    with ``end``) ends the body.
    A cancel or disconnect closes the exchange without a final frame; the ASGI call that owns it
    then ends the body itself. Either way :attr:`done` resolves exactly once.

    Each frame counts in the server's :class:`_Budget` while hypercorn has not taken it; a write
    that did not return (cancelled, failed) leaves its frame counted in :attr:`stranded` until
    the ASGI call ends.
    """

    __slots__ = ("_budget", "_limit", "_send", "clean", "closed", "done", "stranded")

    def __init__(
        self, send: _Send, limit: int, budget: _Budget, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._send = send
        self._limit = limit
        self._budget = budget
        self.closed = False  # no more frames may be written
        self.clean = False  # the body was ended by a final frame that was fully handed over
        self.stranded = 0  # bytes of writes that never returned: hypercorn may still hold them
        self.done: asyncio.Future[None] = loop.create_future()

    async def send(self, frame: Reply) -> bool:
        """The runner's :data:`~troupe.transports.SendReply` for this request."""
        if self.closed:
            return False
        ok = True
        try:
            data = encode_framed(frame)
            size = len(data) - PREFIX_SIZE
        except MessageTooLarge as huge:  # beyond the 4 GiB a prefix can announce
            data, size = b"", huge.size
        if size > self._limit or not data:
            too_large = MessageTooLarge(size, self._limit)
            data = encode_framed(Error(frame.id, "MessageTooLarge", str(too_large)))
            ok = False
        elif type(frame) is Chunk and not frame.end:
            budget = self._budget
            budget.replies += len(data)
            try:
                await self._send({"type": "http.response.body", "body": data, "more_body": True})
            except BaseException:
                self.stranded += len(data)
                raise
            budget.replies -= len(data)
            return not self.closed
        self.closed = True
        clean = False
        budget = self._budget
        budget.replies += len(data)
        try:
            await self._send({"type": "http.response.body", "body": data, "more_body": False})
            clean = True
        finally:
            if clean:
                budget.replies -= len(data)
            else:
                self.stranded += len(data)
            self._finish(clean)
        return ok

    def abort(self) -> None:
        """Stop writing; the owner ends the body (unless a final frame is being written)."""
        if not self.closed:
            self.closed = True
            self._finish(False)

    def _finish(self, clean: bool) -> None:
        if not self.done.done():
            self.clean = clean
            self.done.set_result(None)


class Http2Server(Server):
    """Serves endpoints over HTTP/2 (h2c) with hypercorn on the running event loop.

    Args:
        http: host, port and root path (``DYN_HTTP_RPC_*``).
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
        """``http://host:port/root``, with the real port (a routable host when bound to all)."""
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
            ConfigError: the port is in use (names ``DYN_HTTP_RPC_PORT``) or the host cannot be
                bound (names ``DYN_HTTP_RPC_HOST``).
            TransportError: hypercorn failed to start.
            TransportClosed: the server was closed.
        """
        if self._closed:
            raise TransportClosed("HTTP/2 server is closed")
        if self._task is not None:
            return
        sock, bound = self._bind()
        port = int(sock.getsockname()[1])
        loop = asyncio.get_running_loop()
        self._sock = sock
        started = self._started = loop.create_future()
        self._hypercorn = self._hypercorn_config()
        # Owned before anything is awaited: a close() during the start-up stops it.
        served = launch(self._asgi, self._hypercorn, sock, name=f"http2-server-{port}")
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
        self._address = f"{SCHEME}://{host}{self._root}"
        _log.debug("HTTP/2 server listening on %s (bound %s)", self._address, bound)

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


async def _respond_frame(send: _Send, status: int, frame: Error) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _FRAME_HEADERS})
    await send({"type": "http.response.body", "body": encode_framed(frame), "more_body": False})


async def _respond_text(send: _Send, status: int, text: str) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _TEXT_HEADERS})
    await send({"type": "http.response.body", "body": text.encode(), "more_body": False})


# --- caller side -------------------------------------------------------------------------------
#
# The caller speaks HTTP/2 through a small protocol class on ``h2`` (the sans-IO HTTP/2 state
# machine that httpx uses too) instead of httpx/httpcore. httpcore lets each open response read
# the socket in turn behind one FIFO lock, so once two idle streams are open the frames of a third
# stay parked until more traffic arrives: a new request's headers can wait forever (reproduced
# with plain httpx + hypercorn; see docs/request-planes.md). Here one protocol object per
# connection reads every frame as it arrives and hands it to its request at once.

_Failure: TypeAlias = tuple[type[TransportError], str]
"""How a stream failed: the error class (built with the caller's address) and its message."""


class _Sink:
    """What a connection feeds the frames of one HTTP/2 stream into (a no-op by default)."""

    __slots__ = ()

    def on_headers(self, status: int, content_type: bytes) -> None:
        """The response headers arrived."""

    def on_data(self, data: bytes) -> None:
        """A piece of the response body arrived."""

    def on_end(self) -> None:
        """The response body ended."""

    def on_broken(self, failure: _Failure) -> None:
        """The stream failed (reset, connection lost, client closed)."""


_IGNORE: Final = _Sink()
"""The sink of cancel messages: their ``204`` answer is read and dropped."""


class _Call(_Sink):
    """The caller's side of one request: turns its response body into the stream's frames.

    It holds its :class:`ResponseStream` weakly, like the other planes: a stream the caller drops
    without closing is cancelled when its next frame arrives.
    """

    __slots__ = (
        "address",
        "cancel_path",
        "cancelled",
        "conn",
        "endpoint",
        "error",
        "framed",
        "frames",
        "preview",
        "request_id",
        "reset_timer",
        "started",
        "status",
        "stream_id",
        "stream_ref",
        "uploaded",
    )

    def __init__(
        self,
        request_id: str,
        address: str,
        endpoint: str,
        *,
        started: asyncio.Future[None],
        max_size: int,
        cancel_path: bytes,
    ) -> None:
        self.request_id = request_id
        self.address = address
        self.endpoint = endpoint
        self.stream_ref: weakref.ref[ResponseStream] | None = None
        self.started = started  # resolved once the response headers arrived, or on failure
        self.cancel_path = cancel_path
        self.error: TroupeError | None = None
        self.frames = FrameBuffer(max_size)
        self.framed = False
        self.status = 0
        self.preview = b""
        self.conn: _Connection | None = None
        self.stream_id = 0
        self.uploaded = False
        self.cancelled = False
        self.reset_timer: asyncio.TimerHandle | None = None

    def _stream(self) -> ResponseStream | None:
        ref = self.stream_ref
        return None if ref is None else ref()

    def fail(self, exc: TroupeError) -> None:
        """Report ``exc`` to whoever waits: the ``request`` call, else the stream's reader."""
        if not self.started.done():
            self.error = exc
            self.started.set_result(None)
        stream = self._stream()
        if stream is not None:
            stream.fail(exc)

    def on_headers(self, status: int, content_type: bytes) -> None:
        self.status = status
        if content_type == FRAMES_CONTENT_TYPE:
            self.framed = True
            if not self.started.done():
                self.started.set_result(None)

    def on_data(self, data: bytes) -> None:
        if not self.framed:
            if len(self.preview) < _ERROR_BODY_PREVIEW:
                self.preview += data[: _ERROR_BODY_PREVIEW - len(self.preview)]
            return
        stream = self._stream()
        if stream is None:
            self.cancel()  # dropped without being closed: nobody reads this any more
            return
        if stream.finished:
            return  # abandoned or failed: the rest is only drained
        try:
            received = self.frames.feed(data)
        except (ProtocolError, MessageTooLarge) as exc:
            exc.address = self.address
            stream.fail(exc)
            return
        for frame in received:
            if type(frame) is Chunk or type(frame) is End or type(frame) is Error:
                stream.deliver(frame)
            else:
                message = f"unexpected {type(frame).__name__} frame in a response"
                stream.fail(ProtocolError(message, address=self.address))

    def on_end(self) -> None:
        self.stop_reset_timer()
        address = self.address
        if not self.framed:
            # Not a frame stream: a proxy, a wrong root path, or not a troupe worker at all.
            if self.status == 404:
                self.fail(UnknownEndpoint(self.endpoint, address=address))
            else:
                text = self.preview.decode("utf-8", "replace")
                message = f"HTTP {self.status} from {address}: {text}"
                self.fail(ProtocolError(message, address=address))
            return
        stream = self._stream()
        if stream is None or stream.finished:
            return
        try:
            self.frames.close()
        except ProtocolError as exc:
            exc.address = address
            stream.fail(exc)
            return
        message = f"response from {address} ended before the request finished"
        stream.fail(StreamBroken(message, address=address))

    def on_broken(self, failure: _Failure) -> None:
        self.stop_reset_timer()
        kind, message = failure
        self.fail(kind(message, address=self.address))

    def cancel(self) -> None:
        """The caller gave up (the stream's ``cancel`` callback): tell the worker; never blocks."""
        if not self.cancelled and self.conn is not None:
            self.cancelled = True
            self.conn.cancel(self)

    def stop_reset_timer(self) -> None:
        """Forget the pending reset of an abandoned stream."""
        if self.reset_timer is not None:
            self.reset_timer.cancel()
            self.reset_timer = None


_CONNECTING: Final = "connecting"
_OPEN: Final = "open"
_DRAINING: Final = "draining"  # GOAWAY received or closing: no new streams, open ones finish
_CLOSED: Final = "closed"


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection to one worker (``host:port``), carrying many requests.

    Every frame is read in :meth:`data_received` and handed to its stream's sink at once. Received
    DATA is acknowledged immediately (the caller buffers it), so flow control never stalls a
    response, and a request abandoned by its caller is drained rather than left to eat the window.
    """

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self.authority = pool.authority
        self._settings = pool.settings
        self.loop = asyncio.get_running_loop()
        self.state = _CONNECTING
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.ready.add_done_callback(_consume_exception)
        self.gone: asyncio.Future[None] = self.loop.create_future()
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self._transport: asyncio.Transport | None = None
        self._sinks: dict[int, _Sink] = {}
        self.reserved = 0  # requests waiting for this connection to open
        self._window_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._failure: _Failure | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"<HTTP/2 connection to {self.authority} {self.state} streams={len(self._sinks)}>"

    # --- capacity --------------------------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether another request may be started here."""
        if self.state not in (_OPEN, _CONNECTING):
            return False
        limit = min(self._settings.max_concurrent_streams, self._remote_limit())
        return len(self._sinks) + self.reserved < limit

    def _remote_limit(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    @property
    def idle(self) -> bool:
        """Open and carrying no request."""
        return self.state == _OPEN and not self._sinks and not self.reserved

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass, hence no isinstance).
        stream_transport = cast(asyncio.Transport, transport)
        if self.state != _CONNECTING:  # closed while connecting
            stream_transport.abort()
            return
        self._transport = stream_transport
        settings = self._settings
        window = _LARGE_WINDOW if settings.adaptive_window else _DEFAULT_WINDOW
        codes = h2.settings.SettingCodes
        h2c = self._h2
        h2c.initiate_connection()
        h2c.update_settings(
            {
                codes.ENABLE_PUSH: 0,
                codes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                codes.INITIAL_WINDOW_SIZE: window,
                codes.MAX_FRAME_SIZE: settings.max_frame_size,
            }
        )
        if window > _DEFAULT_WINDOW:
            h2c.increment_flow_control_window(window - _DEFAULT_WINDOW)
        self._flush()
        # Requests wait for the worker's SETTINGS (its stream limit): h2 treats streams beyond
        # an advertised limit as a connection error, which would fail every request at once.

    def _on_settings(self) -> None:
        """The worker's first SETTINGS arrived: the connection is ready for requests."""
        self.state = _OPEN
        if not self.ready.done():
            self.ready.set_result(None)
        self._ping_timer = self.loop.call_later(self._settings.keep_alive_interval, self._ping)

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.abort((StreamBroken, f"HTTP/2 protocol error from {self.authority}: {exc}"))
            return
        sinks = self._sinks
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                assert isinstance(event, h2.events.DataReceived)
                sid = event.stream_id or 0
                if event.flow_controlled_length:
                    self._h2.acknowledge_received_data(event.flow_controlled_length, sid)
                sink = sinks.get(sid)
                if sink is not None and event.data:
                    sink.on_data(event.data)
            elif kind is h2.events.ResponseReceived:
                assert isinstance(event, h2.events.ResponseReceived)
                sink = sinks.get(event.stream_id or 0)
                if sink is not None:
                    sink.on_headers(*_status_and_type(event.headers or ()))
            elif kind is h2.events.StreamEnded:
                assert isinstance(event, h2.events.StreamEnded)
                sink = sinks.pop(event.stream_id or 0, None)
                if sink is not None:
                    sink.on_end()
            elif kind is h2.events.StreamReset:
                assert isinstance(event, h2.events.StreamReset)
                sink = sinks.pop(event.stream_id or 0, None)
                if sink is not None:
                    sink.on_broken(self._reset_failure(event))
            elif kind is h2.events.WindowUpdated:
                self._wake_senders()
            elif kind is h2.events.RemoteSettingsChanged:
                if self.state == _CONNECTING and self._transport is not None:
                    self._on_settings()
                self._wake_senders()
            elif kind is h2.events.PingAckReceived:
                self._on_pong()
            elif kind is h2.events.ConnectionTerminated:
                assert isinstance(event, h2.events.ConnectionTerminated)
                self._on_goaway(event)
        self._flush()
        self._maybe_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f": {exc}" if exc is not None else " (closed by the worker)"
        self._fail_all(
            self._failure or (StreamBroken, f"connection to {self.authority} lost{detail}")
        )
        self._transport = None
        self._pool.forget(self)
        self._gone()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake(self._write_waiter)
        self._write_waiter = None

    # --- sending ---------------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)

    def _open_stream(self, sink: _Sink, path: bytes, size: int) -> int:
        """Send the headers of a new POST stream; its body follows.

        Raises:
            ConnectionLost: the connection cannot take a new stream.
        """
        if self.state != _OPEN:
            raise self._unavailable()
        h2c = self._h2
        try:
            sid = h2c.get_next_available_stream_id()
            h2c.send_headers(
                sid,
                [
                    (b":method", b"POST"),
                    (b":scheme", b"http"),
                    (b":authority", self.authority.encode()),
                    (b":path", path),
                    (b"content-type", FRAMES_CONTENT_TYPE),
                    (b"content-length", b"%d" % size),
                ],
            )
        except h2.exceptions.NoAvailableStreamIDError:
            self.close()  # stream ids used up: retire this connection
            raise self._unavailable() from None
        except h2.exceptions.TooManyStreamsError:
            raise self._unavailable() from None
        self._sinks[sid] = sink
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        return sid

    def _unavailable(self) -> TransportError:
        kind, message = self._failure or (
            ConnectionLost,
            f"HTTP/2 connection to {self.authority} is closing",
        )
        return kind(message)

    def _send_some(self, sid: int, body: memoryview) -> int:
        """Send as much of ``body`` as flow control allows now; returns the bytes sent."""
        h2c = self._h2
        sent = 0
        total = len(body)
        while sent < total:
            room = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
            if room <= 0:
                break
            piece = body[sent : sent + room]
            sent += len(piece)
            h2c.send_data(sid, piece.tobytes(), end_stream=sent == total)
        self._flush()
        return sent

    async def send_request(self, call: _Call, path: bytes, body: bytes) -> None:
        """Open a stream for ``call`` and upload ``body``, waiting for flow-control window.

        Raises:
            ConnectionLost: the connection cannot take new streams.
        """
        sid = self._open_stream(call, path, len(body))
        call.conn = self
        call.stream_id = sid
        if not body:
            self._h2.end_stream(sid)
            self._flush()
            call.uploaded = True
            return
        view = memoryview(body)
        offset = 0
        while True:
            try:
                offset += self._send_some(sid, view[offset:])
            except h2.exceptions.StreamClosedError:
                return  # reset meanwhile: the call has heard already
            if offset >= len(view):
                call.uploaded = True
                return
            if sid not in self._sinks:  # answered or failed before the whole body left
                self.reset(sid)
                return
            if self._write_paused:
                if self._write_waiter is None or self._write_waiter.done():
                    self._write_waiter = self.loop.create_future()
                await self._write_waiter
            else:
                if self._window_waiter is None or self._window_waiter.done():
                    self._window_waiter = self.loop.create_future()
                await self._window_waiter

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_senders(self) -> None:
        self._wake(self._window_waiter)
        self._window_waiter = None

    # --- cancelling ------------------------------------------------------------------------------

    def cancel(self, call: _Call) -> None:
        """Ask the worker to stop ``call`` with a ``Cancel`` message; its response is drained.

        Before the whole body is sent, or when no cancel can be sent here, the stream is reset
        instead: the worker sees the stream go away, which stops the request too.
        """
        sid = call.stream_id
        if sid not in self._sinks:
            return
        if not call.uploaded or not self.has_room():
            self.reset(sid)
            return
        try:
            self.send_message(_IGNORE, call.cancel_path, encode(Cancel(call.request_id)))
        except TransportError:
            self.reset(sid)
            return
        # A worker that does not end the response soon after is cut off.
        call.reset_timer = self.loop.call_later(_DRAIN_LIMIT, self.reset, sid)

    def send_message(self, sink: _Sink, path: bytes, body: bytes) -> None:
        """Send a small POST whose answer goes to ``sink``; never waits.

        Raises:
            ConnectionLost: the connection cannot take it now.
        """
        sid = self._open_stream(sink, path, len(body))
        if self._send_some(sid, memoryview(body)) < len(body):
            self.reset(sid)  # no window even for a few bytes: the worker is not reading
            raise self._unavailable()

    def reset(self, sid: int) -> None:
        """Reset stream ``sid`` (RST_STREAM CANCEL) and forget it."""
        sink = self._sinks.pop(sid, None)
        if isinstance(sink, _Call):
            sink.stop_reset_timer()
        if self.state == _CLOSED or self._transport is None:
            return
        try:
            self._h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.StreamClosedError:
            pass  # it ended meanwhile
        self._flush()
        self._maybe_idle()

    # --- keep-alive, idling, closing -------------------------------------------------------------

    def _ping(self) -> None:
        self._ping_timer = None
        if self.state not in (_OPEN, _DRAINING):
            return
        if not self._sinks:  # no keep-alive pings while idle (hyper's default as well)
            self._ping_timer = self.loop.call_later(self._settings.keep_alive_interval, self._ping)
            return
        self._h2.ping(_PING_DATA)
        self._flush()
        self._pong_timer = self.loop.call_later(self._settings.keep_alive_timeout, self._no_pong)

    def _on_pong(self) -> None:
        if self._pong_timer is not None:
            self._pong_timer.cancel()
            self._pong_timer = None
            self._ping_timer = self.loop.call_later(self._settings.keep_alive_interval, self._ping)

    def _no_pong(self) -> None:
        self._pong_timer = None
        timeout = self._settings.keep_alive_timeout
        message = f"{self.authority} did not answer a keep-alive ping within {timeout:g} s"
        self.abort((StreamBroken, message))

    def _maybe_idle(self) -> None:
        if self._sinks or self.reserved or self.state == _CLOSED:
            return
        if self.state == _DRAINING:
            self.close()
        elif self._idle_timer is None:
            if self._pool.idle_count() > self._settings.pool_max_idle_per_host:
                self.close()
            else:
                self._idle_timer = self.loop.call_later(
                    self._settings.pool_idle_timeout, self.close
                )

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        """The worker is going away: streams it never saw fail with ConnectionLost (retryable)."""
        self.state = _DRAINING
        self._pool.forget(self)
        last = event.last_stream_id or 0
        message = f"{self.authority} closed the connection before the request reached it"
        for sid in [sid for sid in self._sinks if sid > last]:
            self._sinks.pop(sid).on_broken((ConnectionLost, message))

    def _reset_failure(self, event: h2.events.StreamReset) -> _Failure:
        code = event.error_code
        if code == h2.errors.ErrorCodes.REFUSED_STREAM:
            return ConnectionLost, f"{self.authority} refused the request"
        return StreamBroken, f"{self.authority} reset the stream ({code!r})"

    def _fail_all(self, failure: _Failure) -> None:
        if self._failure is None:
            self._failure = failure
        for timer in (self._idle_timer, self._ping_timer, self._pong_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._ping_timer = self._pong_timer = None
        if not self.ready.done():
            kind, message = failure
            # Nothing was sent yet: the request may safely go elsewhere.
            self.ready.set_exception(
                (TransportClosed if kind is TransportClosed else ConnectionLost)(message)
            )
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink.on_broken(failure)
        self._wake_senders()
        self._wake(self._write_waiter)
        self._write_waiter = None

    def close(self) -> None:
        """Close politely: GOAWAY, then the socket. Streams still open fail."""
        if self.state == _CLOSED or self._closing:
            return
        self._closing = True
        self.state = _DRAINING
        self._pool.forget(self)
        transport = self._transport
        if transport is None:
            self._fail_all(self._failure or (ConnectionLost, "connection closed"))
            self._gone()
            return
        try:
            self._h2.close_connection()
            self._flush()
        except h2.exceptions.ProtocolError:
            pass
        transport.close()

    def _gone(self) -> None:
        self.state = _CLOSED
        if not self.gone.done():
            self.gone.set_result(None)

    def abort(self, failure: _Failure) -> None:
        """Drop the connection at once: every open stream fails with ``failure`` now."""
        self.state = _DRAINING
        self._pool.forget(self)
        self._fail_all(failure)
        transport = self._transport
        if transport is not None:
            transport.abort()
        else:
            self._gone()


def _consume_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _status_and_type(headers: Iterable[tuple[bytes | str, bytes | str]]) -> tuple[int, bytes]:
    status = 0
    content_type = b""
    for name, value in headers:
        raw = value if isinstance(value, bytes) else value.encode()
        if name == b":status":
            status = int(raw)
        elif name == b"content-type":
            content_type = raw
    return status, content_type


class _Pool:
    """The connections of one client to one ``host:port``."""

    __slots__ = ("authority", "conns", "host", "live", "port", "settings")

    def __init__(self, host: str, port: int, settings: Http2Config) -> None:
        self.host = host
        self.port = port
        self.authority = format_hostport(host, port)
        self.settings = settings
        self.conns: list[_Connection] = []  # those taking new requests
        self.live: set[_Connection] = set()  # every connection not yet closed

    def forget(self, conn: _Connection) -> None:
        """``conn`` takes no new requests any more."""
        if conn in self.conns:
            self.conns.remove(conn)

    def buried(self, conn: _Connection, gone: asyncio.Future[None]) -> None:
        """``conn`` is closed for good."""
        self.live.discard(conn)

    def idle_count(self) -> int:
        """Open connections carrying no request."""
        return sum(1 for conn in self.conns if conn.idle)


class _Target:
    """A worker address, parsed once: its pool and the paths posted to."""

    __slots__ = ("cancel_path", "pool", "prefix")

    def __init__(self, pool: _Pool, prefix: bytes) -> None:
        self.pool = pool
        self.prefix = prefix  # b"/v1/rpc/"
        self.cancel_path = prefix + CANCEL_PATH.encode()


class Http2Client(Client):
    """Calls workers over HTTP/2 (h2c, prior knowledge), pooling connections per ``host:port``.

    Many requests share one connection, up to ``DYN_HTTP2_MAX_CONCURRENT_STREAMS`` (or the
    worker's own limit, if lower); beyond that another connection is opened.

    Args:
        http: ``request_timeout`` (``DYN_HTTP_REQUEST_TIMEOUT``): the longest wait for the
            response headers, then for each next frame.
        http2: frame size, streams per connection, windows, pool and keep-alive settings
            (``DYN_HTTP2_*``).
        max_message_size: the largest request sent and reply frame accepted, in bytes.
        connect_timeout: seconds to wait for a connection.
    """

    def __init__(
        self,
        http: HttpConfig | None = None,
        http2: Http2Config | None = None,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        if max_message_size <= 0:
            raise ConfigError("max_message_size", max_message_size, "a positive number of bytes")
        if connect_timeout <= 0:
            raise ConfigError("connect_timeout", connect_timeout, "a positive number of seconds")
        self._config = http if http is not None else HttpConfig()
        self._http2 = http2 if http2 is not None else Http2Config()
        self._max = max_message_size
        self._connect_timeout = connect_timeout
        self._prefix = secrets.token_hex(6) + "-"  # request ids unique across callers
        self._ids = itertools.count(1)
        self._targets: dict[str, _Target] = {}
        self._pools: dict[tuple[str, int], _Pool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def _target(self, address: str) -> _Target:
        target = self._targets.get(address)
        if target is None:
            host, port = split_address(address, SCHEME)
            parts = urlsplit(address)
            if parts.query or parts.fragment:
                raise TransportError(f"malformed http address {address!r}", address=address)
            pool = self._pools.get((host, port))
            if pool is None:
                pool = self._pools[host, port] = _Pool(host, port, self._http2)
            prefix = quote(parts.path.rstrip("/"), safe="/") + "/"
            target = self._targets[address] = _Target(pool, prefix.encode())
        return target

    async def _connection(self, pool: _Pool, address: str) -> _Connection:
        """A connection of ``pool`` with room for one more request (opened if need be)."""
        while True:
            for conn in pool.conns:
                if conn.has_room():
                    break
            else:
                conn = self._open(pool)
            if conn.state != _CONNECTING:
                return conn
            conn.reserved += 1
            try:
                await asyncio.shield(conn.ready)
            except ConnectTimeout:
                raise ConnectTimeout(address, self._connect_timeout) from None
            except TransportError as exc:
                raise type(exc)(f"{exc} ({address})", address=address) from None
            finally:
                conn.reserved -= 1
            if conn.has_room():
                return conn
            # The worker allows fewer streams than requests were waiting: look again.

    def _open(self, pool: _Pool) -> _Connection:
        conn = _Connection(pool)
        pool.conns.append(conn)
        pool.live.add(conn)
        conn.gone.add_done_callback(functools.partial(pool.buried, conn))
        task = asyncio.get_running_loop().create_task(
            self._connect(conn), name=f"http2-connect-{pool.authority}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    async def _connect(self, conn: _Connection) -> None:
        pool = conn._pool
        try:
            async with asyncio.timeout(self._connect_timeout):
                await asyncio.get_running_loop().create_connection(
                    lambda: conn, pool.host, pool.port
                )
                await asyncio.shield(conn.ready)  # the worker's SETTINGS
        except TimeoutError:
            if not conn.ready.done():
                conn.ready.set_exception(ConnectTimeout(pool.authority, self._connect_timeout))
            conn.abort((ConnectionLost, f"connect to {pool.authority} timed out"))
        except OSError as exc:
            conn.abort((ConnectionLost, f"cannot connect to {pool.authority}: {exc}"))
        except TransportError:
            pass  # lost during the handshake: the waiters hear it from conn.ready
        except asyncio.CancelledError:
            conn.abort((TransportClosed, "HTTP/2 client closed"))
            raise

    async def request(
        self,
        address: str,
        endpoint: str,
        payload: bytes,
        *,
        deadline: float | None = None,
        headers: Mapping[str, str] | None = None,
        attempt: int = 0,
        received: int = 0,
    ) -> ResponseStream:
        """Send a request to the worker at ``http://host:port/root``; see :meth:`Client.request`.

        Returns once the worker accepted the request (its response headers arrived).

        Raises:
            MessageTooLarge: the encoded request exceeds ``max_message_size``; nothing was sent.
            ConnectTimeout: no connection within the connect timeout.
            ConnectionLost: the worker cannot be reached, or closed the connection before the
                request reached it (safe to retry).
            RequestTimeout: no response headers within ``DYN_HTTP_REQUEST_TIMEOUT``.
            DeadlineExceeded: the deadline passed before the response headers arrived.
            StreamBroken: the connection failed after the request was sent.
            TransportClosed: the client is closed.
        """
        if self._closed:
            raise TransportClosed("HTTP/2 client is closed", address=address)
        target = self._target(address)
        rid = f"{self._prefix}{next(self._ids)}"
        data = encode_request(
            rid,
            endpoint,
            payload,
            deadline=deadline,
            headers=headers,
            attempt=attempt,
            received=received,
        )
        if len(data) > self._max:
            raise MessageTooLarge(len(data), self._max, address=address)
        timeout = self._config.request_timeout
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()
        call = _Call(
            rid,
            address,
            endpoint,
            started=started,
            max_size=self._max,
            cancel_path=target.cancel_path,
        )
        stream = ResponseStream(
            rid,
            address=address,
            endpoint=endpoint,
            cancel=call.cancel,
            request_timeout=timeout,
            deadline=deadline,
        )
        call.stream_ref = weakref.ref(stream)
        limit = timeout if deadline is None else min(timeout, deadline - time.time())
        path = target.prefix + quote(endpoint, safe="").encode()
        waiting = asyncio.timeout(max(limit, 0.0))
        try:
            async with waiting:
                conn = await self._connection(target.pool, address)
                await conn.send_request(call, path, data)
                await started
        except TransportError as exc:  # before TimeoutError: ConnectTimeout is one too
            call.cancel()
            if exc.address is None:
                exc.address = address
            raise
        except TimeoutError:
            if not waiting.expired():
                raise
            call.cancel()
            if deadline is not None and time.time() >= deadline:
                message = f"deadline passed waiting for {endpoint!r} at {address}"
                raise DeadlineExceeded(message, address=address) from None
            raise RequestTimeout(address, timeout) from None
        except asyncio.CancelledError:
            call.cancel()
            raise
        if call.error is not None:
            raise call.error
        return stream

    async def close(self) -> None:
        """Fail open streams with ``TransportClosed`` and close every connection."""
        if self._closed:
            return
        self._closed = True
        conns = [conn for pool in self._pools.values() for conn in pool.live]
        for conn in conns:
            conn.abort((TransportClosed, "HTTP/2 client closed"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        waits: list[asyncio.Future[None]] = [*tasks, *(conn.gone for conn in conns)]
        if waits:
            await asyncio.wait(waits, timeout=_CLOSE_WAIT)
        self._pools.clear()
        self._targets.clear()


def create_server(settings: TransportSettings) -> Http2Server:
    """An HTTP/2 server configured by ``settings.request_plane.http`` and ``.http2``."""
    plane = settings.request_plane
    return Http2Server(plane.http, plane.http2)


def create_client(settings: TransportSettings) -> Http2Client:
    """An HTTP/2 client configured by ``settings.request_plane.http`` and ``.http2``."""
    plane = settings.request_plane
    return Http2Client(plane.http, plane.http2)
