"""The caller side of the HTTP/2 plane: :class:`Http2Client`, its connections pooled per worker.

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
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import ssl
import time
from collections.abc import Mapping
from typing import Final
from urllib.parse import quote, urlsplit

from troupe._support._logging import get_logger
from troupe._support._net import format_hostport, split_address
from troupe.config import Http2Config, HttpConfig
from troupe.errors import (
    ConfigError,
    ConnectionLost,
    ConnectTimeout,
    DeadlineExceeded,
    RequestTimeout,
    TlsError,
    TransportClosed,
    TransportError,
)
from troupe.messages._frames import Cancel
from troupe.transports._base import Client, ResponseStream, TransportSettings
from troupe.transports._session import CallerSession, RequestIds
from troupe.transports.http2._call import _Call, _Http2Stream
from troupe.transports.http2._connection import _CONNECTING, _Connection
from troupe.transports.http2._tls import client_context, lost
from troupe.transports.http2._wire import (
    CANCEL_PATH,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
    SCHEME,
    TLS_SCHEME,
)

# Seconds Http2Client.close waits for its sockets to close.
_CLOSE_WAIT: Final = 2.0

_log = get_logger("troupe.transports.http2")


class _Pool:
    """The connections of one client to one ``host:port`` (with TLS when ``tls`` is set)."""

    __slots__ = ("authority", "client_cert", "conns", "host", "live", "port", "settings", "tls")

    def __init__(
        self,
        host: str,
        port: int,
        settings: Http2Config,
        tls: ssl.SSLContext | None = None,
        *,
        client_cert: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.authority = format_hostport(host, port)
        self.settings = settings
        self.tls = tls
        self.client_cert = client_cert  # the caller presents a client certificate
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
    """Calls workers over HTTP/2, pooling connections per ``host:port``.

    ``http://`` workers are called with h2c (prior knowledge); ``https://`` ones over TLS (ALPN
    h2), verified against ``DYN_HTTP_RPC_TLS_CA``, presenting ``DYN_HTTP_RPC_TLS_CLIENT_CERT``
    when it is set.

    Many requests share one connection, up to ``DYN_HTTP2_MAX_CONCURRENT_STREAMS`` (or the
    worker's own limit, if lower); beyond that another connection is opened.

    Args:
        http: ``request_timeout`` (``DYN_HTTP_REQUEST_TIMEOUT``): the longest wait for the
            response headers, then for each next frame; the ``DYN_HTTP_RPC_TLS_*`` files.
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
        # The open requests, by id; ids carry a random prefix: unique across callers.
        self._session: CallerSession[_Http2Stream] = CallerSession(
            self._cancel, ids=RequestIds(secrets.token_hex(6) + "-"), log=_log
        )
        self._targets: dict[str, _Target] = {}
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._tls: ssl.SSLContext | None = None  # built at the first https:// address
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def _target(self, address: str) -> _Target:
        target = self._targets.get(address)
        if target is None:
            parts = urlsplit(address)
            scheme = TLS_SCHEME if parts.scheme == TLS_SCHEME else SCHEME
            host, port = split_address(address, scheme)
            if parts.query or parts.fragment:
                raise TransportError(f"malformed http address {address!r}", address=address)
            pool = self._pools.get((scheme, host, port))
            if pool is None:
                tls = self._tls_context(address) if scheme == TLS_SCHEME else None
                has_cert = self._config.tls_client_cert is not None
                pool = _Pool(host, port, self._http2, tls, client_cert=has_cert)
                self._pools[scheme, host, port] = pool
            prefix = quote(parts.path.rstrip("/"), safe="/") + "/"
            target = self._targets[address] = _Target(pool, prefix.encode())
        return target

    def _tls_context(self, address: str) -> ssl.SSLContext:
        """The context ``https://`` workers are dialled with, built once.

        Raises:
            TlsError: ``DYN_HTTP_RPC_TLS_CA`` is unset.
            ConfigError: a TLS file cannot be used.
        """
        if self._tls is None:
            try:
                self._tls = client_context(self._config)
            except TlsError as exc:
                raise TlsError(f"{exc} ({address})", address=address, setting=exc.setting) from None
        return self._tls

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
            except TlsError as exc:  # names the worker already
                raise TlsError(str(exc), address=address, setting=exc.setting) from None
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
                    lambda: conn,
                    pool.host,
                    pool.port,
                    ssl=pool.tls,
                    server_hostname=None if pool.tls is None else pool.host,
                )
                await asyncio.shield(conn.ready)  # the worker's SETTINGS
        except (ssl.SSLError, ConnectionResetError) as exc:  # OSErrors: before them
            if pool.tls is None:
                conn.abort((ConnectionLost, f"cannot connect to {pool.authority}: {exc}"))
                return
            # The handshake failed, or the worker dropped it (a refused client certificate).
            error = lost(exc, pool.authority, has_client_cert=pool.client_cert)
            if not conn.ready.done():
                conn.ready.set_exception(error)
            conn.abort((TlsError, str(error)))
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
        """Send a request to the worker at ``http(s)://host:port/root``; see :meth:`Client.request`.

        Returns once the worker accepted the request (its response headers arrived).

        Raises:
            TlsError: an ``https://`` worker cannot be reached over TLS: no
                ``DYN_HTTP_RPC_TLS_CA``, or the handshake was refused (untrusted or expired
                certificate, client certificate missing or refused); the message names the
                setting to check.
            ConfigError: a ``DYN_HTTP_RPC_TLS_*`` file cannot be used.
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
        session = self._session
        rid, data = session.ids.encode(
            address,
            endpoint,
            payload,
            deadline=deadline,
            headers=headers,
            attempt=attempt,
            received=received,
            limit=self._max,
        )
        assert isinstance(rid, str)  # a prefix makes string ids
        timeout = self._config.request_timeout
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()
        call = _Call(
            rid,
            address,
            endpoint,
            session=session,
            started=started,
            max_size=self._max,
            cancel_path=target.cancel_path,
        )
        stream = _Http2Stream(
            rid,
            address=address,
            endpoint=endpoint,
            request_timeout=timeout,
            deadline=deadline,
        )
        stream.call = call
        session.open(stream)
        limit = timeout if deadline is None else min(timeout, deadline - time.time())
        path = target.prefix + quote(endpoint, safe="").encode()
        waiting = asyncio.timeout(max(limit, 0.0))
        try:
            async with waiting:
                conn = await self._connection(target.pool, address)
                await conn.send_request(call, path, data)
                await started
        except TransportError as exc:  # before TimeoutError: ConnectTimeout is one too
            self._abandon(call)
            if exc.address is None:
                exc.address = address
            raise
        except TimeoutError:
            if not waiting.expired():
                raise
            self._abandon(call)
            if deadline is not None and time.time() >= deadline:
                message = f"deadline passed waiting for {endpoint!r} at {address}"
                raise DeadlineExceeded(message, address=address) from None
            raise RequestTimeout(address, timeout) from None
        except asyncio.CancelledError:
            self._abandon(call)
            raise
        if call.error is not None:
            session.forget(rid)
            raise call.error
        return stream

    def _abandon(self, call: _Call) -> None:
        """The request fails before its stream is returned: stop it, forget it."""
        call.cancel()
        self._session.forget(call.request_id)

    def _cancel(self, stream: _Http2Stream, cancel: Cancel) -> None:
        """The session's hook: a caller gave up its stream; its call tells the worker."""
        stream.call.cancel()

    async def close(self) -> None:
        """Fail open streams with ``TransportClosed`` and close every connection."""
        if self._closed:
            return
        self._closed = True
        self._session.fail_all(
            lambda stream: TransportClosed("HTTP/2 client closed", address=stream.address)
        )
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


def create_client(settings: TransportSettings) -> Http2Client:
    """An HTTP/2 client configured by ``settings.request_plane.http`` and ``.http2``."""
    plane = settings.request_plane
    return Http2Client(plane.http, plane.http2)
