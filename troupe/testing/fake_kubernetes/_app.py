"""The fake API server's ASGI app: what a request does.

- list (``metadata.resourceVersion`` of the collection), get, create, replace;
- delete, honouring ``DeleteOptions.preconditions`` (``uid``, ``resourceVersion``: 409 Conflict
  when they do not match, as on a real server);
- patch (see ``_patch``). A patched object whose ``metadata.resourceVersion`` differs from the
  stored one (a merge patch that names one, a JSON patch that replaces it) is a precondition:
  409 Conflict when stale;
- ``?watch=true&resourceVersion=N``: a JSON-lines stream of ``ADDED``/``MODIFIED``/``DELETED``
  events after ``N`` (all current objects as ``ADDED`` when ``N`` is unset or ``0``), ended by the
  server after ``timeoutSeconds`` when given; a ``resourceVersion`` older than the retained
  history gets the real server's answer, an ``ERROR`` event carrying a ``Status`` with code 410
  (or, with ``gone_as_http_status=True``, an HTTP 410 response, as some proxies and old servers
  give);
- bearer-token authentication (401 with a wrong token).
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any
from urllib.parse import parse_qs

from troupe.testing.fake_kubernetes._patch import _PatchFailed, json_patch, merge_patch
from troupe.testing.fake_kubernetes._resources import (
    _KINDS,
    _discovery_document,
    _group,
    _Kind,
    _missing,
)
from troupe.testing.fake_kubernetes._store import _Drop, _Stall, _Store, _Watcher
from troupe.testing.fake_kubernetes._wire import (
    _HttpError,
    _Object,
    _parse_json,
    _parse_object,
    _read_body,
    _Receive,
    _Request,
    _Scope,
    _Send,
    _send_json,
    _send_line,
    _status,
    _until_disconnect,
)


class _App(_Store):
    """The ASGI app of :class:`FakeKubernetes` (its base class)."""

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
