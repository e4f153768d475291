"""The ``kubernetes`` store: :class:`KubernetesStore`, its leases, writes and reads.

Writes are JSON patches (RFC 6902), each conditional on the resourceVersion it read (409
Conflict: read again and retry after a jittered backoff; ``DiscoveryUnavailable`` when the
conflicts outlast ``write_patience``); a key's entry is replaced whole, never merged. A resource
owned by an earlier pod of the same name (a StatefulSet's re-created pod) is deleted and created
afresh by the first write, rather than patched and then garbage-collected.

Leases: the pod's life is the real lease; watchers look only at readiness. ``grant_lease`` makes
a lease local to this store. Its record in ``spec.leases`` is written with its first key and
renewed by ``keep_alive`` at most once per TTL (of the monotonic clock). ``keep_alive`` raises
``LeaseLost`` when the resource was deleted or the lease's keys or record are gone (the
LeaseActor then writes everything again). A process's first write drops the keys of leases not
renewed for three TTLs (an earlier incarnation of a restarted container) and keeps those of live
processes of the pod. ``revoke_lease`` removes the lease's keys and record (the whole resource
when no key is left), so a clean stop is seen at once.

Revisions: a key's ``KeyValue.revision`` from ``put``/``get``/``list`` is the resource's write
counter; a watch numbers its own events (resourceVersions of different objects cannot be
compared), so watch revisions are comparable only within one watch. ``exact_history`` is False:
after a 410 Gone the watch relists and reports only the difference.
"""

from __future__ import annotations

import asyncio
import builtins
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from troupe.config import KubernetesConfig, PodInfo
from troupe.discovery._kubernetes._client import (
    _SERVICE_ACCOUNT,
    _WRITE_PATIENCE,
    _close_api,
    _load_kr8s,
    _service_account_namespace,
)
from troupe.discovery._kubernetes._spec import (
    DWM_KIND,
    DWM_PLURAL,
    ES_PLURAL,
    _lease_record,
    _lease_records,
    _name,
    _Object,
    _owned_by,
    _raw_instances,
    _spec_patch,
    _spec_revision,
    _uid,
    encode_entry,
    resource_entries,
    stale_leases,
)
from troupe.discovery._kubernetes._watch import _WATCH_TIMEOUT, _OpenWatch, _View, _Watches
from troupe.discovery._store import CLOSED, KeyValue, check_key, normalize_prefix
from troupe.errors import ConfigError, DiscoveryError, KeyExists, LeaseLost

if TYPE_CHECKING:
    from kr8s.asyncio import Api


@dataclass
class _Lease:
    """What this process knows of one of its leases."""

    ttl: float
    uid: str | None = None  # the resource its keys went to (None: nothing written yet)
    keys: set[str] = field(default_factory=set)  # the keys it wrote that are still its own
    renewed: float | None = None  # monotonic time of the last renewTime written for it


class KubernetesStore(_Watches):
    """A :class:`KeyValueStore` on ``DynamoWorkerMetadata`` resources and EndpointSlices.

    Args:
        config: the API-server connection (kubeconfig, timeouts).
        pod: this pod's identity; writes need ``name``, ``namespace`` and ``uid``, watching
            needs only ``namespace`` (default: the kubeconfig context's namespace, or in a pod
            the service account's ``namespace`` file).
        rng: source of lease ids (tests may seed it).
        watch_timeout: seconds a watch request asks the server to stream before it ends it
            (``timeoutSeconds``, plus up to 25 % jitter); the watch then resumes from its last
            resourceVersion. The client's read timeout is slightly longer, so a half-open
            connection is noticed too. Tests shorten it.
        clock: wall-clock seconds since the epoch, for the renewal times written in
            ``spec.leases`` (tests may fake it).
        monotonic: a monotonic clock in seconds, which spaces this process's renewals (at most
            one per TTL) so that a wall-clock jump cannot stop them (tests may fake it).
        write_patience: seconds a write keeps retrying when the resource keeps changing under
            it (409 Conflict, with jittered backoff) before it raises DiscoveryUnavailable.
    """

    name = "kubernetes"
    exact_history = False

    def __init__(
        self,
        config: KubernetesConfig | None = None,
        pod: PodInfo | None = None,
        *,
        rng: random.Random | None = None,
        watch_timeout: float = _WATCH_TIMEOUT,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        write_patience: float = _WRITE_PATIENCE,
    ) -> None:
        if isinstance(watch_timeout, bool) or not watch_timeout > 0:
            raise ValueError(f"watch_timeout must be > 0 seconds, got {watch_timeout!r}")
        if isinstance(write_patience, bool) or not write_patience >= 0:
            raise ValueError(f"write_patience must be >= 0 seconds, got {write_patience!r}")
        self._kr8s = _load_kr8s()
        self._config = config if config is not None else KubernetesConfig()
        self._pod = pod if pod is not None else PodInfo()
        self._rng = rng or random.Random()
        self._jitter = random.Random()
        self._watch_timeout = float(watch_timeout)
        self._clock = clock
        self._monotonic = monotonic
        self._write_patience = float(write_patience)
        self._api: Api | None = None
        self._server: str | None = None
        self._namespace: str | None = self._pod.namespace
        self._leases: dict[int, _Lease] = {}
        self._lost: set[int] = set()  # lost leases whose renewal records are still to remove
        self._took_over = False  # this process has written: stale keys were dropped
        self._lock: asyncio.Lock | None = None
        self._watches: set[_OpenWatch] = set()

    # --- connection --------------------------------------------------------------------------

    @property
    def endpoints(self) -> tuple[str, ...]:
        if self._server:
            return (self._server,)
        if self._config.kubeconfig:
            return (f"kubeconfig {self._config.kubeconfig}",)
        return ("the default kubeconfig or in-cluster service account",)

    @property
    def namespace(self) -> str | None:
        """The namespace this store reads and writes (known once connected)."""
        return self._namespace

    async def connect(self) -> None:
        if self._api is not None:
            return
        # Api() directly, not kr8s.asyncio.api(): the factory shares one client per event loop,
        # and this store must own (and close) its HTTP session.
        api = self._kr8s.api_class(
            bypass_factory=True,
            kubeconfig=self._config.kubeconfig,
            serviceaccount=self._config.serviceaccount,
            namespace=self._pod.namespace,
        )
        try:
            async with asyncio.timeout(self._config.connect_timeout):
                try:
                    await api.auth.reauthenticate()  # kubeconfig, else the service account
                except (ValueError, KeyError, OSError) as exc:
                    raise self._unavailable(f"no usable Kubernetes credentials: {exc}") from exc
                self._server = api.auth.server
                self._namespace = self._pod.namespace or await self._default_namespace(api)
                api.timeout = httpx.Timeout(
                    self._config.request_timeout, connect=self._config.connect_timeout
                )
                async with api.call_api("GET", version="", base="/version"):
                    pass
        except (DiscoveryError, ConfigError):
            await _close_api(api)
            raise
        except TimeoutError as exc:
            await _close_api(api)
            raise self._unavailable(f"no answer within {self._config.connect_timeout:g} s") from exc
        except self._kr8s.errors as exc:
            await _close_api(api)
            raise self._translate(exc, "reach the API server") from exc
        self._lock = asyncio.Lock()
        self._api = api

    async def _default_namespace(self, api: Api) -> str:
        """The namespace when ``POD_NAMESPACE`` is unset: the kubeconfig context's, or in a pod
        (credentials from the service account) the service account's ``namespace`` file.

        kr8s would answer ``default`` in a pod: it never reads that file when no namespace is
        given, so it is read here.
        """
        if api.auth.active_context:  # a kubeconfig was loaded
            return str(api.namespace)
        return await asyncio.to_thread(
            _service_account_namespace, self._config.serviceaccount or _SERVICE_ACCOUNT
        )

    async def close(self) -> None:
        watches, self._watches = self._watches, set()
        for watch in watches:
            for task in watch.tasks:
                task.cancel()
            await asyncio.gather(*watch.tasks, return_exceptions=True)
            watch.queue.put_nowait(CLOSED)
        api, self._api = self._api, None
        if api is not None:
            await _close_api(api)

    # --- leases ------------------------------------------------------------------------------

    async def grant_lease(self, ttl: float) -> int:
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0, got {ttl!r}")
        self._require_open()
        lease = self._rng.randrange(1, 2**63)
        self._leases[lease] = _Lease(float(ttl))
        return lease

    async def keep_alive(self, lease: int) -> None:
        self._require_open()
        state = self._leases.get(lease)
        if state is None:
            raise LeaseLost(lease, "unknown or revoked")
        if state.uid is None:
            return  # nothing written yet: nothing to lose
        async with self._write_lock():
            retries = self._retries()
            while await retries.next():
                own = await self._fetch_own()
                if own is None or _uid(own) != state.uid:
                    self._lose(lease)
                    raise LeaseLost(lease, f"{DWM_KIND} {self._pod.name} was deleted")
                entries = resource_entries(own)
                # A key another process overwrote is no longer this lease's; a key that is gone
                # was removed (by a delete, or as stale by another process of this pod).
                state.keys = {k for k in state.keys if k not in entries or entries[k][2] == lease}
                missing = sorted(k for k in state.keys if k not in entries)
                if missing or str(lease) not in _lease_records(own):
                    self._lose(lease)
                    gone = ", ".join(missing[:3]) or "its renewal record"
                    raise LeaseLost(lease, f"removed from {DWM_KIND} {self._pod.name}: {gone}")
                started = self._monotonic()
                if state.renewed is not None and started - state.renewed < state.ttl:
                    return  # renewTime is written at most once per TTL
                record = {str(lease): _lease_record(self._clock(), state.ttl)}
                ops = _spec_patch(own, revision=None, instances={}, leases=record)
                if await self._patch_own(own, ops) is not None:
                    state.renewed = started
                    return
            raise self._unavailable(f"could not renew lease {lease}: the resource kept changing")

    async def revoke_lease(self, lease: int) -> None:
        self._require_open()
        state = self._leases.pop(lease, None)
        if state is None or state.uid is None:
            return
        async with self._write_lock():
            retries = self._retries()
            while await retries.next():
                own = await self._fetch_own()
                if own is None or _uid(own) != state.uid:
                    return
                entries = resource_entries(own)
                doomed = [key for key, (_, _, owner) in entries.items() if owner == lease]
                if len(doomed) == len(_raw_instances(own)):
                    if await self._delete_own(own):
                        return
                    continue  # written meanwhile (another process of this pod): read again
                if not doomed and str(lease) not in _lease_records(own):
                    return
                ops = _spec_patch(
                    own,
                    revision=_spec_revision(own) + 1,
                    instances=dict.fromkeys(doomed),
                    leases={str(lease): None},
                )
                if await self._patch_own(own, ops) is not None:
                    return
            raise self._unavailable(f"could not revoke lease {lease}: the resource kept changing")

    def _lose(self, lease: int) -> None:
        """Forget a lost lease; its renewal record goes with this process's next write."""
        self._leases.pop(lease, None)
        self._lost.add(lease)

    # --- writes ------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        return await self._write(check_key(key), bytes(value), lease, create=False)

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        check_key(key)
        for obj in (await self._list_raw(DWM_PLURAL))[0]:
            if _name(obj) != self._pod.name and key in resource_entries(obj):
                raise KeyExists(key)
        return await self._write(key, bytes(value), lease, create=True)

    async def delete(self, key: str) -> bool:
        check_key(key)
        self._require_open()
        if self._pod.name is not None:
            async with self._write_lock():
                retries = self._retries()
                while await retries.next():
                    own = await self._fetch_own()
                    if own is None or key not in _raw_instances(own):
                        break
                    ops = _spec_patch(
                        own, revision=_spec_revision(own) + 1, instances={key: None}, leases={}
                    )
                    if await self._patch_own(own, ops) is not None:
                        for state in self._leases.values():
                            state.keys.discard(key)
                        return True
                else:
                    raise self._unavailable(f"could not delete {key}: the resource kept changing")
        for obj in (await self._list_raw(DWM_PLURAL))[0]:  # somebody else's key
            if key in resource_entries(obj) and _name(obj) != self._pod.name:
                return await self._remove_foreign(_name(obj), key)
        return False

    async def _write(self, key: str, value: bytes, lease: int | None, *, create: bool) -> int:
        self._require_open()
        pod = self._require_identity()
        if lease is not None and lease not in self._leases:
            raise LeaseLost(lease, "unknown or revoked")
        async with self._write_lock():
            retries = self._retries()
            while await retries.next():
                own = await self._fetch_own()
                now = self._clock()
                records: dict[str, _Object | None] = {}
                if lease is not None:
                    state = self._leases.get(lease)
                    if state is None:
                        raise LeaseLost(lease, "unknown or revoked")
                    if state.uid is not None and (
                        own is None
                        or _uid(own) != state.uid
                        or str(lease) not in _lease_records(own)
                    ):
                        self._lose(lease)
                        raise LeaseLost(lease, f"its keys were removed from {DWM_KIND} {pod.name}")
                    records[str(lease)] = _lease_record(now, state.ttl)
                if own is not None and not _owned_by(own, pod.uid):
                    # Left by an earlier pod of this name (a StatefulSet re-created it): the
                    # garbage collector deletes it soon, and its keys point at dead addresses.
                    # Start afresh with a resource this pod owns.
                    if not await self._delete_own(own):
                        continue  # changed meanwhile: read it again
                    own = None
                if own is None:
                    entry = encode_entry(value, 1, lease)
                    created = await self._create_own(pod, {key: entry}, records)
                    if created is None:
                        continue  # created meanwhile by another process: patch it instead
                    self._wrote(key, lease, created)
                    return 1
                entries = resource_entries(own)
                if create and key in entries:
                    raise KeyExists(key)
                revision = _spec_revision(own) + 1
                instances: dict[str, _Object | None] = {key: encode_entry(value, revision, lease)}
                for lost in self._lost:
                    records.setdefault(str(lost), None)
                if not self._took_over:
                    # This process's first write: drop what earlier incarnations of this pod's
                    # containers left, the keys of leases not renewed for _STALE_AFTER TTLs.
                    # Other live processes of the pod renew theirs; keys without a lease stay.
                    known = _lease_records(own)
                    stale = stale_leases(own, now, keep=self._leases)
                    for other, (_, _, owner) in entries.items():
                        if other == key or owner is None or owner in self._leases:
                            continue
                        if str(owner) in stale or str(owner) not in known:
                            instances[other] = None
                    for name in stale:
                        records.setdefault(name, None)
                ops = _spec_patch(own, revision=revision, instances=instances, leases=records)
                patched = await self._patch_own(own, ops)
                if patched is None:
                    continue
                self._wrote(key, lease, patched)
                return revision
            raise self._unavailable(f"could not write {key}: the resource kept changing")

    def _wrote(self, key: str, lease: int | None, obj: _Object) -> None:
        """Book a successful write of ``key`` (under ``lease``) that produced ``obj``."""
        self._took_over = True
        self._lost.clear()  # their records were removed by this write (or the resource is new)
        for known in self._leases.values():
            known.keys.discard(key)
        state = self._leases.get(lease) if lease is not None else None
        if state is not None:
            state.uid = _uid(obj)
            state.keys.add(key)
            state.renewed = self._monotonic()

    def _require_identity(self) -> PodInfo:
        """This pod's identity, in the namespace this store uses (``POD_NAMESPACE``, or the one
        found at connect)."""
        for variable, value in (("POD_NAME", self._pod.name), ("POD_UID", self._pod.uid)):
            if not value:
                raise ConfigError(
                    variable,
                    value,
                    "this pod's identity (the operator sets POD_NAME, POD_NAMESPACE and POD_UID "
                    "from the downward API); a worker on the kubernetes backend needs POD_NAME "
                    "and POD_UID",
                )
        return PodInfo(self._pod.name, self._namespace, self._pod.uid)

    def _write_lock(self) -> asyncio.Lock:
        if self._lock is None:
            raise self._unavailable("store is not connected")
        return self._lock

    # --- reads -------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        view, _ = await self._load_view()
        found = view.visible(key, exact=True).get(key)
        if found is None:
            return None
        (value, revision, lease), _ = found
        return KeyValue(key, value, revision, lease)

    async def list(self, prefix: str) -> tuple[builtins.list[KeyValue], int]:
        prefix = normalize_prefix(prefix)
        view, revision = await self._load_view()
        items = [
            KeyValue(key, value, revision, lease)
            for key, ((value, revision, lease), _) in sorted(view.visible(prefix).items())
        ]
        return items, revision

    async def _load_view(self) -> tuple[_View, int]:
        """Both resources, fresh from the server, and the highest write counter among them."""
        resources, _ = await self._list_raw(DWM_PLURAL)
        slices, _ = await self._list_raw(ES_PLURAL)
        view = _View()
        view.replace(DWM_PLURAL, resources)
        view.replace(ES_PLURAL, slices)
        revision = max(
            [int((obj.get("spec") or {}).get("revision", 0) or 0) for obj in resources] or [0]
        )
        return view, revision
