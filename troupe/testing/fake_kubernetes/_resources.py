"""The resources the fake API server serves, and its discovery documents.

Two namespaced resources: ``endpointslices`` (``discovery.k8s.io/v1``) and the
``dynamoworkermetadatas`` custom resource (``nvidia.com/v1alpha1``). Discovery answers
``/version``, ``/api``, ``/api/v1``, ``/apis`` and each group version; lists filter by label and
field selectors.
"""

from __future__ import annotations

from dataclasses import dataclass

from troupe.testing.fake_kubernetes._wire import _HttpError, _Object

ES_GROUP_VERSION = "discovery.k8s.io/v1"
"""Group/version of EndpointSlices."""
ES_PLURAL = "endpointslices"
DWM_GROUP_VERSION = "nvidia.com/v1alpha1"
"""Group/version of the DynamoWorkerMetadata custom resource."""
DWM_PLURAL = "dynamoworkermetadatas"

_VERSION = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0",
    "platform": "linux/amd64",
    "compiler": "gc",
}


@dataclass(frozen=True)
class _Kind:
    group_version: str
    plural: str
    kind: str
    singular: str
    short_names: tuple[str, ...] = ()

    def resource(self) -> _Object:
        return {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": True,
            "kind": self.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            "shortNames": list(self.short_names),
        }


_KINDS = {
    (k.group_version, k.plural): k
    for k in (
        _Kind(ES_GROUP_VERSION, ES_PLURAL, "EndpointSlice", "endpointslice"),
        _Kind(DWM_GROUP_VERSION, DWM_PLURAL, "DynamoWorkerMetadata", "dynamoworkermetadata"),
    )
}


def _selector_matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            name, _, value = term.partition("!=")
            if labels.get(name.strip()) == value.strip():
                return False
        elif "=" in term:
            name, _, value = term.replace("==", "=").partition("=")
            if labels.get(name.strip()) != value.strip():
                return False
        elif term.strip() not in labels:
            return False
    return True


def _fields_match(obj: _Object, selector: str) -> bool:
    meta = obj.get("metadata", {})
    for term in filter(None, (t.strip() for t in selector.split(","))):
        name, _, value = term.replace("==", "=").partition("=")
        known = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}
        if name not in known:
            raise _HttpError(400, "BadRequest", f"field label not supported: {name}")
        if known[name] != value:
            return False
    return True


def _missing(kind: _Kind, name: str) -> _HttpError:
    return _HttpError(404, "NotFound", f'{kind.plural}.{_group(kind)} "{name}" not found')


def obj_gv(obj: _Object) -> str:
    """The ``apiVersion`` of a stored object."""
    return str(obj.get("apiVersion", ""))


def _content(obj: _Object) -> _Object:
    return {k: v for k, v in obj.items() if k != "metadata"}


def _meta(meta: _Object) -> _Object:
    return {k: v for k, v in meta.items() if k not in ("resourceVersion", "generation")}


def _group(kind: _Kind) -> str:
    return kind.group_version.split("/")[0]


def _pod_of(endpoint: _Object) -> str | None:
    ref = endpoint.get("targetRef") or {}
    return ref.get("name") if ref.get("kind") == "Pod" else None


def _group_list() -> _Object:
    groups: dict[str, list[str]] = {}
    for kind in _KINDS.values():
        group, version = kind.group_version.split("/")
        groups.setdefault(group, []).append(version)
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {
                "name": group,
                "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                "preferredVersion": {
                    "groupVersion": f"{group}/{versions[0]}",
                    "version": versions[0],
                },
            }
            for group, versions in sorted(groups.items())
        ],
    }


def _discovery_document(parts: list[str]) -> _Object | None:
    """The answer to a discovery path (``/version``, ``/api``, ``/apis/<group>/<version>``)."""
    if parts == ["version"]:
        return dict(_VERSION)
    if parts == ["api"]:
        return {"kind": "APIVersions", "versions": ["v1"]}
    if parts == ["api", "v1"]:
        return {"kind": "APIResourceList", "groupVersion": "v1", "resources": []}
    if parts == ["apis"]:
        return _group_list()
    if len(parts) == 3 and parts[0] == "apis":
        group_version = f"{parts[1]}/{parts[2]}"
        resources = [k.resource() for k in _KINDS.values() if k.group_version == group_version]
        if resources:
            return {
                "kind": "APIResourceList",
                "groupVersion": group_version,
                "resources": resources,
            }
    return None
