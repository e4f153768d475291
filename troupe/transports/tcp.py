"""The TCP request plane (the default): ZeroMQ ROUTER on the worker, pooled DEALERs on the caller.

The worker binds one ROUTER socket on ``DYN_TCP_RPC_HOST``:``DYN_TCP_RPC_PORT`` (port 0 lets the
OS pick; :attr:`TcpServer.address` reports the real one). A caller keeps up to
``DYN_TCP_POOL_SIZE`` DEALER sockets per worker address and multiplexes many requests on each by
request id. One message carries one codec frame, or a batch of small frames queued in the same
loop iteration (``_codec.encode_batch``, at most ``_codec.BATCH_MAX_BYTES``, and none when
``DYN_TCP_MAX_MESSAGE_SIZE`` is smaller: a batch must fit the peer's limit too); the ROUTER adds
the peer identity. A frame the peer cannot decode costs only its own request: the worker answers
it with a ``ProtocolError`` when its request id can be read, the caller fails that one stream.

Performance: ``zmq.asyncio`` costs several times more per message than driving plain pyzmq
sockets from the event loop, so each socket is registered with ``loop.add_reader(sock.FD)`` and
drained with ``NOBLOCK`` while ``sock.EVENTS`` has ``POLLIN``. ZeroMQ's FD is edge-triggered and
a ``send`` may consume its edge, so every send schedules one re-check of ``EVENTS``.

Failures: ``ZMQ_MAXMSGSIZE`` makes libzmq disconnect a peer that sends an oversized message
without touching other connections; the caller refuses an oversized or malformed request before
sending it. A stream its caller drops without closing it is forgotten when it is collected, and
the worker is told to stop (``Cancel``).
A socket monitor reports handshakes (connect timeout) and disconnects (a dead worker fails its
open streams with ``StreamBroken`` at once); ZMTP heartbeats catch silent peers. Only the event
loop thread touches the sockets. A worker holds a bounded amount for a caller that reads none of
its replies: its requests wait for room within the admission limits, error replies beyond twice
``DYN_TCP_CHANNEL_BUFFER`` are dropped, and a request waiting for room is stopped after
``DYN_TCP_REQUEST_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import itertools
import logging
import socket
import weakref
from collections.abc import Callable, Mapping
from typing import Final

import zmq
from zmq.backend import Socket as _ZmqSocket

from troupe.config import TcpConfig
from troupe.errors import (
    ConfigError,
    ConnectionLost,
    ConnectionRefused,
    ConnectTimeout,
    MessageTooLarge,
    ProtocolError,
    RequestTimeout,
    StreamBroken,
    TransportClosed,
    TransportError,
)
from troupe.transports._base import (
    Client,
    ResponseStream,
    Server,
    TimeoutSweep,
    TransportSettings,
)
from troupe.transports._codec import (
    BATCH_MAX_BYTES,
    BATCH_OVERHEAD,
    Cancel,
    Chunk,
    End,
    Error,
    Reply,
    Request,
    Undecodable,
    decode_message,
    encode,
    encode_batch,
    encode_request,
)
from troupe.transports._dispatch import SendReply
from troupe.transports._net import (
    WILDCARD_HOSTS,
    advertised_host,
    detect_host,
    format_hostport,
    split_address,
)

__all__ = ["SCHEME", "TcpClient", "TcpServer", "create_client", "create_server"]

SCHEME: Final = "tcp"

_log = logging.getLogger("troupe.transports.tcp")

# ZMTP heartbeats: a peer silent for _HEARTBEAT_TIMEOUT_MS is disconnected (a crashed process is
# normally seen at once through its closed socket; heartbeats catch frozen hosts and cut links).
_HEARTBEAT_IVL_MS: Final = 1000
_HEARTBEAT_TIMEOUT_MS: Final = 3000
# Messages handled per reader callback before yielding to the rest of the loop.
_DRAIN_BATCH: Final = 512
# A caller opens another connection to the same worker (up to DYN_TCP_POOL_SIZE) once every
# open one carries this many requests.
_STREAMS_PER_CONNECTION: Final = 512
# How long to wait between retries when a peer's queue is full (seconds).
_BACKOFF_MIN: Final = 0.001
_BACKOFF_MAX: Final = 0.05
# Cancels remembered per connection, so late chunks of a cancelled stream send no new Cancel.
_CANCELLED_MEMORY: Final = 1024
_MONITOR_EVENTS: Final = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
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
# Callers remembered as disconnected, so replies still produced for them are dropped at once.
_GONE_MEMORY: Final = 4096
# How long a closing client's last Cancel frames may take to leave (seconds).
_CLOSE_LINGER: Final = 0.5
# Frames sent in one ZeroMQ message at most (as one batch: ``_codec.encode_batch``).
_MAX_PARTS: Final = 256
# Frames at least this large travel alone (not copied into a batch).
_BATCH_FRAME_MAX: Final = 16 * 1024
# A destination's queue is handed to ZeroMQ at once when it holds this many frames, instead of
# at the end of the loop iteration: the peer works on one batch while the next is produced.
_EAGER_FRAMES: Final = 16
# Plain ints: pyzmq's enum wrappers cost more than the socket calls on this path.
_EVENTS: Final = int(zmq.EVENTS)
_POLLIN: Final = int(zmq.POLLIN)
_NOBLOCK: Final = int(zmq.NOBLOCK)
_RCVMORE: Final = int(zmq.RCVMORE)
_SEND_MORE: Final = int(zmq.NOBLOCK | zmq.SNDMORE)
# Frames at least this large are sent without copying (pyzmq's own threshold).
_COPY_THRESHOLD: Final = zmq.COPY_THRESHOLD


def _resolve(host: str) -> str:
    """An IP literal libzmq can bind: host names are resolved (libzmq binds interfaces/IPs)."""
    if host in WILDCARD_HOSTS:
        return "0.0.0.0" if host != "::" else "::"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            return socket.gethostbyname(host)
        except OSError as exc:
            raise ConfigError(
                "DYN_TCP_RPC_HOST", host, f"a host name this machine resolves ({exc})"
            ) from exc
    return host


def _is_ipv6(host: str) -> bool:
    return ":" in host


def _batch_bytes(config: TcpConfig) -> int:
    """The largest batch to send (0: no batching): ``BATCH_MAX_BYTES``, which every peer whose
    limit is not smaller accepts, or none at all when this side's own limit is smaller (its
    peers are then expected to have small limits too)."""
    return BATCH_MAX_BYTES if config.max_message_size >= BATCH_MAX_BYTES else 0


def _next_message(frames: list[bytes], batch_bytes: int) -> tuple[bytes, int]:
    """The next message to send from ``frames`` and how many frames it carries: as many small
    frames as fit in one batch of at most ``batch_bytes`` (0: one frame per message)."""
    data = frames[0]
    size = len(data) + BATCH_OVERHEAD
    if not batch_bytes or size >= _BATCH_FRAME_MAX:
        return data, 1
    count = 1
    most = min(len(frames), _MAX_PARTS)
    while count < most:
        more = len(frames[count])
        if more >= _BATCH_FRAME_MAX or size + more > batch_bytes:
            break
        size += more
        count += 1
    return (data, 1) if count == 1 else (encode_batch(frames[:count]), count)


class _Pump:
    """Drives one plain pyzmq socket from the event loop.

    Reads: the reader callback drains every message while ``EVENTS`` has ``POLLIN``. Writes:
    frames are queued per destination (the peer identity on a ROUTER, ``b""`` on a DEALER) and
    flushed once per loop iteration, each destination's queue as one message (a batch, see
    ``_codec.encode_batch``, within ``batch_bytes``), so a burst of replies or requests costs one
    ZeroMQ send, one receive and one decode call instead of one each. A queue that
    reaches ``_EAGER_FRAMES`` frames is handed over at once, so the peer works on one batch while
    the next is produced (otherwise the two sides take turns). A destination whose ZeroMQ queue
    is full (it reads slower than we write, or not at all) is retried on a timer with backoff;
    the others are written as usual meanwhile, so one stalled peer delays no one else.

    The socket is driven through pyzmq's Cython methods with plain int flags: the Python layer
    on top (``send_multipart``, ``recv_multipart``, enum flags) cost more than ZeroMQ itself.
    """

    __slots__ = (
        "_backoff",
        "_batch_bytes",
        "_blocked",
        "_flush_scheduled",
        "_get",
        "_loop",
        "_on_message",
        "_on_unroutable",
        "_queues",
        "_recv",
        "_retry",
        "_room",
        "_routed",
        "_send",
        "_single",
        "check_scheduled",
        "closed",
        "limit",
        "sock",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: zmq.Socket[bytes],
        on_message: Callable[[list[bytes]], None],
        *,
        routed: bool = False,
        limit: int = 1,
        on_unroutable: Callable[[bytes], None] | None = None,
        batch_bytes: int = 0,
        single_part: bool = False,
    ) -> None:
        """
        Args:
            loop: the event loop driving the socket.
            sock: the socket.
            on_message: called with the parts of each message received (on a ROUTER, the
                peer identity first).
            routed: a ROUTER socket (messages start with the peer identity).
            limit: frames queued per destination before :meth:`room` waits.
            on_unroutable: called with a destination ZeroMQ cannot route to.
            batch_bytes: the largest batch of frames sent as one message (at most what the
                peer's ``ZMQ_MAXMSGSIZE`` accepts: see :func:`_batch_bytes`); 0 sends every
                frame as a message of its own.
            single_part: every part received is handed over alone, without asking ZeroMQ
                whether more parts follow (a DEALER whose peer sends one part per message).
        """
        self._loop = loop
        self.sock = sock
        self._send = _ZmqSocket.send.__get__(sock)
        self._recv = _ZmqSocket.recv.__get__(sock)
        self._get = _ZmqSocket.get.__get__(sock)
        self._on_message = on_message
        self._routed = routed
        self.limit = limit
        self._on_unroutable = on_unroutable
        self._batch_bytes = batch_bytes
        self._single = single_part
        self._queues: dict[bytes, list[bytes]] = {}
        self._room: dict[bytes, list[asyncio.Future[bool]]] = {}
        # Destinations whose ZeroMQ queue was full at the last try: the retry timer writes them.
        self._blocked: set[bytes] = set()
        self._flush_scheduled = False
        self._retry: asyncio.TimerHandle | None = None
        self._backoff = _BACKOFF_MIN
        self.check_scheduled = False
        self.closed = False
        loop.add_reader(sock.FD, self.drain)
        self.schedule_check()  # events pending before the reader was added raise no edge

    # --- reading ---

    def schedule_check(self) -> None:
        """Re-check ``EVENTS`` soon: a send may have consumed the FD's edge."""
        if not self.check_scheduled:
            self.check_scheduled = True
            self._loop.call_soon(self.drain)

    def drain(self) -> None:
        """Handle every message the socket holds now (the reader callback)."""
        self.check_scheduled = False
        if self.closed:
            return
        sock = self.sock
        handle = self._on_message
        get = self._get
        recv = self._recv
        routed = self._routed
        single = self._single
        try:
            for _ in range(_DRAIN_BATCH):
                if not get(_EVENTS) & _POLLIN:
                    return
                # Asking ZeroMQ for RCVMORE costs a Python enum lookup inside pyzmq: ask once
                # per message (a ROUTER's identity is always followed by a part), or never.
                if single:
                    parts = [recv(_NOBLOCK)]
                else:
                    parts = [recv(_NOBLOCK), recv(_NOBLOCK)] if routed else [recv(_NOBLOCK)]
                    while get(_RCVMORE):
                        parts.append(recv(_NOBLOCK))
                handle(parts)
                if sock.closed:  # the handler closed the connection
                    return
        except zmq.Again:
            return
        except zmq.ZMQError as exc:
            if sock.closed or exc.errno in (zmq.ENOTSOCK, zmq.ETERM):
                return
            raise
        self.schedule_check()  # more to read: let other callbacks run first

    # --- writing ---

    def put(self, dest: bytes, frame: bytes, *, now: bool = False) -> None:
        """Queue one encoded frame for ``dest``; it leaves with the next flush.

        ``now`` hands the queue to ZeroMQ at once: the caller knows nothing else will be
        produced in this loop iteration (one request in flight), so waiting for the end of the
        iteration would only cost another one.
        """
        queue = self._queues.get(dest)
        if queue is None:
            queue = self._queues[dest] = []
        queue.append(frame)
        blocked = self._blocked
        if blocked and dest in blocked:
            return  # the peer's queue is full; the retry timer flushes
        if now or len(queue) >= _EAGER_FRAMES:
            # Hand a full batch over now, so the peer starts on it while this side produces
            # the rest (one message per loop iteration would make both sides take turns).
            self._write()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def backlog(self, dest: bytes) -> int:
        """Frames queued for ``dest`` and not yet handed to ZeroMQ."""
        queue = self._queues.get(dest)
        return 0 if queue is None else len(queue)

    async def room(self, dest: bytes, timeout: float | None) -> bool:
        """Wait until fewer than ``limit`` frames are queued for ``dest``.

        Returns:
            True when there is room; False when ``dest`` became unreachable or the socket closed.

        Raises:
            TimeoutError: still full after ``timeout`` seconds.
        """
        if self.closed:
            return False
        if self.backlog(dest) < self.limit:
            return True
        waiter: asyncio.Future[bool] = self._loop.create_future()
        waiters = self._room.get(dest)
        if waiters is None:
            waiters = self._room[dest] = []
        waiters.append(waiter)
        async with asyncio.timeout(timeout):
            return await waiter

    def _wake(self, dest: bytes, result: bool) -> None:
        waiters = self._room.pop(dest, None)
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(result)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write()

    def _retry_blocked(self) -> None:
        self._retry = None
        self._write(retry=True)

    def _schedule_retry(self) -> None:
        if self._retry is None:
            self._retry = self._loop.call_later(self._backoff, self._retry_blocked)
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    def _recheck(self) -> None:
        """Look at ``EVENTS`` after a send, which may have consumed the FD's edge (cheaper than
        a loop iteration spent on a scheduled check that, at one request in flight, finds
        nothing)."""
        try:
            readable = self._get(_EVENTS) & _POLLIN
        except zmq.ZMQError:
            readable = True  # let drain() sort it out
        if readable:
            self.schedule_check()

    def _write(self, *, retry: bool = False) -> None:
        """Hand queued frames to ZeroMQ (what it accepts; a full peer queue is retried later).

        Destinations found full at an earlier try are left to the retry timer (``retry``).
        """
        if self.closed:
            return
        sock = self.sock
        send = self._send
        routed = self._routed
        batch_bytes = self._batch_bytes
        blocked = self._blocked
        unroutable: list[bytes] = []
        queues = self._queues
        if retry:
            blocked.intersection_update(queues)  # a dropped queue is blocked no more
        for dest in list(queues):
            if blocked and not retry and dest in blocked:
                continue
            frames = queues[dest]
            full = False
            while frames:
                data, count = _next_message(frames, batch_bytes)
                try:
                    # ZeroMQ delivers a multipart message whole or not at all, and only its
                    # first part can fail (full queue, unroutable peer).
                    if routed:
                        send(dest, _SEND_MORE)
                    send(data, _NOBLOCK, len(data) < _COPY_THRESHOLD)
                except zmq.Again:  # the peer's queue is full (SNDHWM): retry later
                    full = True
                    break
                except zmq.ZMQError as exc:
                    if sock.closed or exc.errno in (zmq.ENOTSOCK, zmq.ETERM):
                        return
                    if exc.errno != zmq.EHOSTUNREACH:
                        _log.warning("send failed: %s", exc)
                    frames.clear()
                    unroutable.append(dest)
                    break
                del frames[:count]
            if full:
                blocked.add(dest)
            elif blocked:
                blocked.discard(dest)
            if not frames:
                del queues[dest]
            if dest in self._room and (not frames or len(frames) < self.limit):
                self._wake(dest, dest not in unroutable)
        if blocked:
            self._schedule_retry()
        else:
            self._backoff = _BACKOFF_MIN
        if not self.check_scheduled:
            self._recheck()
        if unroutable and self._on_unroutable is not None:
            for dest in unroutable:
                self._on_unroutable(dest)

    def backlog_total(self) -> int:
        """Frames queued for every destination."""
        return sum(len(queue) for queue in self._queues.values())

    def flush_now(self) -> None:
        """Hand every queued frame to ZeroMQ now (what it accepts)."""
        if self._retry is not None:
            self._retry.cancel()
        self._retry_blocked()

    def close(self, linger: float = 0.0) -> None:
        """Stop watching the socket and close it; queued frames are dropped."""
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._queues.clear()
        self._blocked.clear()
        for dest in list(self._room):
            self._wake(dest, False)
        with contextlib.suppress(ValueError, OSError):  # the FD may already be gone
            self._loop.remove_reader(self.sock.FD)
        self.sock.close(linger=int(linger * 1000))


# --- worker side -------------------------------------------------------------------------------


class TcpServer(Server):
    """Serves endpoints on a ZeroMQ ROUTER socket.

    A caller is one connection (its ZeroMQ identity): the admission limits count its requests,
    and its reply queue is bounded (``DYN_TCP_CHANNEL_BUFFER``; see :meth:`_post` and the
    sender), so a caller that reads nothing costs a bounded amount, and nothing once it is gone.

    Args:
        config: host, port, message size limit and queue bound (``DYN_TCP_*``).
    """

    def __init__(self, config: TcpConfig | None = None) -> None:
        super().__init__("tcp")
        self._config = config if config is not None else TcpConfig()
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._pump: _Pump | None = None
        self._address: str | None = None
        self._closed = False
        # Callers whose connection is gone (replies to them are dropped), oldest first.
        self._gone: dict[bytes, None] = {}

    @property
    def address(self) -> str:
        """``tcp://host:port`` as bound (a routable host when bound to every interface)."""
        if self._address is None:
            raise TransportError("TCP server is not started")
        return self._address

    async def start(self) -> None:
        """Bind the ROUTER socket.

        Raises:
            ConfigError: the port is in use (names ``DYN_TCP_RPC_PORT``) or the host cannot be
                bound (names ``DYN_TCP_RPC_HOST``).
            TransportClosed: the server was closed.
        """
        if self._closed:
            raise TransportClosed("TCP server is closed")
        if self._pump is not None:
            return
        config = self._config
        wanted = config.host if config.host is not None else detect_host()
        host = _resolve(wanted)
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context(io_threads=1)
        sock: zmq.Socket[bytes] | None = None
        try:
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies fail, not vanish
            sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_size)
            sock.setsockopt(zmq.SNDHWM, config.channel_buffer)
            sock.setsockopt(zmq.HEARTBEAT_IVL, _HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, _HEARTBEAT_TIMEOUT_MS)
            sock.setsockopt(zmq.HEARTBEAT_TTL, _HEARTBEAT_TIMEOUT_MS)
            if _is_ipv6(host):
                sock.setsockopt(zmq.IPV6, 1)
            host_text = f"[{host}]" if _is_ipv6(host) else host
            sock.bind(f"tcp://{host_text}:{config.port or '*'}")
        except zmq.ZMQError as exc:
            if sock is not None:
                sock.close(linger=0)
            ctx.term()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    "DYN_TCP_RPC_PORT",
                    config.port,
                    f"a free port: {format_hostport(host, config.port)} is already in use; "
                    "choose another port, or unset DYN_TCP_RPC_PORT to let the OS pick one",
                ) from exc
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.ENODEV):
                raise ConfigError(
                    "DYN_TCP_RPC_HOST", wanted, f"an address this machine can bind ({exc})"
                ) from exc
            raise TransportError(f"cannot open the TCP server socket: {exc}") from exc
        bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        port = int(bound.rsplit(":", 1)[1])
        self._ctx = ctx
        self._pump = _Pump(
            asyncio.get_running_loop(),
            sock,
            self._on_message,
            routed=True,
            limit=config.channel_buffer,
            on_unroutable=self._on_unroutable,
            batch_bytes=_batch_bytes(config),
        )
        self._address = f"tcp://{format_hostport(advertised_host(host), port)}"
        _log.debug("TCP server listening on %s (bound %s)", self._address, bound)

    def _on_message(self, parts: list[bytes]) -> None:
        if len(parts) < 2:
            return
        identity = parts[0]
        runner = self._runner
        for data in itertools.islice(parts, 1, None):
            try:
                frames = decode_message(data)
            except ProtocolError as exc:
                _log.debug("dropping an undecodable message: %s", exc)
                continue
            for frame in frames:
                kind = type(frame)
                if kind is Request:
                    assert isinstance(frame, Request)
                    rid = frame.id
                    refusal = runner.start(
                        (identity, rid), frame, self._sender(identity, rid), identity
                    )
                    if refusal is not None:
                        self._post(identity, refusal)
                elif kind is Cancel:
                    assert isinstance(frame, Cancel)
                    runner.cancel((identity, frame.id))
                elif kind is Undecodable:
                    assert isinstance(frame, Undecodable)
                    self._refuse(identity, frame)
                else:
                    _log.debug("dropping an unexpected %s frame from a caller", kind.__name__)

    def _refuse(self, identity: bytes, frame: Undecodable) -> None:
        """Answer an undecodable request with a ``ProtocolError`` when its id can be read (its
        caller fails at once instead of timing out); drop anything else."""
        if frame.tag != "req" or frame.id is None:
            _log.debug("dropping an undecodable frame from a caller: %s", frame.error)
            return
        _log.debug("refusing an undecodable request %r: %s", frame.id, frame.error)
        self._runner.metrics.add_refused("undecodable")
        self._post(identity, Error(frame.id, "ProtocolError", str(frame.error)))

    def _post(self, identity: bytes, frame: Error) -> None:
        """Queue a one-off error reply (a refusal) without waiting for room.

        Dropped, and counted, when the caller already has twice ``DYN_TCP_CHANNEL_BUFFER``
        frames waiting in its queue: it reads nothing (or far too slowly), and refusals must not
        pile up for it. The frames of requests it has running are bounded by the admission
        limits: a handler waits for room once the queue holds ``DYN_TCP_CHANNEL_BUFFER``.
        """
        pump = self._pump
        if pump is None or pump.closed or identity in self._gone:
            return
        if pump.backlog(identity) >= 2 * pump.limit:
            self._runner.metrics.add_dropped("backlog")
            return
        pump.put(identity, encode(frame))

    def _on_unroutable(self, identity: bytes) -> None:
        """A caller's connection is gone: stop everything it asked for."""
        gone = self._gone
        gone[identity] = None
        if len(gone) > _GONE_MEMORY:
            del gone[next(iter(gone))]
        self._runner.cancel_where(
            lambda key: isinstance(key, tuple) and key[0] == identity, "disconnected"
        )

    def _sender(self, identity: bytes, request_id: int | str) -> SendReply:
        limit = self._config.max_message_size
        runner = self._runner
        # A caller that has read nothing for its request timeout has given up on the request.
        stall = self._config.request_timeout or None

        async def send(frame: Reply) -> bool:
            pump = self._pump
            if pump is None or pump.closed or identity in self._gone:
                return False
            data = encode(frame)
            ok = True
            if len(data) > limit:
                exc = MessageTooLarge(len(data), limit, variable="DYN_TCP_MAX_MESSAGE_SIZE")
                data = encode(Error(request_id, "MessageTooLarge", str(exc)))
                ok = False
            # The last frame of the only request running leaves at once; otherwise frames of
            # concurrent requests are batched until the end of the loop iteration.
            final = type(frame) is not Chunk or frame.end
            pump.put(identity, data, now=final and runner.inflight <= 1)
            # The caller reads slower than the handler produces: wait for it, the request keeping
            # its place in the admission limits (what is queued for a caller stays bounded by
            # them). Not for ever (DYN_TCP_REQUEST_TIMEOUT): a caller that reads nothing must not
            # hold its requests as long as it stays connected.
            if pump.backlog(identity) >= pump.limit:
                try:
                    ok = await pump.room(identity, stall) and ok
                except TimeoutError:
                    runner.metrics.add_dropped("stalled")
                    return False
            return ok

        return send

    async def close(self, grace: float = 0.0) -> None:
        """Stop serving: running requests get ``grace`` seconds; then callers get StreamBroken."""
        if self._closed:
            return
        self._closed = True
        await self._runner.close(grace)
        pump, self._pump = self._pump, None
        ctx, self._ctx = self._ctx, None
        if pump is not None:
            if pump.backlog_total():
                pump.flush_now()
            # With a grace period, let the last replies leave before the socket goes.
            pump.close(linger=min(grace, 1.0))
        if ctx is not None:
            await asyncio.to_thread(ctx.term)


# --- caller side -------------------------------------------------------------------------------


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


class TcpClient(Client):
    """Calls workers over ZeroMQ; one pool of DEALER sockets per worker address.

    Args:
        config: pool size, timeouts, message size limit and queue bound (``DYN_TCP_*``).
    """

    def __init__(self, config: TcpConfig | None = None) -> None:
        self.config = config if config is not None else TcpConfig()
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._pools: dict[str, list[_Connection]] = {}
        self._ids = itertools.count(1)
        self._sweep: TimeoutSweep | None = None
        self._closed = False

    def _connection(self, address: str, host: str) -> _Connection:
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = []
        best: _Connection | None = None
        load = 0
        for conn in pool:
            conn_load = len(conn.streams) + conn.waiting
            if best is None or conn_load < load:
                best, load = conn, conn_load
        if best is not None and (
            load < _STREAMS_PER_CONNECTION or len(pool) >= self.config.pool_size
        ):
            return best
        if self._ctx is None:
            self._ctx = zmq.Context(io_threads=1)
        conn = _Connection(self, self._ctx, address, host)
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
        rid = next(self._ids)
        data = encode_request(
            rid,
            endpoint,
            payload,
            deadline=deadline,
            headers=headers,
            attempt=attempt,
            received=received,
        )
        limit = self.config.max_message_size
        if len(data) > limit:
            raise MessageTooLarge(
                len(data), limit, address=address, variable="DYN_TCP_MAX_MESSAGE_SIZE"
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
        stream = _TcpStream(
            rid,
            address=address,
            endpoint=endpoint,
            request_timeout=self.config.request_timeout,
            deadline=deadline,
            sweep=sweep,
        )
        stream.conn = conn
        conn.streams[rid] = _StreamRef(stream, conn.on_collected, rid)
        if conn.try_send(data):
            return stream
        try:
            await conn.send(data)
        except BaseException:
            conn.forget(rid)
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


def create_server(settings: TransportSettings) -> TcpServer:
    """A TCP server configured by ``settings.request_plane.tcp``."""
    return TcpServer(settings.request_plane.tcp)


def create_client(settings: TransportSettings) -> TcpClient:
    """A TCP client configured by ``settings.request_plane.tcp``."""
    return TcpClient(settings.request_plane.tcp)
