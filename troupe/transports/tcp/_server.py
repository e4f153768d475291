"""The worker side of the TCP plane: :class:`TcpServer`, one ZeroMQ ROUTER socket.

The worker binds one ROUTER socket on ``DYN_TCP_RPC_HOST``:``DYN_TCP_RPC_PORT`` (port 0 lets the
OS pick; :attr:`TcpServer.address` reports the real one); the ROUTER adds the peer identity. A
frame the worker cannot decode costs only its own request: it answers it with a
``ProtocolError`` when its request id can be read.

Failures: a worker holds a bounded amount for a caller that reads none of its replies: its
requests wait for room within the admission limits, error replies beyond twice
``DYN_TCP_CHANNEL_BUFFER`` are dropped, and a request waiting for room is stopped after
``DYN_TCP_REQUEST_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import socket
from typing import Final

import zmq

from troupe._support._logging import get_logger
from troupe._support._net import WILDCARD_HOSTS, advertised_host, detect_host, format_hostport
from troupe.config import TcpConfig
from troupe.errors import (
    ConfigError,
    MessageTooLarge,
    ProtocolError,
    TransportClosed,
    TransportError,
)
from troupe.messages._frames import (
    Cancel,
    Chunk,
    Error,
    Reply,
    Request,
    Undecodable,
    decode_message,
    encode,
)
from troupe.transports._base import Server, TransportSettings
from troupe.transports._dispatch import SendReply
from troupe.transports.tcp._pump import (
    _HEARTBEAT_IVL_MS,
    _HEARTBEAT_TIMEOUT_MS,
    _batch_bytes,
    _is_ipv6,
    _Pump,
)

_log = get_logger("troupe.transports.tcp")

# Callers remembered as disconnected, so replies still produced for them are dropped at once.
_GONE_MEMORY: Final = 4096


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
        _log.debug("TCP server listening", address=self._address, bound=bound)

    def _on_message(self, parts: list[bytes]) -> None:
        if len(parts) < 2:
            return
        identity = parts[0]
        runner = self._runner
        for data in itertools.islice(parts, 1, None):
            try:
                frames = decode_message(data)
            except ProtocolError as exc:
                _log.debug("dropping an undecodable message", error=str(exc))
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
                    _log.debug("dropping an unexpected frame from a caller", frame=kind.__name__)

    def _refuse(self, identity: bytes, frame: Undecodable) -> None:
        """Answer an undecodable request with a ``ProtocolError`` when its id can be read (its
        caller fails at once instead of timing out); drop anything else."""
        if frame.tag != "req" or frame.id is None:
            _log.debug("dropping an undecodable frame from a caller", error=str(frame.error))
            return
        _log.debug("refusing an undecodable request", id=frame.id, error=str(frame.error))
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


def create_server(settings: TransportSettings) -> TcpServer:
    """A TCP server configured by ``settings.request_plane.tcp``."""
    return TcpServer(settings.request_plane.tcp)
