"""Requests of the ``kubernetes`` store to the API server, through kr8s.

Every call runs on the owning event loop through kr8s's async API (its authentication, kubeconfig
and in-cluster service-account handling, and HTTP session); kr8s and httpx errors are translated
here. kr8s is an optional dependency: ``pip install 'troupe[kubernetes]'``.

Writes are optimistic: a JSON patch conditional on the resourceVersion it read meets 409 Conflict
when the resource changed since; the writer reads again and retries after a jittered backoff
(:class:`_Retries`), and raises ``DiscoveryUnavailable`` when the conflicts outlast
``write_patience``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from troupe.config import KubernetesConfig, PodInfo
from troupe.discovery._kubernetes._spec import (
    DWM_GROUP_VERSION,
    DWM_KIND,
    DWM_PLURAL,
    ES_GROUP_VERSION,
    _name,
    _Object,
    _resource_version,
    _spec_patch,
    _spec_revision,
    _uid,
    resource_entries,
)
from troupe.discovery._store import KeyValueStore
from troupe.errors import ConfigError, DiscoveryError

if TYPE_CHECKING:
    from kr8s.asyncio import Api

_INSTALL_HINT = "pip install 'troupe[kubernetes]'"
_JSON_PATCH = "application/json-patch+json"
_SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"  # kr8s's default too
_WRITE_ATTEMPTS = 16  # most tries of one write that keeps meeting 409 Conflict
_WRITE_PATIENCE = 3.0  # seconds: how long a write retries conflicts (DiscoveryUnavailable after)
_CONFLICT_BACKOFF = (0.005, 0.25)  # seconds: first and largest delay ceiling between tries


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


class _Requests(KeyValueStore):
    """The API requests of :class:`KubernetesStore` (its base class: the store sets these
    attributes)."""

    _kr8s: _Kr8s
    _config: KubernetesConfig
    _pod: PodInfo
    _api: Api | None
    _namespace: str | None
    _jitter: random.Random
    _write_patience: float

    def _require_open(self) -> Api:
        if self._api is None:
            raise self._unavailable("store is not connected")
        return self._api

    def _retries(self) -> _Retries:
        return _Retries(self._jitter, self._write_patience)

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
