"""The ``etcd`` store (the default): etcd v3 over gRPC through aetcd.

Leases, TTL expiry and revisions are etcd's own. Fail-over: every endpoint of ``ETCD_ENDPOINTS`` is
probed at once when connecting, and the first to answer is used; when a call then fails to reach
it, the store connects again (to whichever endpoint answers first) and retries the call once, so an
operation fails with ``DiscoveryUnavailable`` only when no endpoint answers within the connect
timeout. A watch reads the prefix and then watches from the read's revision + 1 (no gap); when
its stream breaks (etcd restarted, endpoint lost) it raises ``DiscoveryUnavailable`` and the caller
watches again. A list or watch of prefix ``P`` reads only the range ``[P/, P0)``, so a user granted
``P/`` (``--prefix``) may do both. Basic auth (``ETCD_AUTH_USERNAME``/``PASSWORD``) is sent as
etcd's token metadata; TLS (``https://`` endpoints or ``ETCD_AUTH_CA``, with an optional client
certificate and key) uses a secure gRPC channel, its credentials and handshake errors in
:mod:`troupe.discovery._etcd_tls`. aetcd 1.0 only builds plaintext channels, hence
:class:`_Client`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import math
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

from troupe.discovery import _grpc_env  # noqa: F401 - before grpc loads: see the module

# isort: split

import aetcd
import grpc
from aetcd import exceptions as etcd_errors
from aetcd import rpc, watcher

from troupe.config import EtcdConfig
from troupe.discovery._etcd_tls import channel_credentials, handshake_failure
from troupe.discovery._store import (
    Delete,
    KeyValue,
    KeyValueStore,
    Put,
    Snapshot,
    WatchEvent,
    check_key,
    key_matches,
    normalize_prefix,
)
from troupe.errors import DiscoveryError, KeyExists, LeaseLost

__all__ = ["EtcdStore"]

T = TypeVar("T")

_CHANNEL_OPTIONS = {
    # Ping idle connections so that a silently dead endpoint is noticed (etcd accepts pings
    # every 5 s or slower by default: --grpc-keepalive-min-time).
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    # gRPC shares subchannels between channels to the same target by default: a new channel
    # would inherit a failed one's reconnect backoff and report "connection refused" for a
    # while after the endpoint came back. Fail-over builds fresh channels, so keep them apart.
    "grpc.use_local_subchannel_pool": 1,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2_000,
}
_UNREACHABLE = (
    etcd_errors.ConnectionFailedError,
    etcd_errors.ConnectionTimeoutError,
    etcd_errors.WatchTimeoutError,
)
_UNREACHABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_LEASE_NOT_FOUND = "requested lease not found"
_DEAD_LEASE_CACHE = 1024


class _Endpoint(NamedTuple):
    url: str
    host: str
    port: int
    tls: bool


def _parse_endpoint(url: str) -> _Endpoint:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal, as gRPC targets spell it
    return _Endpoint(url, host, parts.port or 2379, parts.scheme == "https")


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client plus TLS: :meth:`connect` builds a secure channel given credentials."""

    def __init__(
        self,
        endpoint: _Endpoint,
        *,
        credentials: Any,
        username: str | None,
        password: str | None,
        timeout: float,
    ) -> None:
        super().__init__(
            host=endpoint.host,
            port=endpoint.port,
            username=username,
            password=password,
            timeout=timeout,
            options=_CHANNEL_OPTIONS,
        )
        self.endpoint = endpoint
        self._credentials = credentials

    async def connect(self) -> None:
        if self._credentials is None:
            await super().connect()
            return
        if self._connected.is_set():
            return
        # What aetcd 1.0's Client.connect does, with rpc.secure_channel instead of
        # rpc.insecure_channel.
        target = f"{self.endpoint.host}:{self.endpoint.port}"
        self.channel = rpc.secure_channel(
            target, self._credentials, options=list(self._options.items())
        )
        if self._username is not None and self._password is not None:
            self.auth_stub = rpc.AuthStub(self.channel)
            request = rpc.AuthenticateRequest(name=self._username, password=self._password)
            response = await self.auth_stub.Authenticate(request, timeout=self._timeout)
            self.metadata = (("token", response.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()

    async def probe(self) -> None:
        """Connect (and authenticate) and ask the endpoint for its status: one round trip."""
        await self.connect()
        await self.maintenancestub.Status(
            rpc.StatusRequest(), timeout=self._timeout, metadata=self.metadata
        )

    @property
    def is_open(self) -> bool:
        """False once :meth:`close` ran (aetcd then drops its channel)."""
        return self.channel is not None


def _range(prefix: str) -> tuple[bytes, bytes]:
    """The etcd key range of the keys below ``prefix``: ``[prefix + "/", prefix + "0")``.

    It is exactly the range of ``etcdctl ... --prefix prefix/`` ("0" follows "/"), so a user
    whose role grants ``prefix/`` with ``--prefix`` may read and watch it: the range touches
    neither ``prefix`` itself nor ``prefix-x`` or ``prefix2/...``.
    """
    if not prefix:
        return b"\0", b"\0"
    return (prefix + "/").encode(), (prefix + "0").encode()


class EtcdStore(KeyValueStore):
    """A :class:`KeyValueStore` on etcd v3 (aetcd), with endpoint fail-over, auth and TLS.

    Args:
        config: endpoints, credentials and the connect timeout (``ETCD_*``).
        request_timeout: deadline of each etcd call once connected.
    """

    name = "etcd"

    def __init__(self, config: EtcdConfig | None = None, *, request_timeout: float = 10.0) -> None:
        self.config = config if config is not None else EtcdConfig()
        self._request_timeout = request_timeout
        self._endpoints = tuple(_parse_endpoint(url) for url in self.config.endpoints)
        self._client: _Client | None = None
        self._connect_lock = asyncio.Lock()
        self._open = False
        self._dead_leases: dict[int, None] = {}  # insertion-ordered set, bounded

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.config.endpoints

    def is_open(self) -> bool:
        """Between :meth:`connect` and :meth:`close`."""
        return self._open

    # --- connection and fail-over -----------------------------------------------------------------

    async def connect(self) -> None:
        self._open = True
        try:
            await self._ensure_client()
        except BaseException:
            self._open = False
            raise

    async def close(self) -> None:
        self._open = False
        client, self._client = self._client, None
        if client is not None:
            await client.close()  # ends every watch on it

    async def _ensure_client(self) -> _Client:
        if not self._open:
            raise self._unavailable("store is not connected")
        client = self._client
        if client is not None and client.is_open:
            return client
        async with self._connect_lock:
            if self._client is None or not self._client.is_open:
                client = await self._open_first_reachable()
                if not self.is_open():  # closed while connecting
                    await client.close()
                    raise self._unavailable("store closed")
                self._client = client
            return self._client

    async def _failover(self, failed: _Client) -> _Client:
        """Drop ``failed`` (unless another call already replaced it) and connect again."""
        async with self._connect_lock:
            if self._client is failed:
                self._client = None
                await failed.close()
        return await self._ensure_client()

    async def _open_first_reachable(self) -> _Client:
        """Probe every endpoint at once; keep the first that answers within the connect timeout."""
        config = self.config
        credentials = channel_credentials(config, tls=any(e.tls for e in self._endpoints))
        clients = [
            _Client(
                endpoint,
                credentials=credentials,
                username=config.username,
                password=config.password,
                timeout=config.connect_timeout,
            )
            for endpoint in self._endpoints
        ]
        probes = {
            asyncio.create_task(c.probe(), name=f"EtcdStore-probe-{c.endpoint.url}"): c
            for c in clients
        }
        failures: dict[str, BaseException] = {}
        winner: _Client | None = None
        pending = set(probes)
        deadline = asyncio.get_running_loop().time() + config.connect_timeout
        try:
            while pending and winner is None:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                done, pending = await asyncio.wait(
                    pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    exc = task.exception()
                    if exc is None and winner is None:
                        winner = probes[task]
                    elif exc is not None:
                        failures[probes[task].endpoint.url] = exc
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for client in clients:
                if client is not winner:
                    await client.close()
        if winner is not None:
            winner._timeout = self._request_timeout  # probes used the connect timeout
            return winner
        for url, exc in failures.items():
            refused = handshake_failure(exc, config, url)
            if refused is not None:
                raise DiscoveryError(f"etcd TLS handshake failed: {refused}") from exc
        for exc in failures.values():
            if _is_auth_failure(exc):
                raise DiscoveryError(
                    f"etcd authentication failed for user {config.username!r} at "
                    f"{', '.join(self.endpoints)} (check ETCD_AUTH_USERNAME and "
                    f"ETCD_AUTH_PASSWORD): {_describe(exc)}"
                ) from exc
        detail = "; ".join(f"{url}: {_describe(exc)}" for url, exc in failures.items())
        raise self._unavailable(
            detail or f"no answer within the connect timeout of {config.connect_timeout:g} s"
        )

    async def _call(self, what: str, op: Callable[[_Client], Awaitable[T]]) -> T:
        """Run ``op`` on the current client; on a connection failure fail over and retry once.

        Unreachable: another endpoint may answer. Unauthenticated: the auth token expired (etcd's
        simple tokens live 5 minutes), and connecting again authenticates again. A retried
        ``create`` whose first attempt was applied reports ``KeyExists``.
        """
        client = await self._ensure_client()
        try:
            return await op(client)
        except (etcd_errors.ClientError, grpc.aio.AioRpcError) as exc:
            if not (_is_unreachable(exc) or isinstance(exc, etcd_errors.UnauthenticatedError)):
                raise self._translate(what, exc) from exc
        client = await self._failover(client)
        try:
            return await op(client)
        except (etcd_errors.ClientError, grpc.aio.AioRpcError) as exc:
            raise self._translate(what, exc) from exc

    def _translate(self, what: str, exc: BaseException) -> DiscoveryError:
        if not self._open:
            return self._unavailable("store closed")
        if _is_unreachable(exc):
            return self._unavailable(f"{what}: {_describe(exc)}")
        if _is_auth_failure(exc):
            return DiscoveryError(f"etcd refused the credentials during {what}: {_describe(exc)}")
        return DiscoveryError(f"etcd refused {what}: {_describe(exc)}")

    # --- leases -----------------------------------------------------------------------------------

    async def grant_lease(self, ttl: float) -> int:
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0, got {ttl!r}")
        seconds = max(1, math.ceil(ttl))
        lease = await self._call("grant_lease", lambda c: c.lease(seconds))
        return int(lease.id)

    async def keep_alive(self, lease: int) -> None:
        reply = await self._call("keep_alive", lambda c: c.refresh_lease(lease))
        if reply is None or reply.TTL <= 0:
            raise LeaseLost(lease, "expired or revoked")

    async def revoke_lease(self, lease: int) -> None:
        try:
            await self._call("revoke_lease", lambda c: c.revoke_lease(lease))
        except DiscoveryError as exc:
            if _LEASE_NOT_FOUND not in str(exc):
                raise

    # --- keys -------------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        data = check_key(key).encode()
        try:
            result = await self._call("put", lambda c: c.put(data, bytes(value), lease=lease))
        except DiscoveryError as exc:
            raise self._lease_error(lease, exc) from exc
        return int(result.header.revision)

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        data = check_key(key).encode()

        async def txn(c: _Client) -> tuple[bool, builtins.list[Any]]:
            ok, responses = await c.transaction(
                compare=[c.transactions.version(data) == 0],
                success=[c.transactions.put(data, bytes(value), lease=lease)],
                failure=[],
            )
            return bool(ok), responses

        try:
            ok, responses = await self._call("create", txn)
        except DiscoveryError as exc:
            raise self._lease_error(lease, exc) from exc
        if not ok:
            raise KeyExists(key)
        return int(responses[0].response_put.header.revision)

    def _lease_error(self, lease: int | None, exc: DiscoveryError) -> DiscoveryError:
        if lease is not None and _LEASE_NOT_FOUND in str(exc):
            return LeaseLost(lease, "expired or revoked")
        return exc

    async def get(self, key: str) -> KeyValue | None:
        data = check_key(key).encode()
        result = await self._call("get", lambda c: c.get(data))
        return None if result is None else _kv(result)

    async def delete(self, key: str) -> bool:
        data = check_key(key).encode()
        result = await self._call("delete", lambda c: c.delete(data))
        return result is not None

    async def list(self, prefix: str) -> tuple[builtins.list[KeyValue], int]:
        prefix = normalize_prefix(prefix)
        start, end = _range(prefix)
        result = await self._call("list", lambda c: c.get_range(start, end, sort_order="ascend"))
        items = [kv for kv in map(_kv, result) if key_matches(kv.key, prefix)]
        return items, int(result.header.revision)

    # --- watch ------------------------------------------------------------------------------------

    async def _watch(self, prefix: str) -> AsyncGenerator[WatchEvent, None]:
        items, revision = await self.list(prefix)
        start, end = _range(prefix)
        client = await self._ensure_client()
        try:
            stream = await client.watch(
                start, range_end=end, start_revision=revision + 1, prev_kv=True
            )
        except (etcd_errors.ClientError, grpc.aio.AioRpcError) as exc:
            raise self._translate("watch", exc) from exc
        events = aiter(stream)
        try:
            yield Snapshot(tuple(items), revision)
            while True:
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    # aetcd ends the iteration when its client is closed: by us (close, or a
                    # fail-over after another call found the endpoint gone).
                    if not self._open:
                        return
                    raise self._unavailable("watch stream closed by a reconnect") from None
                except (etcd_errors.ClientError, grpc.aio.AioRpcError) as exc:
                    raise self._translate("watch", exc) from exc
                translated = await self._event(event, prefix)
                if translated is not None:
                    yield translated
        finally:
            await events.aclose()
            if client.is_open:
                with contextlib.suppress(etcd_errors.ClientError, grpc.aio.AioRpcError):
                    await stream.cancel()

    async def _event(self, event: Any, prefix: str) -> WatchEvent | None:
        key = event.kv.key.decode()
        if not key_matches(key, prefix):
            return None
        if event.kind == "PUT":
            return Put(_kv(event.kv))
        lease = event.prev_kv.lease if event.prev_kv is not None else 0
        expired = bool(lease) and not await self._lease_alive(lease)
        return Delete(key, int(event.kv.mod_revision), expired)

    async def _lease_alive(self, lease: int) -> bool:
        """Whether the lease still exists: tells a lease's deletion from an explicit one."""
        if lease in self._dead_leases:
            return False
        info = await self._call("lease info", lambda c: c.get_lease_info(lease, keys=False))
        if info.TTL > 0:
            return True
        self._dead_leases[lease] = None
        if len(self._dead_leases) > _DEAD_LEASE_CACHE:
            del self._dead_leases[next(iter(self._dead_leases))]
        return False


def _kv(kv: Any) -> KeyValue:
    return KeyValue(kv.key.decode(), bytes(kv.value), int(kv.mod_revision), int(kv.lease) or None)


def _is_unreachable(exc: BaseException) -> bool:
    if isinstance(exc, (*_UNREACHABLE, TimeoutError, etcd_errors.RevisionCompactedError)):
        return True
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in _UNREACHABLE_CODES
    return isinstance(exc, etcd_errors.ClientError) and "cancelled" in str(exc).lower()


def _is_auth_failure(exc: BaseException) -> bool:
    if isinstance(exc, etcd_errors.UnauthenticatedError):
        return True
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() == grpc.StatusCode.UNAUTHENTICATED or "authentication failed" in str(
            exc.details()
        )
    return "authentication failed" in str(exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
