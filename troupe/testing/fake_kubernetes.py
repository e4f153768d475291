"""A fake Kubernetes API server for tests of the ``kubernetes`` discovery backend.

No real API server can run on a developer machine or in CI here, so the tests talk to this one
through the real client library (kr8s). It speaks the parts of the real HTTP protocol that
discovery needs, for two namespaced resources: ``endpointslices`` (``discovery.k8s.io/v1``) and
the ``dynamoworkermetadatas`` custom resource (``nvidia.com/v1alpha1``):

- discovery: ``/version``, ``/api``, ``/api/v1``, ``/apis`` and each group version;
- list (``metadata.resourceVersion`` of the collection), get, create, replace;
- delete, honouring ``DeleteOptions.preconditions`` (``uid``, ``resourceVersion``: 409 Conflict
  when they do not match, as on a real server);
- patch with ``application/merge-patch+json`` (RFC 7386) or ``application/json-patch+json``
  (RFC 6902: ``add``, ``remove``, ``replace``, ``move``, ``copy``, ``test``; an operation that
  cannot be applied, a failed ``test`` included, is 422 Unprocessable Entity as upstream). A
  patched object whose ``metadata.resourceVersion`` differs from the stored one (a merge patch
  that names one, a JSON patch that replaces it) is a precondition: 409 Conflict when stale;
- ``?watch=true&resourceVersion=N``: a JSON-lines stream of ``ADDED``/``MODIFIED``/``DELETED``
  events after ``N`` (all current objects as ``ADDED`` when ``N`` is unset or ``0``), ended by the
  server after ``timeoutSeconds`` when given; a ``resourceVersion`` older than the retained
  history gets the real server's answer, an ``ERROR`` event carrying a ``Status`` with code 410
  (or, with ``gone_as_http_status=True``, an HTTP 410 response, as some proxies and old servers
  give);
- bearer-token authentication (401 with a wrong token).

One global resourceVersion counter numbers every write, like etcd's revision behind a real API
server. Test hooks (thread-safe, callable from any thread or event loop): :meth:`set_pod_ready`,
:meth:`remove_pod` (the pod is gone: its endpoints and the resources it owns are deleted, as the
garbage collector would), :meth:`delete_resource`, :meth:`drop_watches`, :meth:`hold_watches`,
:meth:`stall_watches` (a half-open connection), :meth:`compact`, :meth:`before_next` (run a
change just before the next request of a kind), :meth:`calls` and :meth:`wait_for_watches`.

The server runs hypercorn on an event loop in a thread of its own, bound to 127.0.0.1, and writes
a kubeconfig file that points at it. ``python -m troupe.testing.fake_kubernetes --port P`` serves
until interrupted, for process tests and manual experiments (``kubectl`` works against it for
these two resources).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast
from urllib.parse import parse_qs

from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.typing import ASGIFramework
from hypercorn.utils import wrap_app

from troupe.testing.servers import TlsFiles

__all__ = ["DWM_GROUP_VERSION", "DWM_PLURAL", "ES_GROUP_VERSION", "ES_PLURAL", "FakeKubernetes"]

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_Object = dict[str, Any]

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


@dataclass(frozen=True)
class _Request:
    method: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    receive: _Receive
    send: _Send


class _HttpError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def _status(code: int, reason: str, message: str) -> _Object:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure" if code >= 400 else "Success",
        "message": message,
        "reason": reason,
        "code": code,
    }


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


class FakeKubernetes:
    """A fake API server on ``127.0.0.1`` with the list/watch protocol of a real one.

    Args:
        port: the port to listen on (0: a free one; kept across :meth:`stop`/:meth:`start`).
        directory: where to write the kubeconfig (a temporary directory when omitted, removed by
            :meth:`close` and on leaving a ``with`` block).
        token: the bearer token clients must send (it is written into the kubeconfig).
        history_limit: how many events are retained for watches that resume from an old
            resourceVersion; older ones get 410 Gone.
        gone_as_http_status: answer a stale resourceVersion with an HTTP 410 response instead of
            the in-stream ``ERROR`` event a real API server sends.
        tls: serve HTTPS with these certificates (``troupe.testing.make_tls_files``), as a real
            API server does; the kubeconfig then names the CA.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        directory: str | Path | None = None,
        token: str = "fake-token",  # noqa: S107 - a test server's well-known token
        history_limit: int = 10_000,
        gone_as_http_status: bool = False,
        tls: TlsFiles | None = None,
    ) -> None:
        self.port = port
        self.token = token
        self.history_limit = history_limit
        self.gone_as_http_status = gone_as_http_status
        self.tls = tls
        self._directory = Path(directory) if directory is not None else None
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._lock = threading.RLock()
        self._rv = 0
        self._oldest = 0  # watches from a resourceVersion below this get 410 Gone
        self._objects: dict[tuple[str, str, str], _Object] = {}  # (plural, ns, name) -> object
        self._history: list[tuple[int, str, str, str, _Object]] = []  # rv, plural, ns, type, obj
        self._watchers: list[_Watcher] = []
        self._calls: Counter[tuple[str, str]] = Counter()
        self._watch_params: list[tuple[str, str | None, str | None]] = []  # plural, rv, timeout
        self._hooks: list[tuple[str, str, Callable[[], object]]] = []  # before_next
        self._changed = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self._held = False  # new watch requests wait while True (hold_watches)
        self._released: asyncio.Event | None = None  # on the server's loop; clear while held
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.kubeconfig: Path | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https`` with TLS)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Listen (on the same port as before after a :meth:`stop`) and write the kubeconfig."""
        if self._thread is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted sockets inherit it: without, Nagle + delayed ACK add 40 ms per request.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        self._write_kubeconfig()
        self._started.clear()
        self._error = None
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"FakeKubernetes-{self.port}"
        )
        self._thread.start()
        self._started.wait(10.0)
        error: BaseException | None = getattr(self, "_error")  # noqa: B009 - set by the thread
        if error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"fake API server failed to start: {error!r}")

    def stop(self) -> None:
        """Close every watch stream, stop serving and join the thread (the state is kept)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self.drop_watches()
        loop, shutdown, released = self._loop, self._shutdown, self._released
        if loop is not None and shutdown is not None:
            try:
                if released is not None:
                    loop.call_soon_threadsafe(released.set)  # held watch requests end too
                loop.call_soon_threadsafe(shutdown.set)
            except RuntimeError:  # already closed: the thread is ending
                pass
        thread.join()
        self._loop = None

    def close(self) -> None:
        """:meth:`stop`, and remove the kubeconfig's temporary directory."""
        self.stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def _write_kubeconfig(self) -> None:
        if self._directory is None:
            if self._tempdir is None:
                self._tempdir = tempfile.TemporaryDirectory(prefix="fake-kube-")
            directory = Path(self._tempdir.name)
        else:
            directory = self._directory
            directory.mkdir(parents=True, exist_ok=True)
        path = directory / "kubeconfig"
        cluster: dict[str, str] = {"server": self.url}
        if self.tls is not None:
            cluster["certificate-authority"] = self.tls.ca
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": "default"},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
        self.kubeconfig = path

    def _run(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(sock))
        except BaseException as exc:  # noqa: BLE001 - reported by start(); the thread ends anyway
            self._error = exc
        finally:
            self._started.set()
            sock.close()
            loop.close()

    async def _serve(self, sock: socket.socket) -> None:
        self._shutdown = asyncio.Event()
        self._released = asyncio.Event()
        with self._lock:
            if not self._held:
                self._released.set()
        config = HypercornConfig()
        config.accesslog = None
        config.errorlog = logging.getLogger("troupe.testing.fake_kubernetes")
        config.graceful_timeout = 1.0
        config.keep_alive_timeout = 30.0
        if self.tls is not None:
            config.certfile = self.tls.server_cert
            config.keyfile = self.tls.server_key
        sockets = Sockets([sock], [], []) if self.tls else Sockets([], [sock], [])
        app = wrap_app(cast("ASGIFramework", self), 0, "asgi")
        serving = asyncio.create_task(
            worker_serve(
                app,
                config,
                sockets=sockets,
                shutdown_trigger=self._shutdown.wait,
            ),
            name=f"FakeKubernetes-{self.port}-hypercorn",
        )
        await asyncio.sleep(0)
        self._started.set()
        await serving

    # --- test hooks ------------------------------------------------------------------------------

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

    # --- the store (lock held) -----------------------------------------------------------------

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

    # --- the ASGI app ----------------------------------------------------------------------------

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        try:
            await self._http(scope, receive, send)
        except _HttpError as exc:
            await _send_json(send, exc.code, _status(exc.code, exc.reason, exc.message))

    async def _http(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token and headers.get("authorization") != f"Bearer {self.token}":
            raise _HttpError(401, "Unauthorized", "Unauthorized")
        method: str = scope["method"]
        parts = [p for p in scope["path"].split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(scope["query_string"].decode("latin-1")).items()}
        body = await _read_body(receive) if method in ("POST", "PUT", "PATCH", "DELETE") else b""
        request = _Request(method, query, headers, body, receive, send)

        discovery = _discovery_document(parts)
        if discovery is not None:
            return await _send_json(send, 200, discovery)
        if len(parts) >= 4 and parts[0] == "apis":
            group_version = f"{parts[1]}/{parts[2]}"
            rest = parts[3:]
            namespace: str | None = None
            if rest[0] == "namespaces" and len(rest) >= 3:
                namespace, rest = rest[1], rest[2:]
            kind = _KINDS.get((group_version, rest[0]))
            if kind is not None and len(rest) <= 2:
                name = rest[1] if len(rest) == 2 else None
                if name is None:
                    return await self._collection(kind, namespace, request)
                if namespace is not None:
                    return await self._item(kind, namespace, name, request)
        raise _HttpError(404, "NotFound", "the server could not find the requested resource")

    async def _collection(self, kind: _Kind, namespace: str | None, request: _Request) -> None:
        method, query, send = request.method, request.query, request.send
        if method == "GET" and query.get("watch", "").lower() in ("true", "1"):
            return await self._watch(kind, namespace, query, request.receive, send)
        if method == "GET":
            with self._lock:
                self._count("list", kind.plural)
                items, rv = self._list(kind, namespace, query)
            doc = {
                "kind": f"{kind.kind}List",
                "apiVersion": kind.group_version,
                "metadata": {"resourceVersion": str(rv)},
                "items": items,
            }
            return await _send_json(send, 200, doc)
        if method == "POST" and namespace is not None:
            obj = _parse_object(request.body)
            with self._lock:
                self._count("create", kind.plural)
                created = self._create(kind, namespace, obj)
            return await _send_json(send, 201, created)
        raise _HttpError(405, "MethodNotAllowed", f"{method} is not supported here")

    async def _item(self, kind: _Kind, namespace: str, name: str, request: _Request) -> None:
        method, send = request.method, request.send
        key = (kind.plural, namespace, name)
        missing = _HttpError(404, "NotFound", f'{kind.plural}.{_group(kind)} "{name}" not found')
        result: _Object
        if method == "GET":
            with self._lock:
                self._count("get", kind.plural)
                found = self._objects.get(key)
                if found is None:
                    raise missing
                result = copy.deepcopy(found)
        elif method == "PATCH":
            result = self._patch(kind, namespace, name, request)
        elif method == "PUT":
            obj = _parse_object(request.body)
            with self._lock:
                self._count("update", kind.plural)
                result = self._replace(kind, namespace, name, obj)
        elif method == "DELETE":
            result = self._delete_with_options(kind, namespace, name, request)
        else:
            raise _HttpError(405, "MethodNotAllowed", f"{method} is not supported here")
        await _send_json(send, 200, result)

    def _patch(self, kind: _Kind, namespace: str, name: str, request: _Request) -> _Object:
        key = (kind.plural, namespace, name)
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        patch: object
        if content_type == "application/json-patch+json":
            patch = _parse_json(request.body)
        elif content_type in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",  # treated as a merge patch here
        ):
            patch = _parse_object(request.body)
        else:
            raise _HttpError(
                415, "UnsupportedMediaType", f"the fake does not support {content_type!r}"
            )
        with self._lock:
            self._count("patch", kind.plural)
            current = self._objects.get(key)
            if current is None:
                raise _missing(kind, name)
            if content_type != "application/json-patch+json" and isinstance(patch, dict):
                patched = merge_patch(current, patch)
                asked = (patch.get("metadata") or {}).get("resourceVersion")
            else:  # the patched object's resourceVersion is the precondition
                patched = json_patch(current, patch)
                asked = None
                if isinstance(patched, dict) and isinstance(patched.get("metadata"), dict):
                    asked = patched["metadata"].get("resourceVersion")
            if not isinstance(patched, dict):
                raise _PatchFailed("the result is not an object")
            patched.setdefault("metadata", {})["resourceVersion"] = asked
            return self._replace(kind, namespace, name, patched)

    def _delete_with_options(
        self, kind: _Kind, namespace: str, name: str, request: _Request
    ) -> _Object:
        key = (kind.plural, namespace, name)
        options = _parse_object(request.body) if request.body.strip() else {}
        preconditions = options.get("preconditions") or {}
        with self._lock:
            self._count("delete", kind.plural)
            current = self._objects.get(key)
            if current is None:
                raise _missing(kind, name)
            for field_name in ("uid", "resourceVersion"):
                wanted, actual = preconditions.get(field_name), current["metadata"][field_name]
                if wanted is not None and wanted != actual:
                    raise _HttpError(
                        409,
                        "Conflict",
                        f"Operation cannot be fulfilled on {kind.plural}.{_group(kind)} "
                        f'"{name}": Precondition failed: {field_name} in precondition: '
                        f"{wanted}, {field_name} in object meta: {actual}",
                    )
            return self._delete(kind, namespace, name)

    async def _watch(
        self,
        kind: _Kind,
        namespace: str | None,
        query: dict[str, str],
        receive: _Receive,
        send: _Send,
    ) -> None:
        since_text = query.get("resourceVersion") or None
        if self._released is not None:
            await self._released.wait()
        watcher = _Watcher(kind, namespace, asyncio.get_running_loop())
        with self._lock:
            self._count("watch", kind.plural)
            self._watch_params.append((kind.plural, since_text, query.get("timeoutSeconds")))
            try:
                since = int(since_text) if since_text is not None else 0
            except ValueError:
                raise _HttpError(
                    400, "BadRequest", f"invalid resourceVersion {since_text!r}"
                ) from None
            gone = since_text not in (None, "0") and since < self._oldest
            if gone and self.gone_as_http_status:
                raise _HttpError(410, "Expired", f"too old resource version: {since} ({self._rv})")
            backlog: list[_Object] = []
            if not gone:
                if since_text in (None, "0"):
                    items, _ = self._list(kind, namespace, query)
                    backlog = [{"type": "ADDED", "object": obj} for obj in items]
                else:
                    backlog = [
                        {"type": event, "object": copy.deepcopy(obj)}
                        for rv, plural, ns, event, obj in self._history
                        if rv > since and plural == kind.plural and namespace in (None, ns)
                    ]
                self._watchers.append(watcher)
                self._changed.notify_all()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        if gone:
            status = _status(410, "Expired", f"too old resource version: {since} ({self._rv})")
            await _send_line(send, {"type": "ERROR", "object": status})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        try:
            for line in backlog:
                await _send_line(send, line)
            await self._stream(watcher, receive, send, timeout)
        finally:
            with self._lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)
                self._changed.notify_all()

    async def _stream(
        self, watcher: _Watcher, receive: _Receive, send: _Send, timeout: float | None
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        disconnected = asyncio.ensure_future(_until_disconnect(receive))
        pending: list[asyncio.Future[Any]] = []
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                getting = asyncio.ensure_future(watcher.queue.get())
                pending[:] = [getting]
                done, _ = await asyncio.wait(
                    {getting, disconnected}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                if getting not in done:
                    if disconnected in done:
                        return  # the client went away: nothing more to send
                    break  # timeoutSeconds ran out
                item = getting.result()
                if isinstance(item, _Drop):
                    break
                if isinstance(item, _Stall) or watcher.stalled:
                    deadline = None  # silent, and never ended by timeoutSeconds
                    continue
                await _send_line(send, item)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:  # also when the server cancels this stream: no pending get outlives the loop
            disconnected.cancel()
            for future in pending:
                future.cancel()


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


def _parse_json(body: bytes) -> object:
    try:
        return json.loads(body or b"null")
    except ValueError as exc:
        raise _HttpError(400, "BadRequest", f"the body is not JSON: {exc}") from exc


def _parse_object(body: bytes) -> _Object:
    try:
        obj = json.loads(body or b"{}")
    except ValueError as exc:
        raise _HttpError(400, "BadRequest", f"the body is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise _HttpError(400, "BadRequest", "the body must be a JSON object")
    return obj


async def _read_body(receive: _Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _until_disconnect(receive: _Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send: _Send, status: int, doc: object) -> None:
    body = json.dumps(doc).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_line(send: _Send, doc: object) -> None:
    line = json.dumps(doc).encode() + b"\n"
    await send({"type": "http.response.body", "body": line, "more_body": True})


def main(argv: list[str] | None = None) -> int:
    """``python -m troupe.testing.fake_kubernetes``: serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--dir", default=None, help="directory for the kubeconfig file")
    parser.add_argument("--token", default="fake-token", help="bearer token clients must send")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server = FakeKubernetes(port=args.port, directory=args.dir, token=args.token)
    server.start()
    try:
        print(f"url={server.url} kubeconfig={server.kubeconfig}", flush=True)
        stop.wait()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
