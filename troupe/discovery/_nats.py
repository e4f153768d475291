"""The ``nats`` store: a JetStream key-value bucket at ``NATS_SERVER``.

The bucket keeps one message per key (history 1) and allows per-message TTLs; its subject delete
markers (``limit_marker_ttl``, nats-server >= 2.11) turn an expired key into a delete event that
watchers see. Leases are client-side: a lease is the set of keys this store wrote under it, each
published with a ``Nats-TTL`` header of the lease's TTL (whole seconds) and a ``Troupe-Lease``
header naming the lease (a message is bound to a lease only with both headers: one written by
hand is reported lease-less, and routers ignore it); :meth:`NatsStore.keep_alive` re-publishes
them (guarded by the expected last sequence, so a key that expired or was overwritten is
noticed), :meth:`NatsStore.revoke_lease` deletes them. Delete markers carry a TTL too, so
tombstones do not pile up.

Keys map to subjects reversibly (``ns/comp/ep`` -> ``ns.comp.ep``, see
:mod:`troupe.discovery._nats_feed`, which also decodes messages and feeds watches; this module
keeps the connection, the leases and the writes).

Watches use an ephemeral push consumer (deliver last per subject, then new messages) on a plain
subscription: the consumer sequence of each message is checked, and a gap, or the loss of the
connection, ends the watch with ``DiscoveryUnavailable``. A keep-alive re-publishes unchanged
values; watches drop such no-op puts (same value, same lease), so subscribers see none of them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import math
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api

from troupe._support._logging import get_logger
from troupe.config import NatsConfig, redact_urls
from troupe.discovery._nats_feed import (
    _KV_OP,
    _LEASE_HEADER,
    _REASON_HEADER,
    _TTL_HEADER,
    _Feed,
    _Record,
    _record,
    decode_nats_key,
    encode_nats_key,
)
from troupe.discovery._store import (
    KeyValue,
    KeyValueStore,
    MonotonicClock,
    Snapshot,
    TimeSource,
    WatchEvent,
    check_key,
    normalize_prefix,
)
from troupe.errors import DiscoveryError, KeyExists, LeaseLost

__all__ = ["NatsStore", "decode_nats_key", "encode_nats_key"]

T = TypeVar("T")

_log = get_logger(__name__)

_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST_SEQUENCE = (10071, 10164)
_UNREACHABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoServersError,
    nats.errors.UnexpectedEOF,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    OSError,
    TimeoutError,
)
_CONSUMER_INACTIVE = 5.0  # seconds before the server drops a watch consumer nobody reads


def _ttl_seconds(ttl: float) -> int:
    return max(1, math.ceil(ttl))


@dataclass
class _NatsLease:
    ttl: float
    refreshed: float
    keys: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # key -> (value, sequence)


class NatsStore(KeyValueStore):
    """A :class:`KeyValueStore` on a NATS JetStream KV bucket.

    Args:
        config: servers, credentials and timeouts (``NATS_*``).
        bucket: the KV bucket; created (history 1, per-key TTL, delete markers) if missing.
        clock: time source of the client-side lease bookkeeping (default: monotonic).
        marker_ttl: seconds the server keeps delete markers (whole seconds, >= 1).
    """

    name = "nats"
    # The bucket keeps one message per key: a write that a newer one replaces before a lagging
    # watch has read it is gone from the stream, and the watch sees only the newer value (the
    # final state is never missed).
    exact_history = False

    def __init__(
        self,
        config: NatsConfig | None = None,
        *,
        bucket: str = "troupe_discovery",
        clock: TimeSource | None = None,
        marker_ttl: float = 60.0,
    ) -> None:
        self.config = config if config is not None else NatsConfig()
        self.bucket = bucket
        self._stream = f"KV_{bucket}"
        self._pre = f"$KV.{bucket}."
        self._clock: TimeSource = clock if clock is not None else MonotonicClock()
        self._marker_ttl = _ttl_seconds(marker_ttl)
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._leases: dict[int, _NatsLease] = {}
        self._feeds: set[_Feed] = set()
        self._last_error: BaseException | None = None
        self._auth_error: BaseException | None = None

    @property
    def endpoints(self) -> tuple[str, ...]:
        # For error messages: credentials in a NATS_SERVER URL are masked.
        return tuple(redact_urls(server) for server in self.config.servers)

    # --- connection -------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._nc is not None:
            return
        config = self.config
        nc = NatsClient()
        options: dict[str, Any] = {
            "servers": list(config.servers),
            "name": "troupe-discovery",
            "connect_timeout": config.connect_timeout,
            "reconnect_time_wait": 0.5,
            "max_reconnect_attempts": -1,  # keep trying; a lost connection fails watches
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if config.username is not None:
            options["user"] = config.username
            options["password"] = config.password
        if config.token is not None:
            options["token"] = config.token
        if config.credentials_file is not None:
            options["user_credentials"] = config.credentials_file
        self._last_error = self._auth_error = None
        try:
            await asyncio.wait_for(nc.connect(**options), config.connect_timeout)
        except (TimeoutError, *_UNREACHABLE, nats.errors.Error) as exc:
            await nc.close()
            raise self._connect_error(exc) from exc
        js = nc.jetstream(timeout=config.request_timeout)
        try:
            await self._ensure_bucket(js)
        except BaseException:
            await nc.close()
            raise
        self._nc, self._js = nc, js

    def _connect_error(self, exc: BaseException) -> DiscoveryError:
        if self._auth_error is not None:  # seen on any attempt: retrying will not help
            return DiscoveryError(
                f"NATS authorization failed at {', '.join(self.endpoints)}: {self._auth_error}"
            )
        cause = self._last_error or exc
        detail = str(cause) or type(cause).__name__
        return self._unavailable(
            f"no connection within {self.config.connect_timeout:g} s ({detail})"
        )

    async def _ensure_bucket(self, js: JetStreamContext) -> None:
        try:
            info = await js.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            info = None
        except _UNREACHABLE as exc:
            raise self._unavailable(f"JetStream unavailable: {exc}") from exc
        except nats.js.errors.APIError as exc:
            raise DiscoveryError(f"JetStream refused stream info of {self._stream}: {exc}") from exc
        if info is None:
            kv_config = api.KeyValueConfig(
                bucket=self.bucket, history=1, limit_marker_ttl=self._marker_ttl
            )
            try:
                await js.create_key_value(kv_config)
            except nats.js.errors.KeyValueLimitMarkerTTLNotSupportedError as exc:
                raise DiscoveryError(
                    "the NATS store needs nats-server >= 2.11 (per-key TTL and delete markers)"
                ) from exc
            except _UNREACHABLE as exc:
                raise self._unavailable(f"cannot create bucket {self.bucket}: {exc}") from exc
            except nats.js.errors.APIError as exc:
                raise DiscoveryError(f"cannot create KV bucket {self.bucket}: {exc}") from exc
            return
        cfg = info.config
        if not cfg.allow_msg_ttl or not cfg.subject_delete_marker_ttl:
            raise DiscoveryError(
                f"KV bucket {self.bucket} exists without per-key TTL or delete markers; "
                "delete it or choose another bucket"
            )

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        feeds, self._feeds = self._feeds, set()
        for feed in feeds:
            feed.finish()
        if nc is not None:
            await nc.close()

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        if isinstance(exc, nats.errors.AuthorizationError) or "authorization" in str(exc).lower():
            self._auth_error = exc
        _log.debug("nats discovery connection error", error=str(exc))

    async def _on_disconnected(self) -> None:
        if self._nc is None:
            return  # we closed it
        _log.warning("nats discovery connection lost", servers=",".join(self.endpoints))
        for feed in list(self._feeds):
            feed.fail(self._unavailable("connection lost"))

    async def _on_reconnected(self) -> None:
        _log.info("nats discovery connection restored", servers=",".join(self.endpoints))

    def _require(self) -> tuple[NatsClient, JetStreamContext]:
        nc, js = self._nc, self._js
        if nc is None or js is None:
            raise self._unavailable("store is not connected")
        if not nc.is_connected:
            raise self._unavailable("connection lost; reconnecting")
        return nc, js

    async def _call(self, what: str, op: Callable[[JetStreamContext], Awaitable[T]]) -> T:
        _, js = self._require()
        try:
            return await op(js)
        except _UNREACHABLE as exc:
            raise self._unavailable(f"{what}: {str(exc) or type(exc).__name__}") from exc
        except nats.errors.MaxPayloadError as exc:
            raise DiscoveryError(f"{what}: value exceeds the server's max_payload") from exc

    # --- raw bucket access ------------------------------------------------------------------------

    def _subject(self, key: str) -> str:
        return self._pre + encode_nats_key(key)

    async def _publish(self, key: str, value: bytes, headers: dict[str, str]) -> int | None:
        """Publish to ``key``; None when an expected-last-sequence header did not match."""

        async def op(js: JetStreamContext) -> int | None:
            try:
                ack = await js.publish(self._subject(key), value, headers=headers)
            except nats.js.errors.ServiceUnavailableError:
                raise  # JetStream is not answering: _call reports it as unavailable
            except nats.js.errors.APIError as exc:
                if exc.err_code in _WRONG_LAST_SEQUENCE:
                    return None
                raise DiscoveryError(f"JetStream refused a write of {key}: {exc}") from exc
            return int(ack.seq)

        return await self._call("publish", op)

    async def _last(self, key: str) -> _Record | None:
        async def op(js: JetStreamContext) -> _Record | None:
            try:
                msg = await js.get_msg(self._stream, subject=self._subject(key))
            except nats.js.errors.NotFoundError:
                return None
            except nats.js.errors.ServiceUnavailableError:
                raise  # JetStream is not answering: _call reports it as unavailable
            except nats.js.errors.APIError as exc:
                raise DiscoveryError(f"JetStream refused a read of {key}: {exc}") from exc
            return _record(key, int(msg.seq or 0), msg.data, msg.headers)

        return await self._call("get", op)

    def _lease_headers(self, lease: int, state: _NatsLease) -> dict[str, str]:
        return {_TTL_HEADER: f"{_ttl_seconds(state.ttl)}s", _LEASE_HEADER: str(lease)}

    def _delete_headers(self, *, by_lease: bool) -> dict[str, str]:
        headers = {_KV_OP: "DEL", _TTL_HEADER: f"{self._marker_ttl}s"}
        if by_lease:
            headers[_REASON_HEADER] = "lease"
        return headers

    # --- leases (client-side) ---------------------------------------------------------------------

    async def grant_lease(self, ttl: float) -> int:
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0, got {ttl!r}")
        self._require()
        lease = secrets.randbits(63) or 1
        self._leases[lease] = _NatsLease(ttl, self._clock.now())
        return lease

    def _live_lease(self, lease: int) -> _NatsLease:
        state = self._leases.get(lease)
        if state is None:
            raise LeaseLost(lease, "expired or revoked")
        if self._clock.now() - state.refreshed > state.ttl:
            del self._leases[lease]
            raise LeaseLost(lease, f"not refreshed for more than its TTL of {state.ttl:g} s")
        return state

    async def keep_alive(self, lease: int) -> None:
        self._require()
        state = self._live_lease(lease)
        refreshed = self._clock.now()
        for key, (value, seq) in list(state.keys.items()):
            headers = self._lease_headers(lease, state) | {_EXPECTED_LAST: str(seq)}
            new_seq = await self._publish(key, value, headers)
            if new_seq is not None:
                state.keys[key] = (value, new_seq)
                continue
            current = await self._last(key)
            if current is None or (current.value is None and current.expired):
                del self._leases[lease]
                raise LeaseLost(lease, f"{key} expired")
            del state.keys[key]  # deleted or overwritten by someone else: no longer ours
        state.refreshed = refreshed

    async def revoke_lease(self, lease: int) -> None:
        self._require()
        state = self._leases.pop(lease, None)
        if state is None:
            return
        for key, (_, seq) in sorted(state.keys.items()):
            headers = self._delete_headers(by_lease=True) | {_EXPECTED_LAST: str(seq)}
            await self._publish(key, b"", headers)

    def _forget(self, key: str) -> None:
        for state in self._leases.values():
            state.keys.pop(key, None)

    # --- keys -------------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        return await self._write(check_key(key), bytes(value), lease, create=False)

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        return await self._write(check_key(key), bytes(value), lease, create=True)

    async def _write(self, key: str, value: bytes, lease: int | None, *, create: bool) -> int:
        self._require()
        state = self._live_lease(lease) if lease is not None else None
        headers = self._lease_headers(lease, state) if lease is not None and state else {}
        if not create:
            seq = await self._publish(key, value, headers)
            assert seq is not None  # no expected-sequence header: never a mismatch
        else:
            expected = 0
            for _ in range(3):
                seq = await self._publish(key, value, headers | {_EXPECTED_LAST: str(expected)})
                if seq is not None:
                    break
                current = await self._last(key)
                if current is not None and current.value is not None:
                    raise KeyExists(key)
                # A delete marker (or nothing, once the marker aged out) sits there: retry
                # against it; a concurrent creator makes the next attempt fail.
                expected = current.seq if current is not None else 0
            else:
                raise KeyExists(key)
        self._forget(key)
        if state is not None and lease is not None:
            state.keys[key] = (value, seq)
        return seq

    async def get(self, key: str) -> KeyValue | None:
        self._require()
        record = await self._last(check_key(key))
        if record is None or record.value is None:
            return None
        return KeyValue(key, record.value, record.seq, record.lease)

    async def delete(self, key: str) -> bool:
        self._require()
        key = check_key(key)
        self._forget(key)
        for _ in range(3):
            current = await self._last(key)
            if current is None or current.value is None:
                return False
            headers = self._delete_headers(by_lease=False) | {_EXPECTED_LAST: str(current.seq)}
            if await self._publish(key, b"", headers) is not None:
                return True
        return False  # raced with other writers three times: report it as not ours

    async def list(self, prefix: str) -> tuple[builtins.list[KeyValue], int]:
        self._require()
        prefix = normalize_prefix(prefix)
        async with self._consumer(prefix) as (snapshot, _):
            return list(snapshot.items), snapshot.revision

    # --- watch ------------------------------------------------------------------------------------

    def _filters(self, prefix: str) -> builtins.list[str]:
        if not prefix:
            return [self._pre + ">"]
        return [self._subject(prefix) + ".>"]

    @contextlib.asynccontextmanager
    async def _consumer(self, prefix: str) -> AsyncGenerator[tuple[Snapshot, _Feed], None]:
        """An ephemeral consumer on ``prefix``: the snapshot, and a feed of later changes."""
        nc, js = self._require()
        feed = _Feed(self, prefix)
        self._feeds.add(feed)
        sub = None
        consumer = None
        try:
            before = await self._call("stream info", lambda j: j.stream_info(self._stream))
            deliver = nc.new_inbox()
            sub = await nc.subscribe(deliver, cb=feed.on_msg)
            config = api.ConsumerConfig(
                deliver_subject=deliver,
                filter_subjects=self._filters(prefix),
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                ack_policy=api.AckPolicy.NONE,
                max_deliver=1,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=_CONSUMER_INACTIVE,
            )
            try:
                info = await self._call("watch", lambda j: j.add_consumer(self._stream, config))
            except nats.js.errors.APIError as exc:  # unreachable errors were translated already
                raise DiscoveryError(f"JetStream refused a watch on {prefix!r}: {exc}") from exc
            consumer = info.name
            snapshot = await feed.snapshot(int(info.num_pending or 0), before.state.last_seq)
            yield snapshot, feed
        finally:
            self._feeds.discard(feed)
            if sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
            if consumer is not None and self._nc is not None and self._nc.is_connected:
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await js.delete_consumer(self._stream, consumer)

    async def _watch(self, prefix: str) -> AsyncGenerator[WatchEvent, None]:
        async with self._consumer(prefix) as (snapshot, feed):
            yield snapshot
            while True:
                event = await feed.next_event()
                if event is None:
                    return
                yield event
