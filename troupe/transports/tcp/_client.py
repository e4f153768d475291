"""The caller side of the TCP plane: :class:`TcpClient`, pooled DEALER sockets per worker.

A caller keeps up to ``DYN_TCP_POOL_SIZE`` DEALER sockets per worker address (see
:mod:`~troupe.transports.tcp._connection`) and multiplexes many requests on each by request id.
It refuses an oversized or malformed request before sending it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Final

import zmq

from troupe._support._net import split_address
from troupe.config import TcpConfig
from troupe.errors import TransportClosed
from troupe.transports._base import Client, ResponseStream, TimeoutSweep, TransportSettings
from troupe.transports._session import RequestIds, SessionStream
from troupe.transports.tcp._connection import _Connection
from troupe.transports.tcp._pump import SCHEME

# A caller opens another connection to the same worker (up to DYN_TCP_POOL_SIZE) once every
# open one carries this many requests.
_STREAMS_PER_CONNECTION: Final = 512
# How long a closing client's last Cancel frames may take to leave (seconds).
_CLOSE_LINGER: Final = 0.5


class TcpClient(Client):
    """Calls workers over ZeroMQ; one pool of DEALER sockets per worker address.

    Args:
        config: pool size, timeouts, message size limit and queue bound (``DYN_TCP_*``).
    """

    def __init__(self, config: TcpConfig | None = None) -> None:
        self.config = config if config is not None else TcpConfig()
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._pools: dict[str, list[_Connection]] = {}
        self._ids = RequestIds()  # shared by the connections' sessions
        self._sweep: TimeoutSweep | None = None
        self._closed = False

    def _connection(self, address: str, host: str) -> _Connection:
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = []
        best: _Connection | None = None
        load = 0
        for conn in pool:
            conn_load = len(conn.session) + conn.waiting
            if best is None or conn_load < load:
                best, load = conn, conn_load
        if best is not None and (
            load < _STREAMS_PER_CONNECTION or len(pool) >= self.config.pool_size
        ):
            return best
        if self._ctx is None:
            self._ctx = zmq.Context(io_threads=1)
        conn = _Connection(self, self._ctx, address, host, self._ids)
        pool.append(conn)
        return conn

    def _forget_connection(self, conn: _Connection) -> None:
        pool = self._pools.get(conn.address)
        if pool is not None and conn in pool:
            pool.remove(conn)
            if not pool:
                del self._pools[conn.address]

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
        """Send a request to the worker at ``tcp://host:port``; see :meth:`Client.request`.

        Raises:
            InvalidRequest: the arguments do not make a request a worker can decode (headers
                that are not strings, a payload that is not bytes...); nothing was sent.
            MessageTooLarge: the encoded request exceeds ``DYN_TCP_MAX_MESSAGE_SIZE``.
            ConnectTimeout: no connection within ``DYN_TCP_CONNECT_TIMEOUT``.
            RequestTimeout: ``DYN_TCP_CHANNEL_BUFFER`` frames stayed queued for
                ``DYN_TCP_REQUEST_TIMEOUT``.
            ConnectionLost: the connection dropped while sending.
            TransportClosed: the client is closed.
        """
        if self._closed:
            raise TransportClosed("TCP client is closed", address=address)
        pool = self._pools.get(address)
        host = pool[0].host if pool else split_address(address, SCHEME)[0]
        rid, data = self._ids.encode(
            address,
            endpoint,
            payload,
            deadline=deadline,
            headers=headers,
            attempt=attempt,
            received=received,
            limit=self.config.max_message_size,
            variable="DYN_TCP_MAX_MESSAGE_SIZE",
        )
        conn = self._connection(address, host)
        if conn.state == "connecting":
            # A burst from a fresh client spreads over the pool as it would once connected
            # (a worker admits a bounded number of requests per connection).
            conn.waiting += 1
            try:
                await asyncio.shield(conn.ready)
            finally:
                conn.waiting -= 1
        sweep = self._sweep
        if sweep is None:
            sweep = self._sweep = TimeoutSweep(asyncio.get_running_loop())
        stream = conn.session.open(
            SessionStream(
                rid,
                address=address,
                endpoint=endpoint,
                request_timeout=self.config.request_timeout,
                deadline=deadline,
                sweep=sweep,
            )
        )
        if conn.try_send(data):
            return stream
        try:
            await conn.send(data)
        except BaseException:
            conn.session.forget(rid)
            raise
        return stream

    async def close(self) -> None:
        """Fail open streams with ``TransportClosed``, tell their workers to stop (``Cancel``),
        and close every socket."""
        if self._closed:
            return
        self._closed = True
        for pool in list(self._pools.values()):
            for conn in list(pool):
                conn.cancel_open()
                conn.close(
                    TransportClosed("TCP client closed", address=conn.address), _CLOSE_LINGER
                )
        self._pools.clear()
        if self._sweep is not None:
            self._sweep.close()
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            await asyncio.to_thread(ctx.term)


def create_client(settings: TransportSettings) -> TcpClient:
    """A TCP client configured by ``settings.request_plane.tcp``."""
    return TcpClient(settings.request_plane.tcp)
