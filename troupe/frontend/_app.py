"""The Starlette application: OpenAI routes, health and metrics, and the error mapping of HTTP.

A generation's route decodes and checks the request, then hands it to
:class:`~troupe.frontend._exchange._EngineResponse` (one generation, streamed or not, see
:mod:`troupe.frontend._exchange`); the settings and shared state live in
:mod:`troupe.frontend._state`, the answers to failures in :mod:`troupe.frontend._errors` (their
names are re-exported here).

Request bodies are read incrementally up to ``max_body_size`` (413 beyond; over HTTP/2 the rest
of the body is read and discarded first, within bounds, since hypercorn fails the whole
connection on data for a stream it already answered). The ``ext`` object (the only request
field whose values are not checked while decoding) is encoded once in the handler so that a
value msgpack cannot carry is a 400, not a 500.

With an API key set (:attr:`FrontendSettings.api_key`), :class:`_ApiKeyGate` answers 401 to every
request but ``/health`` and ``/live`` that lacks ``Authorization: Bearer <key>``, before any route
runs (the key compared in constant time).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Lifespan, Receive, Scope, Send

from troupe._support._logging import get_logger
from troupe._support._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from troupe.errors import InvalidRequest
from troupe.frontend._errors import ErrorReply, _error_response, error_reply, error_status
from troupe.frontend._exchange import CHAT, COMPLETIONS, _EngineResponse, _Exchange
from troupe.frontend._models import ModelEntry
from troupe.frontend._openai import (
    ChatCompletionRequest,
    CompletionRequest,
    decode_chat,
    decode_completion,
)
from troupe.frontend._state import FrontendSettings, FrontendState, resume_request, route_options
from troupe.messages._payload import encode_payload

__all__ = [
    "ErrorReply",
    "FrontendSettings",
    "FrontendState",
    "build_app",
    "error_reply",
    "error_status",
    "resume_request",
    "route_options",
]

_log = get_logger("troupe.frontend")

# Over HTTP/2 an oversized body is read and discarded before the 413 (see _read_body), up to
# these bounds; beyond them the 413 is sent anyway and the client's connection may break, as an
# HTTP/1.1 one is closed.
_DRAIN_BYTES: Final = 64 * 1024 * 1024
_DRAIN_SECONDS: Final = 10.0
_HTTP1: Final = frozenset({"1.0", "1.1"})
# Routes open without the API key: probes of load balancers and orchestrators.
_OPEN_PATHS: Final = frozenset({"/health", "/live"})


# --- routes --------------------------------------------------------------------------------------


def _generation(
    state: FrontendState, decode: Callable[[bytes], ChatCompletionRequest | CompletionRequest]
) -> Callable[[Request], Awaitable[Response]]:
    endpoint = CHAT if decode is decode_chat else COMPLETIONS

    async def handle(request: Request) -> Response:
        metrics = state.metrics
        body = await _read_body(request, state.max_body_size)
        if body is None:
            metrics.error("", endpoint, "unknown", 413)
            response = _error_response(
                413,
                f"the request body exceeds the limit of {state.max_body_size} bytes",
                "invalid_request_error",
                code="request_too_large",
            )
            if request.scope.get("http_version") in _HTTP1:
                response.headers["connection"] = "close"  # the rest of the body is not read
            return response
        try:
            req = decode(body)
        except InvalidRequest as exc:
            metrics.error("", endpoint, "unknown", 400)
            return _error_response(400, exc.detail, "invalid_request_error", param=exc.param)
        request_type = "stream" if req.stream else "unary"
        entry = state.registry.get(req.model)
        if state.draining:
            # Label with a served model only: client-chosen names would be unbounded labels.
            metrics.error("" if entry is None else entry.name, endpoint, request_type, 503)
            return _error_response(
                503,
                "the frontend is shutting down",
                "service_unavailable_error",
                code="shutting_down",
            )
        if entry is None:
            metrics.error("", endpoint, request_type, 404)
            return _error_response(
                404,
                f"The model `{req.model}` does not exist.",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )
        ex = _Exchange(req, state.tokenizer)
        try:
            # The one field whose values decoding does not check (e.g. integers over 64 bits).
            # The router encodes the whole request again: it takes objects, not bytes.
            encode_payload(ex.payload["ext"])
        except TypeError:
            metrics.error(entry.name, endpoint, request_type, 400)
            return _error_response(
                400,
                "ext holds a value the engine cannot receive (integers must fit in 64 bits)",
                "invalid_request_error",
                param="ext",
            )
        return _EngineResponse(state, entry, ex)

    return handle


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or ``None`` as soon as it is known to exceed ``limit`` bytes.

    Over HTTP/1.x the rest of an oversized body is left unread (the 413 closes the connection).
    Over HTTP/2 it is read and discarded first (up to ``_DRAIN_BYTES`` and ``_DRAIN_SECONDS``):
    hypercorn fails the whole connection, every stream on it, when DATA frames arrive for a
    stream it has already answered.
    """
    multiplexed = request.scope.get("http_version") not in _HTTP1
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    if too_large and (not multiplexed or int(declared) > _DRAIN_BYTES):
        return None  # nothing gained by reading: it cannot end well
    chunks = request.stream()
    if not too_large:
        parts: list[bytes] = []
        size = 0
        async for part in chunks:
            size += len(part)
            if size > limit:
                break
            parts.append(part)
        else:
            return b"".join(parts)
        if not multiplexed:
            return None
    await _discard(chunks)
    return None


async def _discard(chunks: AsyncIterator[bytes]) -> None:
    """Read and drop the rest of a request body, within the drain bounds."""
    size = 0
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for part in chunks:
                size += len(part)
                if size > _DRAIN_BYTES:
                    break
    except TimeoutError:
        pass  # the 413 goes out anyway; the client may lose its connection
    except ClientDisconnect:
        pass  # the client reset the stream: the 413 goes nowhere, harmlessly
    if size > _DRAIN_BYTES:
        _log.info("oversized HTTP/2 body not drained", drained=size)


class _ApiKeyGate:
    """ASGI middleware: 401 (OpenAI's ``invalid_api_key``) for a request without the key.

    ``/health`` and ``/live`` stay open. A refused request's body is not read over HTTP/1.x (the
    connection is closed after the 401) and read and dropped over HTTP/2, as for a 413.
    """

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        presented = _bearer(scope)
        if presented is not None and hmac.compare_digest(presented, self._key):
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send it as the header Authorization: Bearer <key>"
            if presented is None
            else "incorrect API key provided"
        )
        response = _error_response(401, message, "invalid_request_error", code="invalid_api_key")
        response.headers["www-authenticate"] = "Bearer"
        request = Request(scope, receive)
        if scope.get("http_version") in _HTTP1:
            if "content-length" in request.headers or "transfer-encoding" in request.headers:
                response.headers["connection"] = "close"  # the body is not read
        else:
            await _discard(request.stream())
        await response(scope, receive, send)


def _bearer(scope: Scope) -> bytes | None:
    """The token of the request's ``Authorization: Bearer`` header, or None."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None


def _model_json(entry: ModelEntry) -> dict[str, Any]:
    return {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "troupe"}


def build_app(state: FrontendState, *, lifespan: Lifespan[Any] | None = None) -> Starlette:
    """The ASGI app of the frontend."""

    async def models(request: Request) -> Response:
        table = state.registry.table
        data = [_model_json(entry) for entry in table.models.values()]
        return JSONResponse({"object": "list", "data": data})

    async def model(request: Request) -> Response:
        name = request.path_params["model"]
        entry = state.registry.get(name)
        if entry is None:
            return _error_response(
                404,
                f"The model `{name}` does not exist.",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )
        return JSONResponse(_model_json(entry))

    async def health(request: Request) -> Response:
        names = list(state.registry.table.models)
        if state.draining:
            return JSONResponse({"status": "draining", "models": names}, status_code=503)
        return JSONResponse({"status": "healthy", "models": names})

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "live"})

    async def metrics(request: Request) -> Response:
        return Response(state.rt.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(exc.status_code, str(exc.detail), kind)

    async def unexpected(request: Request, exc: Exception) -> Response:
        _log.error("unexpected error", path=request.url.path, exc_info=exc)
        return _error_response(500, "internal error", "server_error", code="internal_error")

    routes = [
        Route("/v1/chat/completions", _generation(state, decode_chat), methods=["POST"]),
        Route("/v1/completions", _generation(state, decode_completion), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/live", live, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    key = state.settings.api_key
    return Starlette(
        routes=routes,
        middleware=[] if key is None else [Middleware(_ApiKeyGate, key=key)],
        exception_handlers={HTTPException: http_error, Exception: unexpected},
        lifespan=lifespan,
    )
