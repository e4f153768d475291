"""The ``kubernetes`` store: discovery through the Kubernetes API, with no etcd of our own.

Each pod writes one ``DynamoWorkerMetadata`` custom resource (``nvidia.com/v1alpha1``) named
after the pod (``POD_NAME``, in the store's namespace) and owned by it (``POD_UID``), so
Kubernetes deletes it with the pod. Its spec holds the pod's keys, and a renewal record per
lease of the processes writing it (several runtimes may share one pod)::

    spec:
      revision: 7                  # counter of this resource's writes
      leases:
        "4181950231": {renewTime: "2025-01-01T00:00:00.000000Z", ttl: 10.0}
      instances:
        /services/ns/comp/ep/0123456789abcdef:
          revision: 7              # the write that set this key (KeyValue.revision)
          lease: 4181950231        # the writer's lease, when given
          record: {...}            # a JSON object value, as an object (instance records)
          # or  text: "..."          a UTF-8 value that is not a JSON object
          # or  data: "base64..."    any other bytes

Writes are JSON patches (RFC 6902), each conditional on the resourceVersion it read (409
Conflict: read again and retry after a jittered backoff; ``DiscoveryUnavailable`` when the
conflicts outlast ``write_patience``); a key's entry is replaced whole, never merged. A resource
owned by an earlier pod of the same name (a StatefulSet's re-created pod) is deleted and created
afresh by the first write, rather than patched and then garbage-collected.

A key is *visible* (to ``get``, ``list`` and ``watch``) only while its resource exists and the
pod of that name is ready in an EndpointSlice of the namespace (an endpoint whose ``targetRef``
is the pod, with ``conditions.ready`` true or absent). Watches list and watch both resources and
emit the differences of the visible set as ``Put``/``Delete`` events, so the WatcherActor turns
them into the same ``Joined``/``Left`` messages as with any other store; an event that changes
no entry (a lease renewal) costs no recomputation of the visible set. Each watch request asks
the server to end it after ``timeoutSeconds`` and reads with a slightly longer timeout; the watch
then resumes from its last resourceVersion.

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

Every call runs on the owning event loop through kr8s's async API (its authentication, kubeconfig
and in-cluster service-account handling, and HTTP session); kr8s and httpx errors are translated
here. kr8s is an optional dependency: ``pip install 'troupe[kubernetes]'``.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import datetime
import json
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import msgspec

from troupe.config import KubernetesConfig, PodInfo
from troupe.discovery._store import (
    CLOSED,
    Delete,
    KeyValue,
    KeyValueStore,
    Put,
    Snapshot,
    WatchEvent,
    _Closed,
    check_key,
    key_matches,
    normalize_prefix,
)
from troupe.errors import ConfigError, DiscoveryError, KeyExists, LeaseLost

if TYPE_CHECKING:
    from kr8s.asyncio import Api

__all__ = [
    "DWM_GROUP_VERSION",
    "DWM_KIND",
    "DWM_PLURAL",
    "ES_GROUP_VERSION",
    "ES_PLURAL",
    "KubernetesStore",
]

DWM_GROUP_VERSION = "nvidia.com/v1alpha1"
"""Group/version of the ``DynamoWorkerMetadata`` custom resource."""
DWM_KIND = "DynamoWorkerMetadata"
DWM_PLURAL = "dynamoworkermetadatas"
ES_GROUP_VERSION = "discovery.k8s.io/v1"
"""Group/version of EndpointSlices."""
ES_PLURAL = "endpointslices"

_INSTALL_HINT = "pip install 'troupe[kubernetes]'"
_JSON_PATCH = "application/json-patch+json"
_SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"  # kr8s's default too
_WRITE_ATTEMPTS = 16  # most tries of one write that keeps meeting 409 Conflict
_WRITE_PATIENCE = 3.0  # seconds: how long a write retries conflicts (DiscoveryUnavailable after)
_CONFLICT_BACKOFF = (0.005, 0.25)  # seconds: first and largest delay ceiling between tries
_STALE_AFTER = 3.0  # TTLs without renewal after which another process drops a lease's keys
_RESUME_DELAY = (0.02, 1.0)  # backoff between watch resumes that ended at once, empty
_WATCH_TIMEOUT = 300.0  # seconds: a watch request's timeoutSeconds, before jitter
_WATCH_JITTER = 0.25  # timeoutSeconds is _WATCH_TIMEOUT times 1 to 1 + this

_Object = dict[str, Any]
_Entry = tuple[bytes, int, int | None]  # value, revision, lease


@dataclass
class _Lease:
    """What this process knows of one of its leases."""

    ttl: float
    uid: str | None = None  # the resource its keys went to (None: nothing written yet)
    keys: set[str] = field(default_factory=set)  # the keys it wrote that are still its own
    renewed: float | None = None  # monotonic time of the last renewTime written for it


@dataclass(frozen=True)
class _Kr8s:
    """The parts of kr8s this module uses, imported on first use (kr8s is an optional extra)."""

    api_class: type[Api]
    errors: tuple[type[Exception], ...]  # what kr8s raises for refused or failed requests


def _load_kr8s() -> _Kr8s:
    """kr8s, or a ConfigError that says how to install it."""
    try:
        from kr8s._exceptions import (  # noqa: PLC0415 - optional extra, imported on use
            APITimeoutError,
            ServerError,
        )
        from kr8s.asyncio import Api  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(
            "DYN_DISCOVERY_BACKEND",
            "kubernetes",
            f"the kr8s Kubernetes client, which is not installed: {_INSTALL_HINT}",
        ) from exc
    return _Kr8s(Api, (ServerError, APITimeoutError, httpx.HTTPError, OSError))


# --- values in the spec -----------------------------------------------------------------------


def encode_entry(value: bytes, revision: int, lease: int | None) -> _Object:
    """The spec entry of one key (see the module docstring for the layout)."""
    entry: _Object = {"revision": revision}
    if lease is not None:
        entry["lease"] = lease
    try:
        doc = msgspec.json.decode(value)
    except msgspec.DecodeError:
        doc = None
    if isinstance(doc, dict) and msgspec.json.encode(doc) == value:
        entry["record"] = doc
        return entry
    try:
        entry["text"] = value.decode("utf-8")
    except UnicodeDecodeError:
        entry["data"] = base64.b64encode(value).decode("ascii")
    return entry


def decode_entry(entry: object) -> _Entry | None:
    """``(value, revision, lease)`` of a spec entry; None when it is malformed (skipped)."""
    if not isinstance(entry, dict):
        return None
    revision = entry.get("revision", 0)
    lease = entry.get("lease")
    if not isinstance(revision, int) or not (lease is None or isinstance(lease, int)):
        return None
    if isinstance(entry.get("record"), dict):
        value = msgspec.json.encode(entry["record"])
    elif isinstance(entry.get("text"), str):
        value = entry["text"].encode("utf-8")
    elif isinstance(entry.get("data"), str):
        try:
            value = base64.b64decode(entry["data"], validate=True)
        except ValueError:
            return None
    else:
        return None
    return value, revision, lease


def resource_entries(obj: Mapping[str, Any]) -> dict[str, _Entry]:
    """Every well-formed key of a ``DynamoWorkerMetadata`` object."""
    spec = obj.get("spec") or {}
    instances = spec.get("instances") if isinstance(spec, dict) else None
    if not isinstance(instances, dict):
        return {}
    entries = {}
    for key, raw in instances.items():
        decoded = decode_entry(raw)
        if decoded is not None and isinstance(key, str):
            entries[key] = decoded
    return entries


def ready_pods(endpoint_slice: Mapping[str, Any]) -> dict[str, bool]:
    """``{pod name: ready}`` for the endpoints of one EndpointSlice that point at pods."""
    pods: dict[str, bool] = {}
    for endpoint in endpoint_slice.get("endpoints") or []:
        ref = endpoint.get("targetRef") or {}
        if ref.get("kind") != "Pod" or not ref.get("name"):
            continue
        ready = (endpoint.get("conditions") or {}).get("ready")
        # Kubernetes: "ready" absent (null) means the endpoint is ready.
        pods[ref["name"]] = pods.get(ref["name"], False) or ready is None or ready is True
    return pods


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _resource_version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


def _uid(obj: Mapping[str, Any]) -> str | None:
    uid = (obj.get("metadata") or {}).get("uid")
    return str(uid) if uid is not None else None


def _owned_by(obj: Mapping[str, Any], pod_uid: str | None) -> bool:
    """Whether ``obj``'s ``ownerReferences`` name the pod whose uid is ``pod_uid``."""
    refs = (obj.get("metadata") or {}).get("ownerReferences")
    return isinstance(refs, list) and any(
        isinstance(ref, dict) and ref.get("kind") == "Pod" and ref.get("uid") == pod_uid
        for ref in refs
    )


def _spec_section(obj: Mapping[str, Any], section: str) -> dict[str, Any]:
    spec = obj.get("spec")
    found = spec.get(section) if isinstance(spec, dict) else None
    return found if isinstance(found, dict) else {}


def _raw_instances(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``spec.instances`` as stored (malformed entries included)."""
    return _spec_section(obj, "instances")


def _lease_records(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``spec.leases``: ``{lease id: {renewTime, ttl}}`` of the processes writing this resource."""
    return _spec_section(obj, "leases")


def _spec_revision(obj: Mapping[str, Any]) -> int:
    spec = obj.get("spec")
    revision = spec.get("revision", 0) if isinstance(spec, dict) else 0
    return revision if isinstance(revision, int) and not isinstance(revision, bool) else 0


def _lease_record(now: float, ttl: float) -> _Object:
    """The ``spec.leases`` record of a lease renewed at ``now`` (seconds since the epoch)."""
    renewed = datetime.datetime.fromtimestamp(now, datetime.UTC)
    return {"renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "ttl": ttl}


def _renewal(record: object) -> tuple[float, float] | None:
    """``(renewTime in seconds since the epoch, ttl)`` of a lease record; None if malformed."""
    if not isinstance(record, dict):
        return None
    renew_time, ttl = record.get("renewTime"), record.get("ttl")
    if not isinstance(renew_time, str) or isinstance(ttl, bool) or not isinstance(ttl, int | float):
        return None
    try:
        renewed = datetime.datetime.fromisoformat(renew_time)
    except ValueError:
        return None
    if renewed.tzinfo is None:
        renewed = renewed.replace(tzinfo=datetime.UTC)
    return renewed.timestamp(), float(ttl)


def stale_leases(obj: Mapping[str, Any], now: float, *, keep: Collection[int] = ()) -> set[str]:
    """The lease ids (as in ``spec.leases``) of ``obj`` not renewed for ``_STALE_AFTER`` TTLs
    at ``now`` (or malformed), except those in ``keep``."""
    kept = {str(lease) for lease in keep}
    stale = set()
    for name, record in _lease_records(obj).items():
        renewal = _renewal(record)
        if name in kept:
            continue
        if renewal is None or now - renewal[0] > _STALE_AFTER * renewal[1]:
            stale.add(name)
    return stale


def _service_account_namespace(directory: str) -> str:
    """The ``namespace`` file of a service-account directory, or a ConfigError."""
    path = Path(directory).expanduser() / "namespace"
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            "POD_NAMESPACE",
            None,
            f"the namespace to use; it is unset and {path} could not be read ({exc})",
        ) from exc
    if not text:
        raise ConfigError(
            "POD_NAMESPACE", None, f"the namespace to use; it is unset and {path} is empty"
        )
    return text


def _pointer(*tokens: str) -> str:
    """An RFC 6901 JSON pointer (``~`` is written ``~0`` and ``/`` is written ``~1``)."""
    return "".join("/" + token.replace("~", "~0").replace("/", "~1") for token in tokens)


def _spec_patch(
    own: Mapping[str, Any],
    *,
    revision: int | None,
    instances: Mapping[str, _Object | None],
    leases: Mapping[str, _Object | None],
) -> builtins.list[_Object]:
    """The JSON patch (RFC 6902) that writes these members of ``own``'s spec.

    It first replaces ``metadata.resourceVersion`` with ``own``'s: the API server takes a
    patched resourceVersion as a precondition (409 Conflict when the resource changed since).
    A value replaces its member whole (``add`` of an existing member replaces it); None removes
    the member if ``own`` has it. ``revision``, when given, becomes ``spec.revision``.
    """
    operations: builtins.list[_Object] = [
        {"op": "replace", "path": "/metadata/resourceVersion", "value": _resource_version(own)}
    ]
    spec = own.get("spec")
    if not isinstance(spec, dict):
        operations.append({"op": "add", "path": "/spec", "value": {}})
        spec = {}
    if revision is not None:
        operations.append({"op": "add", "path": "/spec/revision", "value": revision})
    for section, updates in (("instances", instances), ("leases", leases)):
        current = spec.get(section)
        if not isinstance(current, dict):
            if all(value is None for value in updates.values()):
                continue
            operations.append({"op": "add", "path": _pointer("spec", section), "value": {}})
            current = {}
        for name, value in updates.items():
            path = _pointer("spec", section, name)
            if value is not None:
                operations.append({"op": "add", "path": path, "value": value})
            elif name in current:
                operations.append({"op": "remove", "path": path})
    return operations


# --- the visible set --------------------------------------------------------------------------


@dataclass
class _View:
    """What a watch knows: the resources' keys and the pods' readiness."""

    resources: dict[str, dict[str, _Entry]] = field(default_factory=dict)  # pod -> key -> entry
    slices: dict[str, dict[str, bool]] = field(default_factory=dict)  # slice -> pod -> ready

    def apply(self, plural: str, kind: str, obj: Mapping[str, Any]) -> bool:
        """Apply one watch event; False when it changed nothing the visible set depends on
        (a lease renewal touches only ``spec.leases``; a slice may change other fields), so the
        caller need not compute the visible set again."""
        name = _name(obj)
        table: dict[str, Any] = self.resources if plural == DWM_PLURAL else self.slices
        if kind == "DELETED":
            return table.pop(name, None) is not None
        fresh = resource_entries(obj) if plural == DWM_PLURAL else ready_pods(obj)
        if table.get(name) == fresh:
            return False
        table[name] = fresh
        return True

    def replace(self, plural: str, items: builtins.list[_Object]) -> None:
        if plural == DWM_PLURAL:
            self.resources = {_name(obj): resource_entries(obj) for obj in items}
        else:
            self.slices = {_name(obj): ready_pods(obj) for obj in items}

    def ready(self) -> set[str]:
        """The pods ready in some EndpointSlice."""
        return {pod for pods in self.slices.values() for pod, ok in pods.items() if ok}

    def visible(self, prefix: str, *, exact: bool = False) -> dict[str, tuple[_Entry, str]]:
        """``{key: (entry, pod)}`` of every visible key under ``prefix`` (or equal to it: exact).

        On a clash (two pods holding one key) the pod whose name sorts first wins.
        """
        ready = self.ready()
        found: dict[str, tuple[_Entry, str]] = {}
        for pod in sorted(self.resources):
            if pod not in ready:
                continue
            for key, entry in self.resources[pod].items():
                matches = key == prefix if exact else key_matches(key, prefix)
                if matches and key not in found:
                    found[key] = (entry, pod)
        return found

    def expired(self, key: str, pod: str) -> bool:
        """Why ``key`` of ``pod`` is no longer visible: True when the pod's resource is gone or
        the pod is not ready (its "lease" ended), False when the key was removed from a live
        resource (an explicit delete)."""
        return pod not in self.resources or pod not in self.ready()


@dataclass(frozen=True)
class _Raw:
    plural: str
    kind: str  # ADDED / MODIFIED / DELETED
    obj: _Object


@dataclass(frozen=True)
class _Relisted:
    plural: str
    items: builtins.list[_Object]


_Item = _Raw | _Relisted | DiscoveryError | _Closed


@dataclass(eq=False)
class _OpenWatch:
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    tasks: builtins.list[asyncio.Task[None]] = field(default_factory=builtins.list)


class _Retries:
    """The tries of one optimistic write: the first at once, each later one after a jittered
    exponential delay, so that processes of one pod writing its resource together spread out
    instead of colliding again. :meth:`next` answers False once ``_WRITE_ATTEMPTS`` tries were
    made or the next delay would end past ``patience`` seconds from the first."""

    def __init__(self, jitter: random.Random, patience: float) -> None:
        self._jitter = jitter
        self._tries = 0
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + patience

    async def next(self) -> bool:
        """Wait out the delay before the next try; False when there is none left."""
        if self._tries >= _WRITE_ATTEMPTS:
            return False
        if self._tries:
            ceiling = min(_CONFLICT_BACKOFF[1], _CONFLICT_BACKOFF[0] * 2.0**self._tries)
            delay = self._jitter.uniform(0.0, ceiling)  # "full jitter"
            if self._loop.time() + delay > self._deadline:
                return False
            await asyncio.sleep(delay)
        self._tries += 1
        return True


class KubernetesStore(KeyValueStore):
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

    def _require_open(self) -> Api:
        if self._api is None:
            raise self._unavailable("store is not connected")
        return self._api

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

    def _retries(self) -> _Retries:
        return _Retries(self._jitter, self._write_patience)

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

    # --- watches -----------------------------------------------------------------------------

    async def _watch(self, prefix: str) -> AsyncGenerator[WatchEvent, None]:
        self._require_open()
        watch = _OpenWatch()
        self._watches.add(watch)
        view = _View()
        try:
            resources, resources_rv = await self._list_raw(DWM_PLURAL)
            slices, slices_rv = await self._list_raw(ES_PLURAL)
            view.replace(DWM_PLURAL, resources)
            view.replace(ES_PLURAL, slices)
            revision = 0
            shown: dict[str, tuple[KeyValue, _Entry, str]] = {}
            for key, (entry, pod) in sorted(view.visible(prefix).items()):
                value, _, lease = entry
                shown[key] = (KeyValue(key, value, revision, lease), entry, pod)
            yield Snapshot(tuple(kv for kv, _, _ in shown.values()), revision)

            for plural, rv in ((DWM_PLURAL, resources_rv), (ES_PLURAL, slices_rv)):
                watch.tasks.append(
                    asyncio.create_task(
                        self._pump(plural, rv, watch.queue),
                        name=f"KubernetesStore-watch-{plural}",
                    )
                )
            changed = False  # since the visible set was last computed
            while True:
                item = await watch.queue.get()
                if isinstance(item, _Closed):
                    return
                if isinstance(item, DiscoveryError):
                    raise item
                if isinstance(item, _Raw):
                    changed = view.apply(item.plural, item.kind, item.obj) or changed
                else:
                    view.replace(item.plural, item.items)
                    changed = True
                if not changed or not watch.queue.empty():
                    continue  # apply what is queued first: one difference, not every step
                changed = False
                fresh = view.visible(prefix)
                for key in [k for k in shown if k not in fresh]:
                    _, _, pod = shown.pop(key)
                    revision += 1
                    yield Delete(key, revision, expired=view.expired(key, pod))
                for key, (entry, pod) in sorted(fresh.items()):
                    known = shown.get(key)
                    if known is not None and known[1] == entry:
                        continue
                    revision += 1
                    kv = KeyValue(key, entry[0], revision, entry[2])
                    shown[key] = (kv, entry, pod)
                    yield Put(kv)
        finally:
            self._watches.discard(watch)
            for task in watch.tasks:
                task.cancel()
            await asyncio.gather(*watch.tasks, return_exceptions=True)

    async def _pump(self, plural: str, since: str, queue: asyncio.Queue[_Item]) -> None:
        """Follow one resource's watch stream into ``queue``; resume or relist as needed."""
        quiet = 0  # resumes in a row that ended at once and brought no event
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                since, saw_events, gone = await self._follow(plural, since, queue)
                if gone:  # 410: our resourceVersion is too old; start again from a list
                    items, since = await self._list_raw(plural)
                    queue.put_nowait(_Relisted(plural, items))
                    saw_events = True
            except DiscoveryError as exc:
                queue.put_nowait(exc)
                return
            except Exception as exc:
                # Unexpected (a kr8s bug?): end the watch with a typed error rather than leave
                # it waiting forever; the exception stays on this task for the owner's gather.
                queue.put_nowait(self._unavailable(f"watch of {plural} failed: {exc!r}"))
                raise
            lasted = loop.time() - started
            quiet = 0 if saw_events or lasted >= 1.0 else quiet + 1
            if quiet > 1:  # a server that keeps closing streams at once: do not spin
                await asyncio.sleep(min(_RESUME_DELAY[1], _RESUME_DELAY[0] * 2**quiet))

    async def _follow(
        self, plural: str, since: str, queue: asyncio.Queue[_Item]
    ) -> tuple[str, bool, bool]:
        """One watch request: ``(last resourceVersion, saw events, 410 Gone)``."""
        api = self._require_open()
        seconds = max(1, round(self._watch_timeout * (1 + _WATCH_JITTER * self._jitter.random())))
        params = {
            "watch": "true",
            "resourceVersion": since,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(seconds),
        }
        # Longer than the server's end of the stream: a read timeout means a dead connection.
        timeout = httpx.Timeout(
            seconds + max(1.0, 0.1 * seconds), connect=self._config.connect_timeout
        )
        saw = False
        try:
            async with self._call(
                api, "GET", plural, params=params, stream=True, timeout=timeout
            ) as response:
                lines = response.aiter_lines()
                while True:
                    try:
                        line = await anext(lines)
                    except StopAsyncIteration:
                        break  # the server ended the stream (timeout, restart): resume
                    except httpx.TransportError:
                        # The stream broke, or was silent past the read timeout (a half-open
                        # connection): resume (a dead server fails the reconnect).
                        break
                    try:
                        event = json.loads(line) if line.strip() else None
                        if event is None:
                            continue
                        kind, obj = str(event["type"]), dict(event["object"])
                    except (ValueError, KeyError, TypeError):
                        break  # a torn line: resume from the last complete event
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            return since, saw, True
                        raise self._unavailable(f"watch of {plural} failed: {obj.get('message')}")
                    since = _resource_version(obj) or since
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        saw = True
                        queue.put_nowait(_Raw(plural, kind, obj))
        except _Gone:
            return since, saw, True
        return since, saw, False

    # --- HTTP --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _call(
        self,
        api: Api,
        method: str,
        plural: str,
        name: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[httpx.Response]:
        """One API request through kr8s, with kr8s and httpx errors translated.

        A 404 raises :class:`_NotFound`, 409 :class:`_Conflict`, 410 :class:`_Gone`; the
        caller decides what they mean.
        """
        version = DWM_GROUP_VERSION if plural == DWM_PLURAL else ES_GROUP_VERSION
        url = plural if name is None else f"{plural}/{name}"
        try:
            async with api.call_api(
                method, version=version, namespace=self._namespace, url=url, **kwargs
            ) as response:
                yield response
        except self._kr8s.errors as exc:
            status = _status_of(exc)
            if status == 404:
                raise _NotFound from exc
            if status == 409:
                raise _Conflict from exc
            if status == 410:
                raise _Gone from exc
            raise self._translate(exc, f"{method} {plural}") from exc

    def _translate(self, exc: BaseException, what: str) -> DiscoveryError:
        status = _status_of(exc)
        if status in (401, 403):
            return DiscoveryError(
                f"the Kubernetes API server refused to {what} in namespace {self._namespace} "
                f"(HTTP {status}): check the RBAC Role in docs/kubernetes.md ({exc})"
            )
        if status is not None and status < 500:
            return DiscoveryError(f"the Kubernetes API server refused to {what} ({exc})")
        return self._unavailable(f"could not {what}: {type(exc).__name__}: {exc}")

    async def _list_raw(self, plural: str) -> tuple[builtins.list[_Object], str]:
        api = self._require_open()
        try:
            async with self._call(api, "GET", plural) as response:
                doc = response.json()
        except (_NotFound, _Conflict, _Gone) as exc:
            raise self._unavailable(f"could not list {plural}: {exc!r}") from exc
        except ValueError as exc:
            raise self._unavailable(f"the list of {plural} is not JSON") from exc
        return list(doc.get("items") or []), _resource_version(doc)

    async def _fetch_own(self) -> _Object | None:
        api = self._require_open()
        if not self._pod.name:
            return None
        try:
            async with self._call(api, "GET", DWM_PLURAL, self._pod.name) as response:
                obj: _Object = response.json()
        except _NotFound:
            return None
        except (_Conflict, _Gone) as exc:
            raise self._unavailable(f"could not read {DWM_KIND} {self._pod.name}") from exc
        return obj

    async def _create_own(
        self, pod: PodInfo, instances: Mapping[str, _Object], leases: Mapping[str, _Object | None]
    ) -> _Object | None:
        """Create this pod's resource holding ``instances``; None when it exists already."""
        api = self._require_open()
        spec: _Object = {"revision": 1, "instances": dict(instances)}
        records = {name: record for name, record in leases.items() if record is not None}
        if records:
            spec["leases"] = records
        body = {
            "apiVersion": DWM_GROUP_VERSION,
            "kind": DWM_KIND,
            "metadata": {
                "name": pod.name,
                "namespace": pod.namespace,
                "labels": {"app.kubernetes.io/managed-by": "troupe"},
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": pod.name,
                        "uid": pod.uid,
                        "controller": False,
                        "blockOwnerDeletion": False,
                    }
                ],
            },
            "spec": spec,
        }
        try:
            async with self._call(api, "POST", DWM_PLURAL, content=json.dumps(body)) as response:
                created: _Object = response.json()
        except _Conflict:
            return None
        except (_NotFound, _Gone) as exc:
            raise self._translate(exc, f"create {DWM_KIND} {pod.name}") from exc
        return created

    async def _patch_own(self, own: _Object, operations: builtins.list[_Object]) -> _Object | None:
        """JSON-patch this pod's resource (conditional on ``own``'s resourceVersion, which
        ``operations`` replace first: see :func:`_spec_patch`); None on 409 or 404."""
        return await self._json_patch(_name(own), operations)

    async def _json_patch(self, name: str, operations: builtins.list[_Object]) -> _Object | None:
        api = self._require_open()
        try:
            async with self._call(
                api,
                "PATCH",
                DWM_PLURAL,
                name,
                content=json.dumps(operations),
                headers={"content-type": _JSON_PATCH},
            ) as response:
                patched: _Object = response.json()
        except (_Conflict, _NotFound):
            return None
        except _Gone as exc:
            raise self._translate(exc, f"patch {DWM_KIND} {name}") from exc
        return patched

    async def _delete_own(self, own: _Object) -> bool:
        """Delete this pod's resource if it is still the version ``own``; False on a race."""
        api = self._require_open()
        options = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "preconditions": {"uid": _uid(own), "resourceVersion": _resource_version(own)},
        }
        try:
            async with self._call(
                api, "DELETE", DWM_PLURAL, _name(own), content=json.dumps(options)
            ):
                pass
        except _NotFound:
            return True
        except _Conflict:
            return False  # written (or re-created) since ``own`` was read
        except _Gone as exc:
            raise self._translate(exc, f"delete {DWM_KIND} {_name(own)}") from exc
        return True

    async def _remove_foreign(self, name: str, key: str) -> bool:
        api = self._require_open()
        retries = self._retries()
        while await retries.next():
            try:
                async with self._call(api, "GET", DWM_PLURAL, name) as response:
                    obj: _Object = response.json()
            except _NotFound:
                return False
            if key not in resource_entries(obj):
                return False
            ops = _spec_patch(
                obj, revision=_spec_revision(obj) + 1, instances={key: None}, leases={}
            )
            if await self._json_patch(name, ops) is not None:
                return True
        raise self._unavailable(f"could not delete {key}: the resource kept changing")


class _NotFound(Exception):
    """HTTP 404 (internal: callers of ``_call`` decide what it means)."""


class _Conflict(Exception):
    """HTTP 409: a precondition failed or the object exists (internal)."""


class _Gone(Exception):
    """HTTP 410: the resourceVersion is too old (internal)."""


def _status_of(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


async def _close_api(api: Api) -> None:
    # kr8s 0.20 has no public close: its httpx session is the one resource to release.
    session = getattr(api, "_session", None)
    if isinstance(session, httpx.AsyncClient):
        await session.aclose()
