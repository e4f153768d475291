"""The NATS request plane: requests and reply streams carried by a NATS server (``NATS_SERVER``).

Addresses. A server instance subscribes a subject of its own, ``troupe.rpc.<16 hex digits>``, and
reports the address ``nats:troupe.rpc.<16 hex digits>``: scheme ``nats`` (what the network manager
maps to this plane) and no ``//``, because the address names a *subject*, never a server URL.
Both sides reach the NATS servers listed in their own ``NATS_SERVER``.

Exchange. The caller publishes an encoded :class:`~troupe.transports._codec.Request` to the
worker's subject with a reply subject ``<inbox>.<request id>``; the worker publishes ``Chunk``,
``End`` or ``Error`` frames to that reply subject. Each client holds ONE connection and ONE
wildcard subscription ``<inbox>.*`` and routes replies to their streams by request id (no
subscription per request). ``Cancel`` goes to the worker's control subject ``<subject>.ctl``,
with the request's reply subject as its reply (together with the id, that names the request).

Failures, all typed:

- Request larger than the server's ``max_payload``: :class:`~troupe.errors.MessageTooLarge` at
  once, before publishing (the limit comes from the server's INFO, so it follows its config).
- Nothing subscribes to the worker's subject (the instance is gone): NATS answers "no responders"
  (status 503) on the reply subject, which fails the request with
  :class:`~troupe.errors.ConnectionLost`: it reached no worker, so it is safe to send elsewhere.
- Worker death mid-stream: while a client has open streams it probes each worker subject they
  use every ``probe_interval`` (0.25 s) by publishing an empty message to ``<subject>.ctl`` with a
  probe reply subject. A live worker ignores it (no reply, no cost to the caller); a dead one has
  no subscription left, so NATS answers 503 and every open stream to it fails with
  :class:`~troupe.errors.StreamBroken`. One probe per worker per tick, whatever the number of
  streams; no timer per message.
- Broker outage: the caller's open streams fail with ``StreamBroken`` when its connection drops,
  and new requests fail at once with ``ConnectionLost`` (nothing is buffered) until nats-py has
  reconnected, which it keeps trying forever. A worker that loses its connection stops its running
  requests and, once reconnected, tells their callers ``StreamBroken``; its subscriptions are
  restored by nats-py, so it serves again without a restart.
- Unreachable server at start-up (first request, or :meth:`NatsRpcServer.start`):
  ``ConnectionLost`` naming ``NATS_SERVER`` within ``DYN_NATS_CONNECT_TIMEOUT``.

Performance: nats-py's callback subscriptions already run one task per subscription, so replies
are routed by a plain callback (no task, no timer per message); flushing is left to nats-py's
coalescing flusher.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import nats.errors
from nats.aio.client import Client as _Nats
from nats.aio.msg import Msg

from troupe.config import NatsConfig
from troupe.errors import (
    ConfigError,
    ConnectionLost,
    MessageTooLarge,
    ProtocolError,
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
    Cancel,
    Chunk,
    End,
    Error,
    Reply,
    Request,
    RequestId,
    decode,
    encode,
    encode_request,
)
from troupe.transports._dispatch import SendReply

__all__ = [
    "DEFAULT_PROBE_INTERVAL",
    "SCHEME",
    "SUBJECT_PREFIX",
    "NatsRpcClient",
    "NatsRpcServer",
    "create_client",
    "create_server",
    "subject_of",
]

SCHEME: Final = "nats"
"""The scheme of this plane's addresses (``nats:<subject>``)."""

SUBJECT_PREFIX: Final = "troupe.rpc"
"""Worker subjects are ``SUBJECT_PREFIX.<16 hex digits>`` unless chosen explicitly."""

DEFAULT_PROBE_INTERVAL: Final = 0.25
"""Seconds between liveness probes of the workers a client has open streams with."""

_PREFIX: Final = SCHEME + ":"
_CONTROL: Final = ".ctl"
_SUBJECT_RE: Final = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_NO_RESPONDERS: Final = "503"
_STATUS: Final = "Status"
_PROBE_TAG: Final = "p"
# Seconds between reconnect attempts to one server (nats-py's default is 2 s, too slow to notice
# a restarted broker promptly). Attempts never stop: requests fail fast meanwhile.
_RECONNECT_WAIT: Final = 0.25
_CLOSE_TIMEOUT: Final = 5.0

_log = logging.getLogger("troupe.transports.nats")


# --- addresses and connections -------------------------------------------------------------------


def subject_of(address: str) -> str:
    """The worker subject an address names (``nats:troupe.rpc.ab12`` → ``troupe.rpc.ab12``).

    Raises:
        TransportError: the address is not ``nats:<subject>`` with a plain subject (tokens of
            letters, digits, ``_`` and ``-`` separated by dots, no wildcards).
    """
    if address.startswith(_PREFIX):
        subject = address[len(_PREFIX) :]
        if _SUBJECT_RE.fullmatch(subject):
            return subject
    raise TransportError(
        f"malformed nats address {address!r}: expected nats:<subject>, e.g. nats:troupe.rpc.0a1b",
        address=address,
    )


def _redact(url: str) -> str:
    """A server URL without the credentials it may embed."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return "<malformed URL>"
    if parts.username is None and parts.password is None:
        return url
    netloc = (host or "") + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _servers_text(config: NatsConfig) -> str:
    return ",".join(_redact(server) for server in config.servers)


_Callback = Callable[[], Awaitable[None]]


async def _open(
    config: NatsConfig, name: str, *, disconnected: _Callback, reconnected: _Callback
) -> _Nats:
    """Connect to ``config``'s servers within its connect timeout (reconnecting forever after).

    Raises:
        ConnectionLost: no server answered within ``DYN_NATS_CONNECT_TIMEOUT`` (names
            ``NATS_SERVER``).
        TransportError: the server refused the credentials.
    """
    nc = _Nats()
    last_error: list[BaseException] = []

    async def on_error(exc: Exception) -> None:
        if not nc.is_connected:
            last_error[:] = [exc]
        if isinstance(exc, nats.errors.SlowConsumerError):
            _log.warning("%s: NATS dropped a message for a slow subscription: %s", name, exc)
        else:
            _log.debug("%s: NATS connection error: %r", name, exc)

    options: dict[str, Any] = {
        "servers": list(config.servers),
        "name": name,
        "connect_timeout": config.connect_timeout,
        "reconnect_time_wait": _RECONNECT_WAIT,
        "max_reconnect_attempts": -1,
        "error_cb": on_error,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
    }
    if config.username is not None:
        options["user"] = config.username
        options["password"] = config.password or ""
    if config.token is not None:
        options["token"] = config.token
    if config.credentials_file is not None:
        options["user_credentials"] = config.credentials_file
    try:
        async with asyncio.timeout(config.connect_timeout):
            await nc.connect(**options)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        await _close_quietly(nc)
        cause = last_error[0] if last_error else exc
        text = f"{cause}" or type(cause).__name__
        servers = _servers_text(config)
        if isinstance(cause, nats.errors.AuthorizationError) or "authorization" in text.lower():
            raise TransportError(
                f"NATS at {servers} (NATS_SERVER) refused the credentials (NATS_AUTH_*): {text}",
                address=servers,
            ) from exc
        raise ConnectionLost(
            f"cannot connect to NATS at {servers} (NATS_SERVER) within "
            f"{config.connect_timeout:g} s (DYN_NATS_CONNECT_TIMEOUT): {text}",
            address=servers,
        ) from exc
    return nc


async def _close_quietly(nc: _Nats) -> None:
    """Close a nats-py connection; its errors only mean it is already gone."""
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await nc.close()
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        _log.debug("closing a NATS connection failed: %r", exc)


# --- the worker side -----------------------------------------------------------------------------


class NatsRpcServer(Server):
    """Serves endpoints on one NATS subject of its own (address ``nats:<subject>``).

    Args:
        config: the NATS servers, credentials and timeouts (``NATS_*``).
        subject: the subject to serve on; a fresh ``troupe.rpc.<16 hex>`` when ``None``.

    Raises:
        ConfigError: ``subject`` is not a plain NATS subject.
    """

    def __init__(self, config: NatsConfig | None = None, *, subject: str | None = None) -> None:
        token = secrets.token_hex(8)
        if subject is None:
            subject = f"{SUBJECT_PREFIX}.{token}"
        elif not _SUBJECT_RE.fullmatch(subject):
            raise ConfigError(
                "nats subject", subject, "dot-separated tokens of letters, digits, '_' and '-'"
            )
        super().__init__(f"NatsRpcServer-{subject}")
        self._config = config if config is not None else NatsConfig()
        self._subject = subject
        self._nc: _Nats | None = None
        self._started = False
        self._closed = False
        # Requests stopped because our connection dropped: (reply subject, id), told on reconnect.
        self._broken: list[tuple[str, RequestId]] = []

    @property
    def subject(self) -> str:
        """The subject requests are published to."""
        return self._subject

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def address(self) -> str:
        """``nats:<subject>``.

        Raises:
            TransportError: the server is not started.
        """
        if not self._started:
            raise TransportError("nats server is not started")
        return _PREFIX + self._subject

    async def start(self) -> None:
        """Connect and subscribe; returns once the subscriptions are registered at the server.

        Raises:
            ConnectionLost: no NATS server answered within the connect timeout (names
                ``NATS_SERVER``), or the connection dropped while subscribing.
            TransportError: the server refused the credentials.
            TransportClosed: the server was closed.
        """
        if self._closed:
            raise TransportClosed("nats server is closed")
        if self._nc is not None:
            return
        nc = await _open(
            self._config,
            f"troupe-worker-{self._subject}",
            disconnected=self._on_disconnected,
            reconnected=self._on_reconnected,
        )
        self._nc = nc  # before subscribing: a request may arrive before the flush returns
        try:
            await nc.subscribe(self._subject, cb=self._on_request)
            await nc.subscribe(self._subject + _CONTROL, cb=self._on_control)
            # The server knows our subscriptions once it answers the flush's PING: only then is
            # the address worth advertising.
            await nc.flush(timeout=self._config.connect_timeout)  # type: ignore[arg-type]
        except (TimeoutError, nats.errors.Error) as exc:
            self._nc = None
            await _close_quietly(nc)
            if self.closed:
                raise TransportClosed("nats server closed while starting") from exc
            raise ConnectionLost(
                f"NATS at {_servers_text(self._config)} (NATS_SERVER) dropped the connection "
                f"while subscribing {self._subject}: {exc!r}",
                address=_PREFIX + self._subject,
            ) from exc
        if self.closed:  # close() ran meanwhile and closed the connection
            raise TransportClosed("nats server closed while starting")
        self._started = True

    async def _on_request(self, msg: Msg) -> None:
        reply = msg.reply
        if not reply:
            _log.debug("dropping a message without reply subject on %s", self._subject)
            return
        try:
            frame = decode(msg.data)
        except ProtocolError as exc:
            _log.debug("dropping undecodable request on %s: %s", self._subject, exc)
            return
        kind = type(frame)
        if kind is Request:
            assert isinstance(frame, Request)
            rid = frame.id
            send = self._sender(reply, rid)
            # The caller is the reply subject's inbox (``<inbox>.<request id>``): one client.
            dot = reply.rfind(".")
            refusal = self._runner.start(
                (reply, rid), frame, send, reply[:dot] if dot > 0 else reply
            )
            if refusal is not None:
                # Published at once: the broker, not this worker, holds it for the caller (and
                # drops it for one that does not read).
                await send(refusal)
        elif kind is Cancel:
            self._runner.cancel((reply, frame.id))
        else:
            _log.debug("dropping unexpected %s frame on %s", kind.__name__, self._subject)

    async def _on_control(self, msg: Msg) -> None:
        data = msg.data
        if not data:
            return  # a caller's liveness probe: being subscribed is the answer
        try:
            frame = decode(data)
        except ProtocolError as exc:
            _log.debug("dropping undecodable control message: %s", exc)
            return
        if type(frame) is Cancel and msg.reply:
            self._runner.cancel((msg.reply, frame.id))

    def _sender(self, reply: str, rid: RequestId) -> SendReply:
        nc = self._nc
        assert nc is not None

        async def send(frame: Reply) -> bool:
            if not nc.is_connected:
                return False  # the caller saw the same outage; we tell it on reconnect
            data = encode(frame)
            limit = nc.max_payload
            delivered = True
            if len(data) > limit:
                too_large = MessageTooLarge(len(data), limit, variable="max_payload of nats-server")
                data = encode(Error(rid, "MessageTooLarge", str(too_large)))
                delivered = False
            try:
                await nc.publish(reply, data)
            except nats.errors.Error as exc:
                _log.debug("cannot publish a reply to %s: %r", reply, exc)
                return False
            return delivered

        return send

    async def _on_disconnected(self) -> None:
        if self._closed or self._nc is None:
            return
        _log.warning("worker %s lost its NATS connection; stopping its requests", self._subject)
        broken = self._broken

        def collect(key: object) -> bool:
            if isinstance(key, tuple):
                broken.append(key)
            return True

        self._runner.cancel_where(collect, "disconnected")

    async def _on_reconnected(self) -> None:
        nc = self._nc
        broken, self._broken = self._broken, []
        if nc is None or self._closed:
            return
        _log.info("worker %s reconnected to NATS", self._subject)
        for reply, rid in broken:
            frame = Error(rid, "StreamBroken", "the worker lost its NATS connection mid-request")
            try:
                await nc.publish(reply, encode(frame))
            except nats.errors.Error as exc:
                _log.debug("cannot tell %s its stream broke: %r", reply, exc)
                return

    async def close(self, grace: float = 0.0) -> None:
        """Stop serving: running requests get ``grace`` seconds, then their callers get
        ``StreamBroken``; then the connection closes (pending replies are flushed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._runner.close(grace)
        nc, self._nc = self._nc, None
        if nc is not None:
            await _close_quietly(nc)


# --- the caller side -----------------------------------------------------------------------------


class NatsRpcClient(Client):
    """Calls workers on the NATS plane; one connection and one inbox subscription per client.

    The connection is made on first use, on the calling event loop.

    Args:
        config: the NATS servers, credentials and timeouts (``NATS_*``);
            ``DYN_NATS_REQUEST_TIMEOUT_SECS`` bounds the wait for each reply frame.
        probe_interval: seconds between liveness probes of the workers with open streams.
    """

    def __init__(
        self, config: NatsConfig | None = None, *, probe_interval: float = DEFAULT_PROBE_INTERVAL
    ) -> None:
        if probe_interval <= 0:
            raise ConfigError("probe_interval", probe_interval, "a number of seconds > 0")
        self._config = config if config is not None else NatsConfig()
        self._timeout = self._config.request_timeout
        self._probe_interval = probe_interval
        self._nc: _Nats | None = None
        self._inbox = ""  # "<inbox>." : the reply subject of request N is "<inbox>.N"
        self._connect_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        # request id -> a weak reference to its stream (a stream its caller dropped is
        # collected; plain weakrefs in a plain dict cost less than a WeakValueDictionary).
        self._streams: dict[int, weakref.ref[ResponseStream]] = {}
        self._sweep: TimeoutSweep | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._prober: asyncio.Task[None] | None = None
        self._probe_ids = itertools.count(1)
        self._probes: dict[str, str] = {}  # probe token -> worker address, this tick and the last
        self._last_probes: dict[str, str] = {}
        self._closed = False

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
        """Publish a request to the worker at ``nats:<subject>``; see :meth:`Client.request`.

        Raises:
            MessageTooLarge: the encoded request exceeds the server's ``max_payload``.
            ConnectionLost: the NATS connection is down (or cannot be made at first use).
            TransportError: the address is malformed, or NATS refused the credentials.
            TransportClosed: the client is closed.
        """
        if self._closed:
            raise TransportClosed("nats client is closed", address=address)
        subject = subject_of(address)
        nc = self._nc
        if nc is None or nc.is_closed:
            nc = await self._connect()
        if not nc.is_connected:
            raise ConnectionLost(
                f"NATS connection to {_servers_text(self._config)} is down (reconnecting); "
                f"request to {address} not sent",
                address=address,
            )
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
        limit = nc.max_payload
        if len(data) > limit:
            raise MessageTooLarge(
                len(data), limit, address=address, variable="max_payload of nats-server"
            )
        reply = self._inbox + str(rid)
        sweep = self._sweep
        if sweep is None:
            sweep = self._sweep = TimeoutSweep(asyncio.get_running_loop())
        stream = _NatsStream(
            rid,
            address=address,
            endpoint=endpoint,
            request_timeout=self._timeout,
            deadline=deadline,
            sweep=sweep,
        )
        stream.client = self
        stream.subject = subject
        stream.reply = reply
        self._streams[rid] = weakref.ref(stream)
        try:
            await nc.publish(subject, data, reply=reply)
        except nats.errors.Error as exc:
            self._streams.pop(rid, None)
            raise self._publish_error(exc, address, len(data), limit) from exc
        prober = self._prober
        if prober is None or prober.done():
            self._prober = asyncio.get_running_loop().create_task(
                self._probe_workers(), name=f"NatsRpcClient-probe-{self._inbox[:-1]}"
            )
        return stream

    def _publish_error(
        self, exc: nats.errors.Error, address: str, size: int, limit: int
    ) -> TransportError:
        if isinstance(exc, nats.errors.MaxPayloadError):
            return MessageTooLarge(
                size, limit, address=address, variable="max_payload of nats-server"
            )
        if isinstance(exc, nats.errors.ConnectionClosedError) and self._closed:
            return TransportClosed("nats client is closed", address=address)
        return ConnectionLost(
            f"cannot publish to {address}: the NATS connection failed ({exc!r})", address=address
        )

    async def _connect(self) -> _Nats:
        async with self._connect_lock:
            if self._nc is not None and not self._nc.is_closed:
                return self._nc
            nc = await _open(
                self._config,
                "troupe-caller",
                disconnected=self._on_disconnected,
                reconnected=self._on_reconnected,
            )
            inbox = nc.new_inbox()
            try:
                await nc.subscribe(inbox + ".*", cb=self._on_reply)
            except nats.errors.Error as exc:
                await _close_quietly(nc)
                raise ConnectionLost(
                    f"NATS at {_servers_text(self._config)} (NATS_SERVER) dropped the "
                    f"connection while subscribing the reply inbox: {exc!r}",
                    address=_servers_text(self._config),
                ) from exc
            if self._closed:
                await _close_quietly(nc)
                raise TransportClosed("nats client is closed")
            self._inbox = inbox + "."
            self._nc = nc
            return nc

    def _live_streams(self) -> list[ResponseStream]:
        """The open streams (forgetting those their callers dropped)."""
        live: list[ResponseStream] = []
        for rid, ref in list(self._streams.items()):
            stream = ref()
            if stream is None:
                del self._streams[rid]
            else:
                live.append(stream)
        return live

    async def _on_reply(self, msg: Msg) -> None:
        data = msg.data
        if not data:
            headers = msg.headers
            if headers and headers.get(_STATUS) == _NO_RESPONDERS:
                self._no_responders(msg.subject[len(self._inbox) :])
            return
        try:
            frame = decode(data)
        except ProtocolError as exc:
            _log.debug("dropping undecodable reply on %s: %s", msg.subject, exc)
            return
        kind = type(frame)
        if kind is Chunk or kind is End or kind is Error:
            assert isinstance(frame, Chunk | End | Error)
            rid = frame.id
            if type(rid) is not int:
                return
            ref = self._streams.get(rid)
            if ref is not None:
                stream = ref()
                if stream is not None:
                    stream.deliver(frame)
                else:
                    del self._streams[rid]  # its caller dropped it

    def _no_responders(self, token: str) -> None:
        if token.startswith(_PROBE_TAG):
            address = self._probes.get(token) or self._last_probes.get(token)
            if address is None:
                return
            broken = [s for s in self._live_streams() if s.address == address]
            for stream in broken:
                stream.fail(
                    StreamBroken(
                        f"worker at {address} is gone: nothing subscribes to its subject any more",
                        address=address,
                    )
                )
            return
        try:
            rid = int(token)
        except ValueError:
            return
        ref = self._streams.get(rid)
        pending = None if ref is None else ref()
        if pending is not None:
            pending.fail(
                ConnectionLost(
                    f"no worker at {pending.address}: nothing subscribes to its subject "
                    "(instance gone); the request was not processed",
                    address=pending.address,
                )
            )

    async def _probe_workers(self) -> None:
        """While streams are open, probe each worker they use once per interval."""
        interval = self._probe_interval
        while self._live_streams() and not self._closed:
            await asyncio.sleep(interval)
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            addresses = {stream.address for stream in self._live_streams()}
            probes = {f"{_PROBE_TAG}{next(self._probe_ids)}": address for address in addresses}
            self._last_probes, self._probes = self._probes, probes
            for token, address in probes.items():
                try:
                    await nc.publish(subject_of(address) + _CONTROL, b"", reply=self._inbox + token)
                except nats.errors.Error as exc:
                    _log.debug("cannot probe %s: %r", address, exc)
                    break

    def _cancel(self, subject: str, reply: str, rid: int) -> None:
        nc = self._nc
        if nc is None or self._closed or not nc.is_connected:
            return
        task = asyncio.get_running_loop().create_task(
            self._send_cancel(nc, subject + _CONTROL, reply, rid),
            name=f"NatsRpcClient-cancel-{rid}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _send_cancel(nc: _Nats, control: str, reply: str, rid: int) -> None:
        try:
            await nc.publish(control, encode(Cancel(rid)), reply=reply)
        except nats.errors.Error as exc:
            _log.debug("cannot send Cancel(%d) to %s: %r", rid, control, exc)

    async def _on_disconnected(self) -> None:
        if self._closed:
            return
        streams = self._live_streams()
        if streams:
            _log.warning(
                "lost the NATS connection; failing %d open request stream(s)", len(streams)
            )
        for stream in streams:
            stream.fail(
                StreamBroken(
                    f"lost the NATS connection to {_servers_text(self._config)} mid-stream",
                    address=stream.address,
                )
            )

    async def _on_reconnected(self) -> None:
        _log.info("NATS connection restored (%s)", _servers_text(self._config))

    async def close(self) -> None:
        """Fail open streams with ``TransportClosed`` and close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for stream in self._live_streams():
            stream.fail(TransportClosed("nats client closed", address=stream.address))
        self._streams.clear()
        if self._sweep is not None:
            self._sweep.close()
        tasks = list(self._tasks)
        if self._prober is not None:
            self._prober.cancel()
            tasks.append(self._prober)
            self._prober = None
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        async with self._connect_lock:
            nc, self._nc = self._nc, None
        if nc is not None:
            await _close_quietly(nc)


class _NatsStream(ResponseStream):
    """A stream that cancels and forgets itself through its client (no closures)."""

    __slots__ = ("client", "reply", "subject")

    client: NatsRpcClient
    subject: str
    reply: str

    def _send_cancel(self) -> None:
        self.client._cancel(self.subject, self.reply, self.request_id)  # type: ignore[arg-type]

    def _finished(self) -> None:
        self.client._streams.pop(self.request_id, None)  # type: ignore[arg-type]


# --- the plane module interface ------------------------------------------------------------------


def create_server(settings: TransportSettings) -> NatsRpcServer:
    """A NATS server for ``settings.nats`` (not yet started)."""
    return NatsRpcServer(settings.nats)


def create_client(settings: TransportSettings) -> NatsRpcClient:
    """A NATS client for ``settings.nats`` (connects on first request)."""
    return NatsRpcClient(settings.nats)
