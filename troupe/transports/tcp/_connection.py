"""The caller side of the TCP plane, per socket: one DEALER to one worker, many requests on it.

Requests are multiplexed on the socket by request id; the bookkeeping is the connection's
:class:`~troupe.transports._session.CallerSession` (a frame the caller cannot decode fails that
one stream; a reply nobody reads is answered with ``Cancel``). A stream its caller drops without
closing it is forgotten when it is collected, and the worker is told to stop (``Cancel``) at once.
A socket monitor reports handshakes (connect timeout) and disconnects (a dead worker fails its
open streams with ``StreamBroken`` at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import operator
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

import zmq

from troupe._support._logging import get_logger
from troupe.config import TcpConfig
from troupe.errors import (
    ConnectionLost,
    ConnectionRefused,
    ConnectTimeout,
    RequestTimeout,
    StreamBroken,
    TransportError,
)
from troupe.messages._frames import Cancel, RequestId, encode
from troupe.transports._session import (
    CallerSession,
    RequestIds,
    SessionStream,
    StreamRef,
    collect_on,
)
from troupe.transports.tcp._pump import (
    _HEARTBEAT_IVL_MS,
    _HEARTBEAT_TIMEOUT_MS,
    _batch_bytes,
    _is_ipv6,
    _Pump,
)

if TYPE_CHECKING:
    from troupe.transports.tcp._client import TcpClient

_log = get_logger("troupe.transports.tcp")

# While connecting, these mean the attempt failed: libzmq would retry in silence until the connect
# timeout; a caller wants the refusal (a dead worker's port) at once, to go elsewhere.
_CONNECT_FAILED: Final = frozenset(
    int(e)
    for e in (
        zmq.EVENT_CONNECT_RETRIED,
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
        zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    )
)
_MONITOR_EVENTS: Final = functools.reduce(
    operator.or_,
    _CONNECT_FAILED,
    int(zmq.EVENT_HANDSHAKE_SUCCEEDED) | int(zmq.EVENT_DISCONNECTED),
)


class _Connection:
    """One DEALER socket to one worker, carrying many requests."""

    def __init__(
        self,
        client: TcpClient,
        ctx: zmq.Context[zmq.Socket[bytes]],
        address: str,
        host: str,
        ids: RequestIds,
    ) -> None:
        config = client.config
        self.client = client
        self.address = address
        self.host = host
        self.loop = asyncio.get_running_loop()
        # The requests open on this socket. A stream its caller dropped without closing it is
        # collected, and _dropped (on the loop) forgets it and sends Cancel.
        self.session: CallerSession[SessionStream] = CallerSession(
            self._send_cancel,
            ids=ids,
            on_collected=collect_on(self.loop, self._dropped),
            log=_log.bind(address=address),
        )
        self.state = "connecting"
        self.waiting = 0  # requests waiting for the handshake: they count as this one's load
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.ready.add_done_callback(_consume_exception)
        sock, monitor = _open_dealer(ctx, config, address, host)
        self.pump = _Pump(
            self.loop,
            sock,
            self._on_message,
            limit=config.channel_buffer,
            batch_bytes=_batch_bytes(config),
            single_part=True,
        )
        self.monitor = _Pump(self.loop, monitor, self._on_monitor)
        self._timer: asyncio.TimerHandle | None = self.loop.call_later(
            config.connect_timeout, self._connect_timed_out
        )
        try:
            sock.connect(address)
        except zmq.ZMQError as exc:
            error = ConnectionLost(f"cannot connect to {address}: {exc}", address=address)
            self.close(error)
            raise error from exc

    # --- state ---

    def _connect_timed_out(self) -> None:
        self._timer = None
        if self.state == "connecting":
            self.close(ConnectTimeout(self.address, self.client.config.connect_timeout))

    def _on_monitor(self, parts: list[bytes]) -> None:
        if len(parts) < 2 or len(parts[0]) < 6:
            return
        event = int.from_bytes(parts[0][:2], "little")
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if self.state == "connecting":
                self.state = "ready"
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                if not self.ready.done():
                    self.ready.set_result(None)
        elif event in _CONNECT_FAILED and self.state == "connecting":
            # Refused (nothing listens: the worker died) or a failed handshake (not a ZeroMQ
            # peer). libzmq would keep retrying quietly; fail now so the caller goes elsewhere.
            refused = event == zmq.EVENT_CONNECT_RETRIED
            self.close(
                ConnectionRefused(
                    f"connection to {self.address} refused"
                    if refused
                    else f"handshake with {self.address} failed (not a troupe tcp worker?)",
                    address=self.address,
                )
            )
        elif event == zmq.EVENT_DISCONNECTED and self.state == "ready":
            # Frames that arrived before the disconnect are still readable: deliver them first.
            self.pump.drain()
            self.close(
                StreamBroken(
                    f"connection to {self.address} lost during the request", address=self.address
                )
            )

    def cancel_open(self) -> None:
        """Send ``Cancel`` for every request still open and hand it to ZeroMQ now: a client
        that closes tells the worker at once instead of leaving it to notice at its next
        reply (a handler that is silent for a while would keep a closing worker waiting)."""
        if self.state != "ready":
            return
        for _, cancel in self.session.cancel_open():
            self.pump.put(b"", encode(cancel))
        if self.pump.backlog(b""):
            self.pump.flush_now()

    def close(self, exc: TransportError, linger: float = 0.0) -> None:
        """Fail everything on this connection with ``exc`` and drop it from the pool.

        ``linger`` lets frames already handed to ZeroMQ leave for up to that many seconds.
        """
        if self.state == "closed":
            return
        self.state = "closed"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.ready.done():
            self.ready.set_exception(exc)
        self.client._forget_connection(self)
        self.session.fail_all(exc)
        with contextlib.suppress(zmq.ZMQError):
            self.pump.sock.disable_monitor()
        self.monitor.close()
        self.pump.close(linger)

    # --- traffic ---

    def try_send(self, data: bytes) -> bool:
        """Queue one encoded frame if there is room now (no coroutine); ``False`` otherwise."""
        pump = self.pump
        if self.state != "ready" or pump.backlog(b"") >= pump.limit:
            return False
        # Alone on the connection: send now rather than at the end of the loop iteration.
        pump.put(b"", data, now=len(self.session) <= 1)
        return True

    async def send(self, data: bytes) -> None:
        """Queue one encoded frame, first waiting (up to the request timeout) while
        ``DYN_TCP_CHANNEL_BUFFER`` frames are already queued."""
        pump = self.pump
        if pump.backlog(b"") >= pump.limit:
            timeout = self.client.config.request_timeout
            try:
                room = await pump.room(b"", timeout)
            except TimeoutError:
                raise RequestTimeout(self.address, timeout) from None
            if not room:
                raise ConnectionLost(f"connection to {self.address} closed", address=self.address)
        if self.state != "ready":
            raise ConnectionLost(f"connection to {self.address} closed", address=self.address)
        # Alone on the connection: send now rather than at the end of the loop iteration.
        pump.put(b"", data, now=len(self.session) <= 1)

    @property
    def streams(self) -> Mapping[RequestId, StreamRef[SessionStream]]:
        """The requests open on this connection (the session's table)."""
        return self.session.streams

    def _send_cancel(self, stream: SessionStream, cancel: Cancel) -> None:
        """Tell the worker to stop a request whose caller gave up; never blocks."""
        if self.state == "ready":
            self.pump.put(b"", encode(cancel))

    def _dropped(self, ref: StreamRef[SessionStream]) -> None:
        """Forget a collected stream and tell the worker to stop (on the loop)."""
        cancel = self.session.collected(ref)
        if cancel is not None and self.state == "ready":
            self.pump.put(b"", encode(cancel))

    def _on_message(self, parts: list[bytes]) -> None:
        session = self.session
        for data in parts:
            cancels = session.receive_message(data)
            if cancels and self.state == "ready":
                for cancel in cancels:
                    self.pump.put(b"", encode(cancel))


def _open_dealer(
    ctx: zmq.Context[zmq.Socket[bytes]], config: TcpConfig, address: str, host: str
) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """A configured DEALER socket and its monitor socket (not yet connected).

    Raises:
        ConnectionLost: ZeroMQ refused to create them (out of sockets or file descriptors).
    """
    sock = None
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Not ZMQ_IMMEDIATE: with it, libzmq discards replies received but not yet read when the
        # connection drops, and the last frames of a worker that just shut down would be lost.
        # Nothing is sent before the handshake anyway (requests wait for ``ready``).
        sock.setsockopt(zmq.SNDHWM, config.channel_buffer)
        sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_size)
        sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TTL, _HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.CONNECT_TIMEOUT, max(1, int(config.connect_timeout * 1000)))
        if _is_ipv6(host):
            sock.setsockopt(zmq.IPV6, 1)
        return sock, sock.get_monitor_socket(_MONITOR_EVENTS)
    except zmq.ZMQError as exc:
        if sock is not None:
            sock.close(linger=0)
        raise ConnectionLost(f"cannot open a socket to {address}: {exc}", address=address) from exc


def _consume_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
