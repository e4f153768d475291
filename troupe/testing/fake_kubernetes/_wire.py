"""HTTP plumbing of the fake API server's ASGI app: requests, errors, JSON bodies and lines.

An error is an :class:`_HttpError`, answered as a Kubernetes ``Status`` object with its code.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_Object = dict[str, Any]


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
