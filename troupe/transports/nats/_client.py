"""The caller side of the NATS plane: :class:`NatsRpcClient`, one connection and one inbox.

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
  reconnected, which it keeps trying forever.

Performance: nats-py's callback subscriptions already run one task per subscription, so replies
are routed by a plain callback (no task, no timer per message); flushing is left to nats-py's
coalescing flusher.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from collections.abc import Mapping
from typing import Final

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
from troupe.messages._frames import Cancel, Chunk, End, Error, decode, encode, encode_request
from troupe.transports._base import Client, ResponseStream, TimeoutSweep, TransportSettings
from troupe.transports.nats._connection import _close_quietly, _open, _servers_text
from troupe.transports.nats._subjects import _CONTROL, subject_of

_log = logging.getLogger("troupe.transports.nats")

DEFAULT_PROBE_INTERVAL: Final = 0.25
"""Seconds between liveness probes of the workers a client has open streams with."""
_NO_RESPONDERS: Final = "503"
_STATUS: Final = "Status"
_PROBE_TAG: Final = "p"


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


def create_client(settings: TransportSettings) -> NatsRpcClient:
    """A NATS client for ``settings.nats`` (connects on first request)."""
    return NatsRpcClient(settings.nats)
