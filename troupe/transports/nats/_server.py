"""The worker side of the NATS plane: :class:`NatsRpcServer`, one subject of its own.

Broker outage: a worker that loses its connection stops its running requests and, once
reconnected, tells their callers ``StreamBroken``; its subscriptions are restored by nats-py, so
it serves again without a restart.

Cancels: a ``Cancel`` stops a request only when it carries the request's cancel key (see
:mod:`~troupe.transports.nats._subjects`); a forged one, from a client that read or guessed the
request's reply subject, is dropped and logged at debug level, and the request goes on.
"""

from __future__ import annotations

import secrets

import nats.errors
from nats.aio.client import Client as _Nats
from nats.aio.msg import Msg

from troupe._support._logging import get_logger
from troupe.config import NatsConfig
from troupe.errors import (
    ConfigError,
    ConnectionLost,
    MessageTooLarge,
    ProtocolError,
    TransportClosed,
    TransportError,
)
from troupe.messages._frames import Cancel, Error, Reply, Request, RequestId, decode, encode
from troupe.transports._base import Server, TransportSettings
from troupe.transports._dispatch import SendReply
from troupe.transports.nats._connection import _close_quietly, _open, _servers_text
from troupe.transports.nats._subjects import (
    _CONTROL,
    _KEY_HEADER,
    _PREFIX,
    _SUBJECT_RE,
    SUBJECT_PREFIX,
    caller_of,
    cancel_allowed,
)

_log = get_logger("troupe.transports.nats")


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
            _log.debug("dropping a message without reply subject", subject=self._subject)
            return
        try:
            frame = decode(msg.data)
        except ProtocolError as exc:
            _log.debug("dropping an undecodable request", subject=self._subject, error=str(exc))
            return
        kind = type(frame)
        if kind is Request:
            assert isinstance(frame, Request)
            rid = frame.id
            send = self._sender(reply, rid)
            # The caller is the reply subject's inbox (``<inbox>.<request id>[.<token>]``).
            refusal = self._runner.start((reply, rid), frame, send, caller_of(reply, rid))
            if refusal is not None:
                # Published at once: the broker, not this worker, holds it for the caller (and
                # drops it for one that does not read).
                await send(refusal)
        elif kind is Cancel:
            self._cancel(msg, reply, frame.id)
        else:
            _log.debug("dropping an unexpected frame", frame=kind.__name__, subject=self._subject)

    async def _on_control(self, msg: Msg) -> None:
        data = msg.data
        if not data:
            return  # a caller's liveness probe: being subscribed is the answer
        try:
            frame = decode(data)
        except ProtocolError as exc:
            _log.debug("dropping an undecodable control message", error=str(exc))
            return
        if type(frame) is Cancel and msg.reply:
            self._cancel(msg, msg.reply, frame.id)

    def _cancel(self, msg: Msg, reply: str, rid: RequestId) -> None:
        """Stop request ``(reply, rid)`` if ``msg`` carries its cancel key; else drop it."""
        headers = msg.headers
        key = headers.get(_KEY_HEADER) if headers else None
        if not cancel_allowed(reply, rid, key):
            _log.debug("dropping a Cancel without the request's key", id=rid, subject=reply)
            return
        self._runner.cancel((reply, rid))

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
                _log.debug("cannot publish a reply", subject=reply, error=repr(exc))
                return False
            return delivered

        return send

    async def _on_disconnected(self) -> None:
        if self._closed or self._nc is None:
            return
        _log.warning(
            "worker lost its NATS connection; stopping its requests", subject=self._subject
        )
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
        _log.info("worker reconnected to NATS", subject=self._subject)
        for reply, rid in broken:
            frame = Error(rid, "StreamBroken", "the worker lost its NATS connection mid-request")
            try:
                await nc.publish(reply, encode(frame))
            except nats.errors.Error as exc:
                _log.debug("cannot tell a caller its stream broke", subject=reply, error=repr(exc))
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


def create_server(settings: TransportSettings) -> NatsRpcServer:
    """A NATS server for ``settings.nats`` (not yet started)."""
    return NatsRpcServer(settings.nats)
