"""The caller side of the TCP plane, per socket: one DEALER to one worker, many requests on it.

Requests are multiplexed on the socket by request id. A frame the caller cannot decode fails that
one stream. A stream its caller drops without closing it is forgotten when it is collected, and
the worker is told to stop (``Cancel``). A socket monitor reports handshakes (connect timeout)
and disconnects (a dead worker fails its open streams with ``StreamBroken`` at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import zmq

from troupe.config import TcpConfig
from troupe.errors import (
    ConnectionLost,
    ConnectionRefused,
    ConnectTimeout,
    ProtocolError,
    RequestTimeout,
    StreamBroken,
    TransportError,
)
from troupe.messages._frames import Cancel, Chunk, End, Error, Undecodable, decode_message, encode
from troupe.transports._base import ResponseStream
from troupe.transports.tcp._pump import (
    _HEARTBEAT_IVL_MS,
    _HEARTBEAT_TIMEOUT_MS,
    _batch_bytes,
    _is_ipv6,
    _Pump,
)

if TYPE_CHECKING:
    from troupe.transports.tcp._client import TcpClient

_log = logging.getLogger("troupe.transports.tcp")

# Cancels remembered per connection, so late chunks of a cancelled stream send no new Cancel.
_CANCELLED_MEMORY: Final = 1024
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


class _StreamRef(weakref.ref[ResponseStream]):
    """A weak reference to a stream that remembers its request id, for the callback that runs
    when the stream is collected (its caller dropped it without closing it)."""

    __slots__ = ("rid",)

    rid: int

    def __new__(
        cls, stream: ResponseStream, callback: Callable[[_StreamRef], None], rid: int
    ) -> _StreamRef:
        self = super().__new__(cls, stream, callback)
        self.rid = rid
        return self

    def __init__(
        self, stream: ResponseStream, callback: Callable[[_StreamRef], None], rid: int
    ) -> None:
        # ref.__init__ takes (ob, callback); typeshed does not declare it.
        super().__init__(stream, callback)  # type: ignore[call-arg]


class _Connection:
    """One DEALER socket to one worker, carrying many requests."""

    def __init__(
        self,
        client: TcpClient,
        ctx: zmq.Context[zmq.Socket[bytes]],
        address: str,
        host: str,
    ) -> None:
        config = client.config
        self.client = client
        self.address = address
        self.host = host
        self.loop = asyncio.get_running_loop()
        # request id -> a weak reference to its stream: a stream its caller dropped without
        # closing it is collected, and the reference's callback has the loop forget it and send
        # Cancel (weakrefs in a plain dict: WeakValueDictionary's Python-level bookkeeping cost
        # more per request). Its next frame, should it come first, does the same.
        self.streams: dict[int, _StreamRef] = {}
        self.on_collected = self._on_collected
        self.state = "connecting"
        self.waiting = 0  # requests waiting for the handshake: they count as this one's load
        self._cancelled: dict[int, None] = {}
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
        for rid, ref in list(self.streams.items()):
            stream = ref()
            if stream is not None and not stream.finished and rid not in self._cancelled:
                self.pump.put(b"", encode(Cancel(rid)))
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
        streams = [ref() for ref in self.streams.values()]
        self.streams.clear()
        for stream in streams:
            if stream is not None:
                stream.fail(exc)
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
        pump.put(b"", data, now=len(self.streams) <= 1)
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
        pump.put(b"", data, now=len(self.streams) <= 1)

    def send_cancel(self, rid: int) -> None:
        """Tell the worker to stop ``rid``; never blocks."""
        cancelled = self._cancelled
        cancelled[rid] = None
        if len(cancelled) > _CANCELLED_MEMORY:
            del cancelled[next(iter(cancelled))]
        if self.state == "ready":
            self.pump.put(b"", encode(Cancel(rid)))

    def forget(self, rid: int) -> None:
        """The stream ``rid`` expects no more frames."""
        self.streams.pop(rid, None)

    def _on_collected(self, ref: _StreamRef) -> None:
        """The weakref callback of a stream collected while still registered (dropped unclosed).

        Runs wherever the garbage collector runs: any thread, possibly in the middle of loop
        code that iterates :attr:`streams`. So it only schedules :meth:`_dropped` on the loop.
        """
        loop = self.loop
        if loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to stop
            loop.call_soon_threadsafe(self._dropped, ref)

    def _dropped(self, ref: _StreamRef) -> None:
        """Forget a collected stream and tell the worker to stop (on the loop)."""
        rid = ref.rid
        if self.streams.get(rid) is not ref:
            return  # already forgotten (a frame for it arrived first, or the connection closed)
        del self.streams[rid]
        if rid not in self._cancelled:
            self.send_cancel(rid)

    def _on_message(self, parts: list[bytes]) -> None:
        streams = self.streams
        for data in parts:
            try:
                frames = decode_message(data)
            except ProtocolError as exc:
                _log.debug("dropping an undecodable reply from %s: %s", self.address, exc)
                continue
            for frame in frames:
                kind = type(frame)
                if kind is not Chunk and kind is not End and kind is not Error:
                    if kind is Undecodable:
                        assert isinstance(frame, Undecodable)
                        self._on_undecodable(frame)
                    continue
                assert isinstance(frame, Chunk | End | Error)
                rid = frame.id
                if type(rid) is not int:
                    continue  # this client's ids are ints
                ref = streams.get(rid)
                stream = None if ref is None else ref()
                if stream is not None:
                    stream.deliver(frame)
                    continue
                if ref is not None:
                    del streams[rid]  # its caller dropped it without closing it
                if type(frame) is Chunk and not frame.end and rid not in self._cancelled:
                    self.send_cancel(rid)  # nobody reads this stream any more

    def _on_undecodable(self, frame: Undecodable) -> None:
        """Fail the one stream an undecodable reply belongs to, when its id can be read."""
        rid = frame.id
        _log.debug("undecodable reply from %s (id %r): %s", self.address, rid, frame.error)
        if not isinstance(rid, int):
            return  # this client's ids are ints
        ref = self.streams.pop(rid, None)
        stream = None if ref is None else ref()
        if stream is None:
            return
        stream.fail(
            ProtocolError(
                f"undecodable reply from {self.address}: {frame.error}", address=self.address
            )
        )
        if frame.tag == "chunk" and rid not in self._cancelled:
            self.send_cancel(rid)  # the worker may go on sending: stop it


class _TcpStream(ResponseStream):
    """A stream that cancels and forgets itself through its connection (no closures)."""

    __slots__ = ("conn",)

    conn: _Connection

    def _send_cancel(self) -> None:
        self.conn.send_cancel(self.request_id)  # type: ignore[arg-type]  # ints on tcp

    def _finished(self) -> None:
        self.conn.streams.pop(self.request_id, None)  # type: ignore[arg-type]  # ints on tcp


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
