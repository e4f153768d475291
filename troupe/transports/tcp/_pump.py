"""What both ends of the TCP plane share: the pump that drives one ZeroMQ socket from the loop.

Performance: ``zmq.asyncio`` costs several times more per message than driving plain pyzmq
sockets from the event loop, so each socket is registered with ``loop.add_reader(sock.FD)`` and
drained with ``NOBLOCK`` while ``sock.EVENTS`` has ``POLLIN``. ZeroMQ's FD is edge-triggered and
a ``send`` may consume its edge, so every send schedules one re-check of ``EVENTS``.

Small frames queued in the same loop iteration leave as one batch (``_codec.encode_batch``, at
most ``_codec.BATCH_MAX_BYTES``, and none when ``DYN_TCP_MAX_MESSAGE_SIZE`` is smaller: a batch
must fit the peer's limit too).

Failures: ``ZMQ_MAXMSGSIZE`` (set on both ends) makes libzmq disconnect a peer that sends an
oversized message without touching other connections; ZMTP heartbeats catch silent peers. Only
the event loop thread touches the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final

import zmq
from zmq.backend import Socket as _ZmqSocket

from troupe._support._logging import get_logger
from troupe.config import TcpConfig
from troupe.messages._frames import BATCH_MAX_BYTES, BATCH_OVERHEAD, encode_batch

SCHEME: Final = "tcp"

_log = get_logger("troupe.transports.tcp")

# ZMTP heartbeats: a peer silent for _HEARTBEAT_TIMEOUT_MS is disconnected (a crashed process is
# normally seen at once through its closed socket; heartbeats catch frozen hosts and cut links).
_HEARTBEAT_IVL_MS: Final = 1000
_HEARTBEAT_TIMEOUT_MS: Final = 3000
# Messages handled per reader callback before yielding to the rest of the loop.
_DRAIN_BATCH: Final = 512
# How long to wait between retries when a peer's queue is full (seconds).
_BACKOFF_MIN: Final = 0.001
_BACKOFF_MAX: Final = 0.05
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
                        _log.warning("send failed", error=str(exc))
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
