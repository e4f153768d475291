"""The fake API server's test hooks.

Thread-safe, callable from any thread or event loop: :meth:`set_pod_ready`, :meth:`remove_pod`
(the pod is gone: its endpoints and the resources it owns are deleted, as the garbage collector
would), :meth:`delete_resource`, :meth:`drop_watches`, :meth:`hold_watches`,
:meth:`stall_watches` (a half-open connection), :meth:`compact`, :meth:`before_next` (run a
change just before the next request of a kind), :meth:`calls` and :meth:`wait_for_watches`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping

from troupe.testing.fake_kubernetes._resources import (
    _KINDS,
    DWM_PLURAL,
    ES_PLURAL,
    _pod_of,
    obj_gv,
)
from troupe.testing.fake_kubernetes._store import _DROP, _STALL, _Store
from troupe.testing.fake_kubernetes._wire import _Object


class _Hooks(_Store):
    """The test hooks of :class:`FakeKubernetes` (its base class)."""

    @property
    def resource_version(self) -> int:
        """The latest resourceVersion."""
        with self._lock:
            return self._rv

    def calls(self, verb: str, plural: str = DWM_PLURAL) -> int:
        """How many ``verb`` requests (``list``, ``watch``, ``get``, ``create``, ``patch``,
        ``update``, ``delete``) were served for ``plural``."""
        with self._lock:
            return self._calls[(verb, plural)]

    def watch_resource_versions(self, plural: str = DWM_PLURAL) -> list[str | None]:
        """The ``resourceVersion`` each watch request of ``plural`` asked for, in order."""
        with self._lock:
            return [rv for p, rv, _ in self._watch_params if p == plural]

    def watch_timeouts(self, plural: str = DWM_PLURAL) -> list[str | None]:
        """The ``timeoutSeconds`` each watch request of ``plural`` asked for, in order."""
        with self._lock:
            return [timeout for p, _, timeout in self._watch_params if p == plural]

    def open_watches(self, plural: str | None = None) -> int:
        """How many watch streams are open and live (of ``plural``, or of every resource)."""
        with self._lock:
            return sum(
                1
                for w in self._watchers
                if not w.stalled and (plural is None or w.kind.plural == plural)
            )

    def before_next(self, verb: str, plural: str, action: Callable[[], object]) -> None:
        """Run ``action`` once, on the server's thread, just before the next ``verb`` request
        (as in :meth:`calls`) of ``plural`` is served: a change that races a client's request.

        ``action`` may call the other hooks (``put_resource``, ``delete_resource``...).
        """
        with self._lock:
            self._hooks.append((verb, plural, action))

    def wait_for_watches(
        self, count: int, plural: str | None = None, *, timeout: float = 10.0
    ) -> None:
        """Block until at least ``count`` watch streams are open; AssertionError at the deadline.

        Blocking: from async code, run it in a thread (``asyncio.to_thread``).
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.open_watches(plural) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{count} open watches of {plural or 'any resource'} not within "
                        f"{timeout:g} s; open: {self.open_watches(plural)}"
                    )
                self._changed.wait(left)

    def get_resource(self, namespace: str, plural: str, name: str) -> _Object | None:
        """A copy of one stored object, or None."""
        with self._lock:
            obj = self._objects.get((plural, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list_resources(self, namespace: str, plural: str) -> list[_Object]:
        """Copies of the stored objects of ``plural`` in ``namespace``, sorted by name."""
        with self._lock:
            return [
                copy.deepcopy(obj)
                for (p, ns, _), obj in sorted(self._objects.items())
                if p == plural and ns == namespace
            ]

    def put_resource(self, namespace: str, plural: str, obj: _Object) -> _Object:
        """Create or replace an object as a client would (no preconditions); return it."""
        kind = self._kind_of(plural)
        with self._lock:
            name = obj["metadata"]["name"]
            if (plural, namespace, name) in self._objects:
                body = copy.deepcopy(obj)
                body.setdefault("metadata", {}).pop("resourceVersion", None)
                return self._replace(kind, namespace, name, body)
            return self._create(kind, namespace, copy.deepcopy(obj))

    def delete_resource(self, namespace: str, plural: str, name: str) -> bool:
        """Delete an object (watchers see ``DELETED``); True if it existed."""
        kind = self._kind_of(plural)
        with self._lock:
            if (plural, namespace, name) not in self._objects:
                return False
            self._delete(kind, namespace, name)
            return True

    def set_pod_ready(
        self,
        namespace: str,
        pod: str,
        ready: bool = True,
        *,
        slice_name: str = "troupe-workers",
        address: str | None = None,
    ) -> None:
        """Put ``pod`` in EndpointSlice ``slice_name`` with ``conditions.ready`` = ``ready``.

        Creates the slice if needed; updates the pod's endpoint if it is there already.
        """
        kind = self._kind_of(ES_PLURAL)
        with self._lock:
            current = self._objects.get((ES_PLURAL, namespace, slice_name))
            endpoint = {
                "addresses": [address or f"10.0.0.{1 + (sum(map(ord, pod)) % 250)}"],
                "conditions": {"ready": ready, "serving": ready, "terminating": False},
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod},
            }
            if current is None:
                self._create(
                    kind,
                    namespace,
                    {
                        "metadata": {
                            "name": slice_name,
                            "labels": {"kubernetes.io/service-name": slice_name},
                        },
                        "addressType": "IPv4",
                        "endpoints": [endpoint],
                        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
                    },
                )
                return
            body = copy.deepcopy(current)
            endpoints = [e for e in body.get("endpoints") or [] if _pod_of(e) != pod]
            body["endpoints"] = [*endpoints, endpoint]
            body["metadata"].pop("resourceVersion", None)
            self._replace(kind, namespace, slice_name, body)

    def remove_pod(self, namespace: str, pod: str) -> None:
        """The pod is gone: drop its endpoints and garbage-collect the resources it owns."""
        es_kind = self._kind_of(ES_PLURAL)
        with self._lock:
            for (plural, ns, name), obj in list(self._objects.items()):
                if ns != namespace:
                    continue
                if plural == ES_PLURAL:
                    endpoints = obj.get("endpoints") or []
                    kept = [e for e in endpoints if _pod_of(e) != pod]
                    if len(kept) != len(endpoints):
                        body = copy.deepcopy(obj)
                        body["endpoints"] = kept
                        body["metadata"].pop("resourceVersion", None)
                        self._replace(es_kind, namespace, name, body)
                owners = obj.get("metadata", {}).get("ownerReferences") or []
                if any(o.get("kind") == "Pod" and o.get("name") == pod for o in owners):
                    self._delete(_KINDS[(obj_gv(obj), plural)], namespace, name)

    def collect_garbage(self, namespace: str, pods: Mapping[str, str]) -> list[str]:
        """The garbage collector's pass: delete the objects of ``namespace`` owned by a pod that
        is not in ``pods`` (``{pod name: uid}``: the live pods). An owner reference names its
        pod by uid too, so an object owned by an earlier pod of a re-created pod's name goes.
        Return the deleted objects' ``plural/name``."""
        deleted = []
        with self._lock:
            for (plural, ns, name), obj in list(self._objects.items()):
                owners = obj.get("metadata", {}).get("ownerReferences") or []
                pod_owners = [o for o in owners if o.get("kind") == "Pod"]
                if ns != namespace or not pod_owners:
                    continue
                if all(pods.get(o.get("name")) != o.get("uid") for o in pod_owners):
                    self._delete(_KINDS[(obj_gv(obj), plural)], namespace, name)
                    deleted.append(f"{plural}/{name}")
        return deleted

    def drop_watches(self) -> int:
        """End every open watch stream (the client sees the response end); return how many."""
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.offer(_DROP)
        return len(watchers)

    def stall_watches(self) -> int:
        """Make every open watch stream go silent without ending, as a half-open connection
        does: no more events, no end at ``timeoutSeconds``; only the client's read timeout (or
        :meth:`drop_watches`, :meth:`stop`) ends it. Return how many were stalled."""
        with self._lock:
            watchers = [w for w in self._watchers if not w.stalled]
            for watcher in watchers:
                watcher.stalled = True
            self._changed.notify_all()
        for watcher in watchers:
            watcher.offer(_STALL)
        return len(watchers)

    def hold_watches(self, hold: bool = True) -> None:
        """While held, new watch requests wait before they start (their responses included).

        Together with :meth:`drop_watches` this makes a gap of the test's choosing: hold, drop,
        change things (and maybe :meth:`compact`), then release with ``hold_watches(False)``.
        """
        with self._lock:
            self._held = hold
            loop, released = self._loop, self._released
        if loop is not None and released is not None:
            # FIFO with drop_watches' wake-ups on the same loop: held before any stream ends.
            loop.call_soon_threadsafe(released.clear if hold else released.set)

    def compact(self) -> None:
        """Forget the event history: a watch from any older resourceVersion now gets 410 Gone."""
        with self._lock:
            self._history.clear()
            self._oldest = self._rv
