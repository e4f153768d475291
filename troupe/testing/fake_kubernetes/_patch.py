"""Patches the fake API server applies, without I/O.

``application/merge-patch+json`` (RFC 7386) and ``application/json-patch+json`` (RFC 6902:
``add``, ``remove``, ``replace``, ``move``, ``copy``, ``test``; an operation that cannot be
applied, a failed ``test`` included, is 422 Unprocessable Entity as upstream).
"""

from __future__ import annotations

import copy
from typing import Any

from troupe.testing.fake_kubernetes._wire import _HttpError


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386 JSON merge patch: objects merge recursively, ``null`` deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[str, Any] = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class _PatchFailed(_HttpError):
    """A JSON patch operation that cannot be applied: 422, as the real API server answers."""

    def __init__(self, message: str) -> None:
        super().__init__(422, "Invalid", f"the JSON patch cannot be applied: {message}")


def json_patch(document: object, operations: object) -> object:
    """RFC 6902 JSON patch: apply ``operations`` to a copy of ``document``; all or nothing.

    Raises:
        _HttpError: 400 when ``operations`` is not a list; 422 when an operation is malformed or
            cannot be applied (a missing path, a failed ``test``).
    """
    if not isinstance(operations, list):
        raise _HttpError(400, "BadRequest", "a JSON patch must be a JSON array of operations")
    result = copy.deepcopy(document)
    for operation in operations:
        if not isinstance(operation, dict) or not isinstance(operation.get("path"), str):
            raise _PatchFailed(f"malformed operation {operation!r}")
        name, path = operation.get("op"), _pointer(operation["path"])
        if name in ("add", "replace", "test") and "value" not in operation:
            raise _PatchFailed(f"{name} {operation['path']!r} has no value")
        if name == "add":
            result = _pointer_add(result, path, copy.deepcopy(operation["value"]))
        elif name == "remove":
            result, _ = _pointer_remove(result, path)
        elif name == "replace":
            result, _ = _pointer_remove(result, path)
            result = _pointer_add(result, path, copy.deepcopy(operation["value"]))
        elif name == "test":
            if not _json_equal(_pointer_get(result, path), operation["value"]):
                raise _PatchFailed(f"test of {operation['path']!r} failed")
        elif name in ("move", "copy"):
            if not isinstance(operation.get("from"), str):
                raise _PatchFailed(f"{name} {operation['path']!r} has no from")
            source = _pointer(operation["from"])
            if name == "move":
                if path[: len(source)] == source and path != source:
                    raise _PatchFailed("cannot move a value into itself")
                result, value = _pointer_remove(result, source)
            else:
                value = copy.deepcopy(_pointer_get(result, source))
            result = _pointer_add(result, path, value)
        else:
            raise _PatchFailed(f"unknown operation {name!r}")
    return result


def _pointer(text: str) -> list[str]:
    """The reference tokens of an RFC 6901 JSON pointer (``~1`` is ``/``, ``~0`` is ``~``)."""
    if text == "":
        return []
    if not text.startswith("/"):
        raise _PatchFailed(f"invalid JSON pointer {text!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in text[1:].split("/")]


def _index(part: str, size: int, *, end: bool) -> int:
    if end and part == "-":
        return size
    if not part.isdigit() or (len(part) > 1 and part.startswith("0")):
        raise _PatchFailed(f"invalid array index {part!r}")
    index = int(part)
    if index > size or (index == size and not end):
        raise _PatchFailed(f"array index {index} out of range")
    return index


def _pointer_get(document: object, path: list[str]) -> object:
    node = document
    for token in path:
        if isinstance(node, dict):
            if token not in node:
                raise _PatchFailed(f"no member {token!r}")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(token, len(node), end=False)]
        else:
            raise _PatchFailed(f"cannot descend into {token!r}")
    return node


def _pointer_add(document: object, path: list[str], value: object) -> object:
    if not path:
        return value
    parent, last = _pointer_get(document, path[:-1]), path[-1]
    if isinstance(parent, dict):
        parent[last] = value  # an existing member is replaced whole
    elif isinstance(parent, list):
        parent.insert(_index(last, len(parent), end=True), value)
    else:
        raise _PatchFailed(f"cannot add {last!r} to a scalar")
    return document


def _pointer_remove(document: object, path: list[str]) -> tuple[object, object]:
    if not path:
        return None, document
    parent, last = _pointer_get(document, path[:-1]), path[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _PatchFailed(f"no member {last!r} to remove")
        return document, parent.pop(last)
    if isinstance(parent, list):
        return document, parent.pop(_index(last, len(parent), end=False))
    raise _PatchFailed(f"cannot remove {last!r} from a scalar")


def _json_equal(a: object, b: object) -> bool:
    """Equality of JSON values (``true`` is not ``1``, unlike Python's ``==``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b
