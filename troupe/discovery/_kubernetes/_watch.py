"""The visible set and the watches of the ``kubernetes`` store.

A key is *visible* (to ``get``, ``list`` and ``watch``) only while its resource exists and the
pod of that name is ready in an EndpointSlice of the namespace (an endpoint whose ``targetRef``
is the pod, with ``conditions.ready`` true or absent). Watches list and watch both resources and
emit the differences of the visible set as ``Put``/``Delete`` events, so the WatcherActor turns
them into the same ``Joined``/``Left`` messages as with any other store; an event that changes
no entry (a lease renewal) costs no recomputation of the visible set. Each watch request asks
the server to end it after ``timeoutSeconds`` and reads with a slightly longer timeout; the watch
then resumes from its last resourceVersion.

A watch numbers its own events (resourceVersions of different objects cannot be compared), so
watch revisions are comparable only within one watch. After a 410 Gone the watch relists and
reports only the difference.
"""

from __future__ import annotations

import asyncio
import builtins
import json
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from troupe.discovery._kubernetes._client import _Gone, _Requests
from troupe.discovery._kubernetes._spec import (
    DWM_PLURAL,
    ES_PLURAL,
    _Entry,
    _name,
    _Object,
    _resource_version,
    ready_pods,
    resource_entries,
)
from troupe.discovery._store import (
    Delete,
    KeyValue,
    Put,
    Snapshot,
    WatchEvent,
    _Closed,
    key_matches,
)
from troupe.errors import DiscoveryError

_RESUME_DELAY = (0.02, 1.0)  # backoff between watch resumes that ended at once, empty
_WATCH_TIMEOUT = 300.0  # seconds: a watch request's timeoutSeconds, before jitter
_WATCH_JITTER = 0.25  # timeoutSeconds is _WATCH_TIMEOUT times 1 to 1 + this


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


class _Watches(_Requests):
    """The watches of :class:`KubernetesStore` (its base class: the store sets these
    attributes)."""

    _watch_timeout: float
    _watches: set[_OpenWatch]

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
