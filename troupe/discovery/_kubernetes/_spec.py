"""The ``DynamoWorkerMetadata`` resource of the ``kubernetes`` store, as data (no I/O).

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

Writes are JSON patches (RFC 6902), each conditional on the resourceVersion it read; a key's
entry is replaced whole, never merged. This module encodes and decodes the entries, reads the
metadata and lease records of a resource, and builds those patches.
"""

from __future__ import annotations

import base64
import builtins
import datetime
from collections.abc import Collection, Mapping
from typing import Any

import msgspec

DWM_GROUP_VERSION = "nvidia.com/v1alpha1"
"""Group/version of the ``DynamoWorkerMetadata`` custom resource."""
DWM_KIND = "DynamoWorkerMetadata"
DWM_PLURAL = "dynamoworkermetadatas"
ES_GROUP_VERSION = "discovery.k8s.io/v1"
"""Group/version of EndpointSlices."""
ES_PLURAL = "endpointslices"

_STALE_AFTER = 3.0  # TTLs without renewal after which another process drops a lease's keys

_Object = dict[str, Any]
_Entry = tuple[bytes, int, int | None]  # value, revision, lease


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
