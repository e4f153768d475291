"""The fake API server's objects, its resourceVersion counter and its event history.

One global resourceVersion counter numbers every write, like etcd's revision behind a real API
server. Every change is recorded in a bounded history (``history_limit``) and offered to the open
watch streams of its resource; a watch that resumes from a resourceVersion older than the history
gets 410 Gone. The methods here run with the lock held.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from troupe.testing.fake_kubernetes._resources import (
    _KINDS,
    _content,
    _fields_match,
    _group,
    _Kind,
    _meta,
    _selector_matches,
)
from troupe.testing.fake_kubernetes._wire import _HttpError, _Object


class _Drop:
    """Queued to a watch stream to end it (``drop_watches``, ``stop``)."""


class _Stall:
    """Queued to a watch stream to make it go silent without ending (``stall_watches``)."""


_DROP = _Drop()
_STALL = _Stall()


@dataclass(eq=False)
class _Watcher:
    kind: _Kind
    namespace: str | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[_Object | _Drop | _Stall] = field(default_factory=asyncio.Queue)
    stalled: bool = False  # silent from now on (a half-open connection); not counted as open

    def offer(self, item: _Object | _Drop | _Stall) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the server's loop is closed: the stream is gone anyway
            pass


class _Store:
    """The state of :class:`FakeKubernetes` (its ``__init__`` sets it) and the writes to it;
    the base of its test hooks and of its ASGI app."""

    token: str
    history_limit: int
    gone_as_http_status: bool
    _lock: threading.RLock
    _rv: int
    _oldest: int  # watches from a resourceVersion below this get 410 Gone
    _objects: dict[tuple[str, str, str], _Object]  # (plural, ns, name) -> object
    _history: list[tuple[int, str, str, str, _Object]]  # rv, plural, ns, type, obj
    _watchers: list[_Watcher]
    _calls: Counter[tuple[str, str]]
    _watch_params: list[tuple[str, str | None, str | None]]  # plural, rv, timeout
    _hooks: list[tuple[str, str, Callable[[], object]]]  # before_next
    _changed: threading.Condition
    _loop: asyncio.AbstractEventLoop | None
    _held: bool  # new watch requests wait while True (hold_watches)
    _released: asyncio.Event | None  # on the server's loop; clear while held

    def _kind_of(self, plural: str) -> _Kind:
        for (_, p), kind in _KINDS.items():
            if p == plural:
                return kind
        raise ValueError(f"the fake API server does not serve {plural!r}")

    def _count(self, verb: str, plural: str) -> None:
        """Count one request and run the :meth:`before_next` actions waiting for it."""
        self._calls[(verb, plural)] += 1
        due = [hook for hook in self._hooks if hook[:2] == (verb, plural)]
        self._hooks = [hook for hook in self._hooks if hook[:2] != (verb, plural)]
        for _, _, action in due:
            action()

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _record(self, kind: _Kind, namespace: str, event: str, obj: _Object) -> None:
        snapshot = copy.deepcopy(obj)
        rv = int(obj["metadata"]["resourceVersion"])
        self._history.append((rv, kind.plural, namespace, event, snapshot))
        if len(self._history) > self.history_limit:
            dropped = self._history[: len(self._history) - self.history_limit]
            del self._history[: len(dropped)]
            self._oldest = dropped[-1][0]
        line = {"type": event, "object": snapshot}
        for watcher in self._watchers:
            if watcher.kind is kind and watcher.namespace in (None, namespace):
                watcher.offer(line)

    def _create(self, kind: _Kind, namespace: str, body: _Object) -> _Object:
        meta = body.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise _HttpError(422, "Invalid", "metadata.name: Required value")
        if meta.get("namespace") not in (None, namespace):
            raise _HttpError(400, "BadRequest", "the namespace of the object does not match")
        if (kind.plural, namespace, name) in self._objects:
            raise _HttpError(
                409, "AlreadyExists", f'{kind.plural}.{_group(kind)} "{name}" already exists'
            )
        meta.update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            resourceVersion=str(self._next_rv()),
            generation=1,
            creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        body["apiVersion"] = kind.group_version
        body["kind"] = kind.kind
        self._objects[(kind.plural, namespace, name)] = body
        self._record(kind, namespace, "ADDED", body)
        return copy.deepcopy(body)

    def _replace(self, kind: _Kind, namespace: str, name: str, body: _Object) -> _Object:
        current = self._objects.get((kind.plural, namespace, name))
        if current is None:
            raise _HttpError(404, "NotFound", f'{kind.plural}.{_group(kind)} "{name}" not found')
        meta = body.setdefault("metadata", {})
        asked = meta.get("resourceVersion")
        if asked not in (None, "") and asked != current["metadata"]["resourceVersion"]:
            raise _HttpError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {kind.plural}.{_group(kind)} "{name}": the '
                "object has been modified; please apply your changes to the latest version and "
                "try again",
            )
        old_meta = current["metadata"]
        for fixed in ("name", "namespace", "uid", "creationTimestamp"):
            meta[fixed] = old_meta[fixed]
        body["apiVersion"] = kind.group_version
        body["kind"] = kind.kind
        changed = _content(body) != _content(current)
        if not changed and _meta(meta) == _meta(old_meta):
            return copy.deepcopy(current)  # a no-op write keeps the resourceVersion, as upstream
        meta["generation"] = int(old_meta.get("generation", 1)) + (1 if changed else 0)
        meta["resourceVersion"] = str(self._next_rv())
        self._objects[(kind.plural, namespace, name)] = body
        self._record(kind, namespace, "MODIFIED", body)
        return copy.deepcopy(body)

    def _delete(self, kind: _Kind, namespace: str, name: str) -> _Object:
        current = self._objects.pop((kind.plural, namespace, name), None)
        if current is None:
            raise _HttpError(404, "NotFound", f'{kind.plural}.{_group(kind)} "{name}" not found')
        current["metadata"]["resourceVersion"] = str(self._next_rv())
        self._record(kind, namespace, "DELETED", current)
        return copy.deepcopy(current)

    def _list(
        self, kind: _Kind, namespace: str | None, query: dict[str, str]
    ) -> tuple[list[_Object], int]:
        labels = query.get("labelSelector", "")
        fields = query.get("fieldSelector", "")
        items = [
            copy.deepcopy(obj)
            for (plural, ns, _), obj in sorted(self._objects.items())
            if plural == kind.plural
            and namespace in (None, ns)
            and _selector_matches(obj["metadata"].get("labels") or {}, labels)
            and _fields_match(obj, fields)
        ]
        return items, self._rv
