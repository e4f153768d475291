"""The ``kubernetes`` store: discovery through the Kubernetes API, with no etcd of our own.

Each pod writes one ``DynamoWorkerMetadata`` custom resource (``nvidia.com/v1alpha1``) named
after the pod (``POD_NAME``, in ``POD_NAMESPACE``) and owned by it (``POD_UID``), so Kubernetes
deletes it with the pod. Its spec holds the pod's keys::

    spec:
      revision: 7                  # counter of this resource's writes
      instances:
        /services/ns/comp/ep/0123456789abcdef:
          revision: 7              # the write that set this key (KeyValue.revision)
          lease: 4181950231        # the writer's lease, when given
          record: {...}            # a JSON object value, as an object (instance records)
          # or  text: "..."          a UTF-8 value that is not a JSON object
          # or  data: "base64..."    any other bytes

A key is *visible* (to ``get``, ``list`` and ``watch``) only while its resource exists and the
pod of that name is ready in an EndpointSlice of the namespace (an endpoint whose ``targetRef``
is the pod, with ``conditions.ready`` true or absent). Watches list and watch both resources and
emit the differences of the visible set as ``Put``/``Delete`` events, so the WatcherActor turns
them into the same ``Joined``/``Left`` messages as with any other store.

Leases: the pod's life is the real lease. ``grant_lease`` makes a lease local to this store;
``keep_alive`` checks that the resource its keys went to still exists (``LeaseLost`` when it was
deleted, so the LeaseActor writes everything again); ``revoke_lease`` removes the lease's keys
(the whole resource when nothing else is left), so a clean stop is seen at once.

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
import json
import random
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
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
_MERGE_PATCH = "application/merge-patch+json"
_WRITE_ATTEMPTS = 8  # optimistic-concurrency retries of one write (409 Conflict)
_RESUME_DELAY = (0.02, 1.0)  # backoff between watch resumes that brought no event

_Object = dict[str, Any]
_Entry = tuple[bytes, int, int | None]  # value, revision, lease


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


# --- the visible set --------------------------------------------------------------------------


@dataclass
class _View:
    """What a watch knows: the resources' keys and the pods' readiness."""

    resources: dict[str, dict[str, _Entry]] = field(default_factory=dict)  # pod -> key -> entry
    slices: dict[str, dict[str, bool]] = field(default_factory=dict)  # slice -> pod -> ready

    def apply(self, plural: str, kind: str, obj: Mapping[str, Any]) -> None:
        name = _name(obj)
        table: dict[str, Any] = self.resources if plural == DWM_PLURAL else self.slices
        if kind == "DELETED":
            table.pop(name, None)
        elif plural == DWM_PLURAL:
            self.resources[name] = resource_entries(obj)
        else:
            self.slices[name] = ready_pods(obj)

    def replace(self, plural: str, items: builtins.list[_Object]) -> None:
        if plural == DWM_PLURAL:
            self.resources = {_name(obj): resource_entries(obj) for obj in items}
        else:
            self.slices = {_name(obj): ready_pods(obj) for obj in items}

    def ready(self) -> set[str]:
        """The pods ready in some EndpointSlice."""
        return {pod for pods in self.slices.values() for pod, ok in pods.items() if ok}

    def visible(self, prefix: str) -> dict[str, tuple[_Entry, str]]:
        """``{key: (entry, pod)}`` of every visible key under ``prefix``.

        On a clash (two pods holding one key) the pod whose name sorts first wins.
        """
        ready = self.ready()
        found: dict[str, tuple[_Entry, str]] = {}
        for pod in sorted(self.resources):
            if pod not in ready:
                continue
            for key, entry in self.resources[pod].items():
                if key_matches(key, prefix) and key not in found:
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


class KubernetesStore(KeyValueStore):
    """A :class:`KeyValueStore` on ``DynamoWorkerMetadata`` resources and EndpointSlices.

    Args:
        config: the API-server connection (kubeconfig, timeouts).
        pod: this pod's identity; writes need ``name``, ``namespace`` and ``uid``, watching
            needs only ``namespace`` (default: the kubeconfig context's namespace).
        rng: source of lease ids (tests may seed it).
    """

    name = "kubernetes"
    exact_history = False

    def __init__(
        self,
        config: KubernetesConfig | None = None,
        pod: PodInfo | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._kr8s = _load_kr8s()
        self._config = config if config is not None else KubernetesConfig()
        self._pod = pod if pod is not None else PodInfo()
        self._rng = rng or random.Random()
        self._api: Api | None = None
        self._server: str | None = None
        self._namespace: str | None = self._pod.namespace
        self._leases: dict[int, str | None] = {}  # lease -> uid of the resource it wrote to
        self._own: _Object | None = None  # this pod's resource as last seen
        self._took_over = False
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
                api.timeout = httpx.Timeout(
                    self._config.request_timeout, connect=self._config.connect_timeout
                )
                async with api.call_api("GET", version="", base="/version"):
                    pass
        except DiscoveryError:
            await _close_api(api)
            raise
        except TimeoutError as exc:
            await _close_api(api)
            raise self._unavailable(f"no answer within {self._config.connect_timeout:g} s") from exc
        except self._kr8s.errors as exc:
            await _close_api(api)
            raise self._translate(exc, "reach the API server") from exc
        self._namespace = self._pod.namespace or api.namespace
        self._lock = asyncio.Lock()
        self._api = api

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
        self._leases[lease] = None
        return lease

    async def keep_alive(self, lease: int) -> None:
        self._require_open()
        if lease not in self._leases:
            raise LeaseLost(lease, "unknown or revoked")
        bound = self._leases[lease]
        if bound is None:
            return  # nothing written yet: nothing to lose
        own = await self._fetch_own()
        if own is None or own["metadata"].get("uid") != bound:
            self._leases.pop(lease, None)
            raise LeaseLost(lease, f"{DWM_KIND} {self._pod.name} was deleted")

    async def revoke_lease(self, lease: int) -> None:
        self._require_open()
        bound = self._leases.pop(lease, None)
        if bound is None:
            return
        async with self._write_lock():
            for _ in range(_WRITE_ATTEMPTS):
                own = await self._fetch_own()
                if own is None or own["metadata"].get("uid") != bound:
                    return
                entries = resource_entries(own)
                doomed = [key for key, (_, _, owner) in entries.items() if owner == lease]
                if len(doomed) == len(entries):
                    if await self._delete_own(own):
                        return
                    continue
                if not doomed:
                    return
                if await self._patch_own(own, dict.fromkeys(doomed)) is not None:
                    return
            raise DiscoveryError(f"could not revoke lease {lease}: the resource kept changing")

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
                for _ in range(_WRITE_ATTEMPTS):
                    own = await self._fetch_own()
                    if own is None or key not in resource_entries(own):
                        break
                    if await self._patch_own(own, {key: None}) is not None:
                        return True
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
            for _ in range(_WRITE_ATTEMPTS):
                own = await self._fetch_own()
                if lease is not None:
                    bound = self._leases.get(lease)
                    uid = None if own is None else own["metadata"].get("uid")
                    if lease not in self._leases or (bound is not None and bound != uid):
                        self._leases.pop(lease, None)
                        raise LeaseLost(lease, f"{DWM_KIND} {pod.name} was deleted")
                if own is None:
                    created = await self._create_own(pod, key, encode_entry(value, 1, lease))
                    if created is None:
                        continue  # created meanwhile by someone else: patch it instead
                    self._bind(lease, created)
                    self._took_over = True
                    return 1
                entries = resource_entries(own)
                if create and key in entries:
                    raise KeyExists(key)
                revision = int((own.get("spec") or {}).get("revision", 0)) + 1
                updates: dict[str, _Object | None] = {key: encode_entry(value, revision, lease)}
                if not self._took_over:
                    # A new process in this pod: keys of an earlier one (a restarted container)
                    # are stale. Keys without a lease are kept.
                    for other, (_, _, owner) in entries.items():
                        if owner is not None and owner not in self._leases and other != key:
                            updates[other] = None
                patched = await self._patch_own(own, updates, revision=revision)
                if patched is None:
                    continue
                self._took_over = True
                self._bind(lease, patched)
                return revision
            raise DiscoveryError(f"could not write {key}: the resource kept changing")

    def _bind(self, lease: int | None, obj: _Object) -> None:
        if lease is not None and lease in self._leases:
            self._leases[lease] = obj["metadata"].get("uid")

    def _require_identity(self) -> PodInfo:
        for variable, value in (
            ("POD_NAME", self._pod.name),
            ("POD_NAMESPACE", self._pod.namespace),
            ("POD_UID", self._pod.uid),
        ):
            if not value:
                raise ConfigError(
                    variable,
                    value,
                    "this pod's identity (the operator sets POD_NAME, POD_NAMESPACE and POD_UID "
                    "from the downward API); a worker on the kubernetes backend needs all three",
                )
        return self._pod

    def _write_lock(self) -> asyncio.Lock:
        if self._lock is None:
            raise self._unavailable("store is not connected")
        return self._lock

    # --- reads -------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        view, _ = await self._load_view()
        found = view.visible(key).get(key)
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
            while True:
                item = await watch.queue.get()
                if isinstance(item, _Closed):
                    return
                if isinstance(item, DiscoveryError):
                    raise item
                if isinstance(item, _Raw):
                    view.apply(item.plural, item.kind, item.obj)
                else:
                    view.replace(item.plural, item.items)
                if not watch.queue.empty():
                    continue  # apply what is queued first: one difference, not every step
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
        quiet = 0  # resumes in a row that brought no event
        while True:
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
            quiet = 0 if saw_events else quiet + 1
            if quiet > 1:  # a server that keeps closing streams at once: do not spin
                await asyncio.sleep(min(_RESUME_DELAY[1], _RESUME_DELAY[0] * 2**quiet))

    async def _follow(
        self, plural: str, since: str, queue: asyncio.Queue[_Item]
    ) -> tuple[str, bool, bool]:
        """One watch request: ``(last resourceVersion, saw events, 410 Gone)``."""
        api = self._require_open()
        params = {"watch": "true", "resourceVersion": since, "allowWatchBookmarks": "true"}
        saw = False
        try:
            async with self._call(
                api, "GET", plural, params=params, stream=True, timeout=self._watch_timeout()
            ) as response:
                lines = response.aiter_lines()
                while True:
                    try:
                        line = await anext(lines)
                    except StopAsyncIteration:
                        break  # the server ended the stream (timeout, restart): resume
                    except httpx.TransportError:
                        break  # the stream broke: resume (a dead server fails the reconnect)
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

    def _watch_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(None, connect=self._config.connect_timeout)

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
            self._own = None
            return None
        except (_Conflict, _Gone) as exc:
            raise self._unavailable(f"could not read {DWM_KIND} {self._pod.name}") from exc
        self._own = obj
        return obj

    async def _create_own(self, pod: PodInfo, key: str, entry: _Object) -> _Object | None:
        """Create this pod's resource holding one key; None when it exists already."""
        api = self._require_open()
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
            "spec": {"revision": 1, "instances": {key: entry}},
        }
        try:
            async with self._call(api, "POST", DWM_PLURAL, content=json.dumps(body)) as response:
                created: _Object = response.json()
        except _Conflict:
            return None
        except (_NotFound, _Gone) as exc:
            raise self._translate(exc, f"create {DWM_KIND} {pod.name}") from exc
        self._own = created
        return created

    async def _patch_own(
        self, own: _Object, updates: Mapping[str, _Object | None], *, revision: int | None = None
    ) -> _Object | None:
        """Merge-patch this pod's resource, conditional on its resourceVersion; None on 409."""
        api = self._require_open()
        if revision is None:
            revision = int((own.get("spec") or {}).get("revision", 0)) + 1
        patch = {
            "metadata": {"resourceVersion": _resource_version(own)},
            "spec": {"revision": revision, "instances": dict(updates)},
        }
        try:
            async with self._call(
                api,
                "PATCH",
                DWM_PLURAL,
                _name(own),
                content=json.dumps(patch),
                headers={"content-type": _MERGE_PATCH},
            ) as response:
                patched: _Object = response.json()
        except (_Conflict, _NotFound):
            self._own = None
            return None
        except _Gone as exc:
            raise self._translate(exc, f"patch {DWM_KIND} {_name(own)}") from exc
        self._own = patched
        return patched

    async def _delete_own(self, own: _Object) -> bool:
        """Delete this pod's resource if it is still the version ``own``; False on a race."""
        api = self._require_open()
        options = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "preconditions": {"resourceVersion": _resource_version(own)},
        }
        try:
            async with self._call(
                api, "DELETE", DWM_PLURAL, _name(own), content=json.dumps(options)
            ):
                pass
        except _NotFound:
            return True
        except _Conflict:
            return False
        except _Gone as exc:
            raise self._translate(exc, f"delete {DWM_KIND} {_name(own)}") from exc
        finally:
            self._own = None
        return True

    async def _remove_foreign(self, name: str, key: str) -> bool:
        api = self._require_open()
        for _ in range(_WRITE_ATTEMPTS):
            try:
                async with self._call(api, "GET", DWM_PLURAL, name) as response:
                    obj: _Object = response.json()
            except _NotFound:
                return False
            if key not in resource_entries(obj):
                return False
            revision = int((obj.get("spec") or {}).get("revision", 0)) + 1
            patch = {
                "metadata": {"resourceVersion": _resource_version(obj)},
                "spec": {"revision": revision, "instances": {key: None}},
            }
            try:
                async with self._call(
                    api,
                    "PATCH",
                    DWM_PLURAL,
                    name,
                    content=json.dumps(patch),
                    headers={"content-type": _MERGE_PATCH},
                ):
                    return True
            except (_Conflict, _NotFound):
                continue
        raise DiscoveryError(f"could not delete {key}: the resource kept changing")


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
