"""The caller side of the NATS plane: :class:`NatsRpcClient`, one connection and one inbox.

Security: the inbox is ``DYN_NATS_INBOX_PREFIX.<random>``, so NATS permissions can let a user
subscribe to its own prefix only. Each request gets a reply subject of its own,
``<inbox>.<id>.<token>``, derived from a secret the client never sends (see
:mod:`~troupe.transports.nats._subjects`): a reply on any other subject (an injected frame, a
forged "no responders") is dropped, and only this client can cancel its requests.

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
- A stream dropped without closing it, or still open when the client closes: ``Cancel`` to its
  worker (at once for a dropped one, when it is garbage-collected), as on every plane.
- Broker outage: the caller's open streams fail with ``StreamBroken`` when its connection drops,
  and new requests fail at once with ``ConnectionLost`` (nothing is buffered) until nats-py has
  reconnected, which it keeps trying forever.

Performance: nats-py's callback subscriptions already run one task per subscription, so replies
are routed by a plain callback (no task, no timer per message); flushing is left to nats-py's
coalescing flusher.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Final

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
    StreamBroken,
    TransportClosed,
    TransportError,
)
from troupe.messages._frames import Cancel, Frame, RequestId, Undecodable, decode, encode
from troupe.transports._base import Client, ResponseStream, TimeoutSweep, TransportSettings
from troupe.transports._session import CallerSession, SessionStream, StreamRef, collect_on
from troupe.transports.nats._connection import _close_quietly, _open, _servers_text
from troupe.transports.nats._subjects import _CONTROL, _KEY_HEADER, reply_token, subject_of

_log = get_logger("troupe.transports.nats")

DEFAULT_PROBE_INTERVAL: Final = 0.25
"""Seconds between liveness probes of the workers a client has open streams with."""
_NO_RESPONDERS: Final = "503"
_STATUS: Final = "Status"
_PROBE_TAG: Final = "p"
_SUBJECT_CACHE: Final = 4096  # reply subjects remembered (streams open at once, typically)


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
        self._inbox = ""  # "<inbox>." : the reply subject of request N is "<inbox>.N.<token>"
        self._refused: TransportError | None = None  # the server refused this client's inbox
        # Cancel keys (and so reply subjects) derive from it; it never leaves this client.
        self._secret = secrets.token_bytes(32)
        # Every reply is checked against its request's subject: derive each one once.
        self._reply = functools.lru_cache(maxsize=_SUBJECT_CACHE)(self._derive_reply)
        self._connect_lock = asyncio.Lock()
        # The open requests, by id. A stream its caller dropped without closing it is
        # collected, and _dropped (on the loop) forgets it and sends Cancel.
        self._session: CallerSession[SessionStream] = CallerSession(
            self._cancel, on_collected=self._on_collected, log=_log
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweep: TimeoutSweep | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._prober: asyncio.Task[None] | None = None
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
            TransportError: the address is malformed, or NATS refused the credentials or the
                reply inbox (``DYN_NATS_INBOX_PREFIX`` not granted by the user's permissions).
            TransportClosed: the client is closed.
        """
        if self._closed:
            raise TransportClosed("nats client is closed", address=address)
        subject = subject_of(address)
        nc = self._nc
        if nc is None or nc.is_closed:
            nc = await self._connect()
        if self._refused is not None:
            raise self._refused
        if not nc.is_connected:
            raise ConnectionLost(
                f"NATS connection to {_servers_text(self._config)} is down (reconnecting); "
                f"request to {address} not sent",
                address=address,
            )
        limit = nc.max_payload
        rid, data = self._session.ids.encode(
            address,
            endpoint,
            payload,
            deadline=deadline,
            headers=headers,
            attempt=attempt,
            received=received,
            limit=limit,
            variable="max_payload of nats-server",
        )
        reply = self._reply(rid)
        sweep = self._sweep
        if sweep is None:
            self._loop = asyncio.get_running_loop()
            sweep = self._sweep = TimeoutSweep(self._loop)
        stream = self._session.open(
            SessionStream(
                rid,
                address=address,
                endpoint=endpoint,
                request_timeout=self._timeout,
                deadline=deadline,
                sweep=sweep,
            )
        )
        try:
            await nc.publish(subject, data, reply=reply)
        except nats.errors.Error as exc:
            self._session.forget(rid)
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
            inbox = ""

            async def refused(text: str) -> None:
                if inbox and inbox.lower() in text.lower():
                    await self._inbox_refused(inbox, text)

            nc = await _open(
                self._config,
                "troupe-caller",
                disconnected=self._on_disconnected,
                reconnected=self._on_reconnected,
                refused=refused,
            )
            inbox = nc.new_inbox()  # DYN_NATS_INBOX_PREFIX.<random>
            try:
                await nc.subscribe(inbox + ".>", cb=self._on_reply)
                # The server answers the flush's PING after refusing the subscription, if it
                # does: a caller whose inbox is not granted learns it now, not by timeouts.
                await nc.flush(timeout=self._config.connect_timeout)  # type: ignore[arg-type]
            except (TimeoutError, nats.errors.Error) as exc:
                await _close_quietly(nc)
                raise ConnectionLost(
                    f"NATS at {_servers_text(self._config)} (NATS_SERVER) dropped the "
                    f"connection while subscribing the reply inbox: {exc!r}",
                    address=_servers_text(self._config),
                ) from exc
            error = nc.last_error
            if error is not None and "permissions violation" in str(error).lower():
                await self._inbox_refused(inbox, str(error))
            if self._refused is not None:
                await _close_quietly(nc)
                raise self._refused
            if self._closed:
                await _close_quietly(nc)
                raise TransportClosed("nats client is closed")
            self._inbox = inbox + "."
            self._reply.cache_clear()  # subjects derived under an earlier inbox
            self._nc = nc
            return nc

    def _key(self, rid: RequestId) -> bytes:
        """The cancel key of request ``rid``: only this client can compute it."""
        return hashlib.blake2b(str(rid).encode(), key=self._secret, digest_size=16).digest()

    def _derive_reply(self, rid: RequestId) -> str:
        """The one subject request ``rid``'s replies are accepted on (see ``_reply``)."""
        return f"{self._inbox}{rid}.{reply_token(self._key(rid))}"

    def _request_of(self, subject: str) -> int | None:
        """The request whose reply subject is exactly ``subject``, or ``None``."""
        rid_text, dot, _ = subject[len(self._inbox) :].partition(".")
        if not dot or not rid_text.isdigit():
            return None
        rid = int(rid_text)
        return rid if hmac.compare_digest(subject, self._reply(rid)) else None

    async def _on_reply(self, msg: Msg) -> None:
        data = msg.data
        subject = msg.subject
        if not data:
            headers = msg.headers
            if headers and headers.get(_STATUS) == _NO_RESPONDERS:
                self._no_responders(subject)
            return
        rid = self._request_of(subject)
        if rid is None:
            # Not a subject this client gave a worker: injected by someone else.
            self._session.dropped.unexpected += 1
            _log.debug("dropping a reply on a subject no request of ours uses", subject=subject)
            return
        try:
            frame: Frame | Undecodable = decode(data)
        except ProtocolError as exc:
            frame = Undecodable.of(data, exc)
        # Routed by the subject, which only our worker knows; a Cancel for a reply nobody reads
        # is not sent (see __init__).
        self._session.receive(frame, rid)

    def _no_responders(self, subject: str) -> None:
        token = subject[len(self._inbox) :]
        if token.startswith(_PROBE_TAG):
            address = self._probes.get(token) or self._last_probes.get(token)
            if address is None:
                return
            broken = [s for s in self._session.live() if s.address == address]
            for stream in broken:
                stream.fail(
                    StreamBroken(
                        f"worker at {address} is gone: nothing subscribes to its subject any more",
                        address=address,
                    )
                )
            return
        rid = self._request_of(subject)
        if rid is None:
            return
        pending = self._session.get(rid)
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
        while self._session.live() and not self._closed:
            await asyncio.sleep(interval)
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            addresses = {stream.address for stream in self._session.live()}
            # Unguessable, so that nobody else can fake a worker's death with a "no responders".
            probes = {f"{_PROBE_TAG}{secrets.token_hex(8)}": address for address in addresses}
            self._last_probes, self._probes = self._probes, probes
            for token, address in probes.items():
                try:
                    await nc.publish(subject_of(address) + _CONTROL, b"", reply=self._inbox + token)
                except nats.errors.Error as exc:
                    _log.debug("cannot probe a worker", address=address, error=repr(exc))
                    break

    def _cancel(self, stream: SessionStream, cancel: Cancel) -> None:
        """The session's hook: a caller gave up its stream; tell its worker (never blocks)."""
        self._send_cancel(stream.address, cancel)

    def _on_collected(self, ref: StreamRef[SessionStream]) -> None:
        """The session's hook for a stream dropped unclosed (any thread): see :func:`collect_on`."""
        loop = self._loop
        if loop is not None:
            collect_on(loop, self._dropped)(ref)

    def _dropped(self, ref: StreamRef[SessionStream]) -> None:
        cancel = self._session.collected(ref)
        if cancel is not None:
            self._send_cancel(ref.address, cancel)

    def _send_cancel(self, address: str, cancel: Cancel) -> None:
        """Publish ``cancel`` to the control subject of the worker at ``address``, with the
        request's reply subject (together with the id, that names the request there)."""
        nc = self._nc
        if nc is None or self._closed or not nc.is_connected:
            return
        task = asyncio.get_running_loop().create_task(
            self._publish_cancel(nc, address, cancel),
            name=f"NatsRpcClient-cancel-{cancel.id}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_cancel(self, nc: _Nats, address: str, cancel: Cancel) -> None:
        control = subject_of(address) + _CONTROL
        rid = cancel.id
        headers = {_KEY_HEADER: self._key(rid).hex()}
        try:
            await nc.publish(control, encode(cancel), reply=self._reply(rid), headers=headers)
        except nats.errors.Error as exc:
            _log.debug("cannot send a Cancel", id=cancel.id, subject=control, error=repr(exc))

    async def _inbox_refused(self, inbox: str, text: str) -> None:
        """The server refused this client's reply inbox: every request fails at once with one
        line naming ``DYN_NATS_INBOX_PREFIX`` (the refusal may come after the first requests
        were sent: their streams fail with it too, rather than time out)."""
        if self._refused is None:
            self._refused = TransportError(
                f"NATS at {_servers_text(self._config)} refused this user the reply inbox "
                f"{inbox}.> ({text}): set DYN_NATS_INBOX_PREFIX to the prefix its NATS "
                "permissions allow it to subscribe to",
                address=_servers_text(self._config),
            )
        error = self._refused
        self._session.fail_all(lambda stream: error)

    async def _on_disconnected(self) -> None:
        if self._closed:
            return
        servers = _servers_text(self._config)
        failed = self._session.fail_all(
            lambda stream: StreamBroken(
                f"lost the NATS connection to {servers} mid-stream", address=stream.address
            )
        )
        if failed:
            _log.warning("lost the NATS connection; failed the open request streams", count=failed)

    async def _on_reconnected(self) -> None:
        _log.info("NATS connection restored", servers=_servers_text(self._config))

    async def close(self) -> None:
        """Fail open streams with ``TransportClosed`` and close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        nc = self._nc
        if nc is not None and nc.is_connected:
            # Tell the workers now rather than leave silent handlers running (the connection
            # flushes what is queued when it closes, below).
            for stream, cancel in self._session.cancel_open():
                await self._publish_cancel(nc, stream.address, cancel)
        self._session.fail_all(
            lambda stream: TransportClosed("nats client closed", address=stream.address)
        )
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


def create_client(settings: TransportSettings) -> NatsRpcClient:
    """A NATS client for ``settings.nats`` (connects on first request)."""
    return NatsRpcClient(settings.nats)
