"""The Starlette application: OpenAI routes, health, metrics, and the streaming exchange.

Every handler runs on the frontend's event loop and never blocks it: engine chunks come from
``Router.generate`` (an async iterator bridged from the runtime's I/O loop). A generation is
answered by :class:`_EngineResponse`, a small ASGI response that races the work against the
client's ``http.disconnect``: if the client goes away first (mid-stream, or while waiting for the
first token) the work is cancelled, which closes the router's iterator and sends ``Cancel`` to
the worker. The HTTP status is chosen only once the first engine chunk (or failure) is known, so
a request that fails before streaming gets a proper OpenAI error and status code; a failure after
the stream started is sent as a last ``data: {"error": ...}`` event followed by ``data: [DONE]``.

Instances: each generation leases its (model, endpoint) router from the registry and calls
``router.generate``; the router chooses the worker (its policy, ``router_mode``, seeing the
load of every caller of that router) and does every retry, as :func:`route_options` sets it
up from the settings. A worker answering ``Overloaded`` is skipped for another, up to
``overload_tries`` tries in all, after a short jittered pause once every worker refused (503
when the tries are spent). When a worker fails mid-generation (connect failure, broken stream)
and ``migration_limit`` allows it, the generation continues on a worker it has not tried
(waiting up to ``instance_wait`` for a replacement to register when none is left), with
``"resume"`` telling the engine how many tokens (and which text) the client already has.

Request bodies are read incrementally up to ``max_body_size`` (413 beyond; over HTTP/2 the rest
of the body is read and discarded first, within bounds, since hypercorn fails the whole
connection on data for a stream it already answered). The ``ext`` object (the only request
field whose values are not checked while decoding) is encoded once in the handler so that a
value msgpack cannot carry is a 400, not a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Lifespan, Receive, Scope, Send

from troupe._logging import get_logger
from troupe._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from troupe._payload import encode_payload
from troupe.actors.routing import Retries
from troupe.errors import (
    ActorError,
    Cancelled,
    ConfigError,
    InvalidRequest,
    MessageTooLarge,
    NoInstances,
    Overloaded,
    RemoteError,
    TroupeError,
)
from troupe.frontend._metrics import FrontendMetrics
from troupe.frontend._models import ModelEntry, ModelRegistry, RouteOptions
from troupe.frontend._openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseHead,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    decode_chat,
    decode_completion,
    engine_request,
    error_body,
    new_id,
    usage,
)
from troupe.runtime import Runtime

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

_SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_JSON_HEADERS: Final = [(b"content-type", b"application/json")]
_DONE: Final = b"data: [DONE]\n\n"
_ENCODE: Final = msgspec.json.Encoder().encode

CHAT: Final = "chat_completions"
COMPLETIONS: Final = "completions"

# Over HTTP/2 an oversized body is read and discarded before the 413 (see _read_body), up to
# these bounds; beyond them the 413 is sent anyway and the client's connection may break, as an
# HTTP/1.1 one is closed.
_DRAIN_BYTES: Final = 64 * 1024 * 1024
_DRAIN_SECONDS: Final = 10.0
_HTTP1: Final = frozenset({"1.0", "1.1"})


@dataclass(frozen=True, slots=True)
class FrontendSettings:
    """How the frontend serves.

    Attributes:
        host: address to bind (``0.0.0.0``: every interface).
        port: port to bind; ``0`` lets the OS pick (see ``Frontend.port``).
        router_mode: the routers' policy: ``round_robin``, ``random`` or ``least_loaded``.
        migration_limit: how many times a generation whose worker fails is resumed on another.
        grace: seconds in-flight requests get to finish on shutdown (``/health`` is 503 then).
        instance_wait: seconds a request waits for a just-discovered model's router to see its
            instances before answering 503, and a migration for a replacement worker to
            register when every known one was tried.
        max_body_size: the largest request body accepted, in bytes (a larger one is answered
            413 without being read further over HTTP/1.1; over HTTP/2 it is discarded first);
            ``None``: the runtime's ``request_plane.tcp.max_message_size``
            (``DYN_TCP_MAX_MESSAGE_SIZE``, 32 MiB), since a larger request could not be sent to
            a worker anyway.
        overload_tries: how many tries a generation makes when workers answer ``Overloaded``
            (the first included; ``1``: no retry), each to a worker it has not tried yet while
            there is one.
        overload_pause: seconds before the next round of tries once every worker answered
            ``Overloaded``: doubled at each round, times a random factor in [0.5, 1.5).
        router_idle: seconds a (model, endpoint) router is kept after its last instance left.
    """

    host: str = "0.0.0.0"
    port: int = 8000
    router_mode: str = "round_robin"
    migration_limit: int = 0
    grace: float = 5.0
    instance_wait: float = 2.0
    max_body_size: int | None = None
    overload_tries: int = 3
    overload_pause: float = 0.01
    router_idle: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65_535:
            raise ConfigError("--port", self.port, "a port number 0..65535 (0 = OS-assigned)")
        if self.router_mode not in ("round_robin", "random", "least_loaded"):
            raise ConfigError(
                "--router-mode", self.router_mode, choices=("round_robin", "random", "least_loaded")
            )
        if not isinstance(self.migration_limit, int) or self.migration_limit < 0:
            raise ConfigError("--migration-limit", self.migration_limit, "an integer >= 0")
        if not self.grace >= 0:
            raise ConfigError("--grace", self.grace, "seconds >= 0")
        if not self.instance_wait >= 0:
            raise ConfigError("instance_wait", self.instance_wait, "seconds >= 0")
        if self.max_body_size is not None and (
            not isinstance(self.max_body_size, int) or self.max_body_size < 1
        ):
            raise ConfigError("--max-body-size", self.max_body_size, "a number of bytes >= 1")
        if not isinstance(self.overload_tries, int) or self.overload_tries < 1:
            raise ConfigError("--overload-tries", self.overload_tries, "an integer >= 1")
        if not self.overload_pause >= 0:
            raise ConfigError("overload_pause", self.overload_pause, "seconds >= 0")
        if not self.router_idle > 0:
            raise ConfigError("--router-idle", self.router_idle, "seconds > 0")

    def retries(self) -> Retries:
        """The routers' retries: ``overload_tries`` and ``overload_pause``, and ``instance_wait``
        for a replacement worker."""
        return Retries(
            overload_tries=self.overload_tries,
            overload_pause=self.overload_pause,
            replacement_wait=self.instance_wait,
        )


def route_options(settings: FrontendSettings, metrics: FrontendMetrics) -> RouteOptions:
    """How the frontend's routers retry, migrate and resume, counting into ``metrics``."""
    return RouteOptions(
        migration_limit=settings.migration_limit,
        retries=settings.retries(),
        resume=resume_request,
        observer=lambda model: _Counted(metrics, model),
    )


class _Counted:
    """The observer of one model's router: counts its retries and migrations."""

    __slots__ = ("_migrations", "_retries")

    def __init__(self, metrics: FrontendMetrics, model: str) -> None:
        self._retries = metrics.retries.labels(model)
        self._migrations = metrics.migrations.labels(model)

    def retried(self, endpoint: str) -> None:
        self._retries.inc()

    def migrated(self, endpoint: str) -> None:
        self._migrations.inc()


def resume_request(request: dict[str, Any], received: list[Any]) -> dict[str, Any]:
    """The router's ``resume`` hook: ``request`` with a ``"resume"`` field saying what the
    client already has (``tokens`` generated and their ``text``), counted from the engine
    chunks ``received`` as the response counts them (malformed chunks are skipped: the
    response fails on them anyway)."""
    tokens = 0
    texts: list[str] = []
    for chunk in received:
        if not isinstance(chunk, dict):
            continue
        text = chunk.get("text", "")
        if not isinstance(text, str):
            continue
        count = chunk.get("tokens", 1 if text else 0)
        if isinstance(count, int) and count > 0:
            tokens += count
        if text:
            texts.append(text)
    return request | {"resume": {"tokens": tokens, "text": "".join(texts)}}


class FrontendState:
    """What the handlers share: registry, metrics, settings, and the drain state."""

    def __init__(
        self,
        rt: Runtime,
        registry: ModelRegistry,
        metrics: FrontendMetrics,
        settings: FrontendSettings,
    ) -> None:
        self.rt = rt
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self.max_body_size = (
            settings.max_body_size
            if settings.max_body_size is not None
            else rt.config.request_plane.tcp.max_message_size
        )
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        """A generation starts."""
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        """A generation ended."""
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no generation is in flight; ``False`` on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


# --- errors --------------------------------------------------------------------------------------

# InvalidRequest's text: "invalid request: {detail}" and maybe " (field {param})".
_REMOTE_INVALID: Final = re.compile(
    r"^(?:invalid request: )?(?P<detail>.*?)(?: \(field (?P<param>[^()\s]+)\))?$", re.DOTALL
)
_MAX_REMOTE_DETAIL: Final = 500  # characters of an engine's refusal passed on to the client


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """How a failure to generate is answered: HTTP status and OpenAI error fields.

    ``message`` is safe to show a client: failures of the worker or the request plane get a
    generic text (their detail, which may name internal addresses, is only logged).
    """

    status: int
    kind: str
    code: str
    message: str
    param: str | None = None

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        return error_body(self.message, self.kind, param=self.param, code=self.code)


def error_reply(exc: TroupeError) -> ErrorReply:
    """The answer to a generation that failed with ``exc``."""
    if isinstance(exc, NoInstances):
        return ErrorReply(
            503, "service_unavailable_error", "no_instances", "no worker serves this model now"
        )
    if isinstance(exc, Overloaded):
        return ErrorReply(
            503,
            "service_unavailable_error",
            "overloaded",
            "every worker of this model is at capacity; retry later",
        )
    if isinstance(exc, Cancelled | ActorError):
        return ErrorReply(
            503, "service_unavailable_error", "unavailable", "the frontend cannot route it now"
        )
    if isinstance(exc, InvalidRequest):
        return ErrorReply(400, "invalid_request_error", "invalid_request", exc.detail, exc.param)
    if isinstance(exc, RemoteError) and exc.kind == InvalidRequest.__name__:
        # The engine refused the request: its validation message is meant for the client.
        match = _REMOTE_INVALID.match(exc.remote_message)
        detail = match["detail"] if match else exc.remote_message
        if len(detail) > _MAX_REMOTE_DETAIL:
            detail = detail[:_MAX_REMOTE_DETAIL] + "..."
        param = match["param"] if match else None
        return ErrorReply(
            400, "invalid_request_error", "invalid_request", detail or "invalid request", param
        )
    if isinstance(exc, MessageTooLarge):
        return ErrorReply(
            413,
            "invalid_request_error",
            "request_too_large",
            f"the request is too large for the request plane (limit {exc.limit} bytes)",
        )
    if isinstance(exc, _MalformedChunk):
        return ErrorReply(502, "server_error", "bad_chunk", "the worker sent a malformed response")
    return ErrorReply(502, "server_error", "worker_error", "the worker failed to answer")


def error_status(exc: TroupeError) -> tuple[int, str, str]:
    """``(HTTP status, OpenAI error type, code)`` for a failure to generate."""
    reply = error_reply(exc)
    return reply.status, reply.kind, reply.code


def _error_response(
    status: int, message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param=param, code=code), status_code=status)


class _MalformedChunk(TroupeError):
    """Internal: the engine yielded something that is not an engine chunk (answered 502)."""


# --- one generation ------------------------------------------------------------------------------


class _Exchange:
    """The state of one generation: ids, counters, text, timings."""

    __slots__ = (
        "completion_tokens",
        "endpoint",
        "finish_reason",
        "head",
        "include_usage",
        "kind",
        "last_token_at",
        "model",
        "payload",
        "prompt_tokens",
        "request_type",
        "rid",
        "started",
        "stream",
        "texts",
    )

    def __init__(self, req: ChatCompletionRequest | CompletionRequest) -> None:
        chat = isinstance(req, ChatCompletionRequest)
        self.kind = "chat" if chat else "completion"
        self.endpoint = CHAT if chat else COMPLETIONS
        self.model = req.model
        self.stream = req.stream
        self.request_type = "stream" if req.stream else "unary"
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.payload = engine_request(req)
        self.rid = new_id("chat" if chat else "completion")
        self.head = ResponseHead(self.rid, int(time.time()), req.model)
        self.started = time.perf_counter()
        self.last_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.texts: list[str] = []
        self.finish_reason: str | None = None

    def absorb(self, chunk: Any, metrics: FrontendMetrics) -> str:
        """Account for one engine chunk; return its text."""
        if not isinstance(chunk, dict):
            raise _MalformedChunk(f"engine chunk is not an object: {chunk!r:.80}")
        text = chunk.get("text", "")
        if not isinstance(text, str):
            raise _MalformedChunk(f"engine chunk text is not a string: {text!r:.80}")
        tokens = chunk.get("tokens", 1 if text else 0)
        prompt_tokens = chunk.get("prompt_tokens")
        if isinstance(prompt_tokens, int) and not self.prompt_tokens:
            self.prompt_tokens = prompt_tokens
        finish = chunk.get("finish_reason")
        if isinstance(finish, str):
            self.finish_reason = finish
        fingerprint = chunk.get("fingerprint")
        if isinstance(fingerprint, str) and fingerprint != self.head.fingerprint:
            self.head = ResponseHead(self.rid, self.head.created, self.model, fingerprint)
        if isinstance(tokens, int) and tokens > 0:
            now = time.perf_counter()
            if self.last_token_at is None:
                metrics.ttft.labels(self.model).observe(now - self.started)
            else:
                metrics.itl.labels(self.model).observe(now - self.last_token_at)
            self.last_token_at = now
            self.completion_tokens += tokens
        if text:
            self.texts.append(text)
        return text

    def sse(self, text: str, finish_reason: str | None) -> bytes:
        """One SSE event carrying ``text`` (and/or the finish reason)."""
        if self.kind == "chat":
            body = chat_chunk(self.head, {"content": text} if text else {}, finish_reason)
        else:
            body = completion_chunk(self.head, text, finish_reason)
        return b"data: " + _ENCODE(body) + b"\n\n"

    def first_sse(self) -> bytes:
        """The opening event: a chat stream announces the assistant role."""
        body = chat_chunk(self.head, {"role": "assistant", "content": ""}, None)
        return b"data: " + _ENCODE(body) + b"\n\n"

    def usage_sse(self) -> bytes:
        """The last event when ``stream_options.include_usage``: no choices, the usage."""
        body = (
            chat_chunk(self.head, {}, None)
            if self.kind == "chat"
            else completion_chunk(self.head, "", None)
        )
        body["choices"] = []
        body["usage"] = usage(self.prompt_tokens, self.completion_tokens)
        return b"data: " + _ENCODE(body) + b"\n\n"

    def full(self) -> dict[str, Any]:
        """The non-streaming response body."""
        build = chat_response if self.kind == "chat" else completion_response
        counts = usage(self.prompt_tokens, self.completion_tokens)
        return build(self.head, "".join(self.texts), self.finish_reason or "stop", counts)


async def _generate(
    state: FrontendState, entry: ModelEntry, ex: _Exchange
) -> AsyncGenerator[Any, None]:
    """Engine chunks for ``ex``, from the model's router.

    The router is leased (it is not released while the generation runs); it chooses the
    worker, skips those that answer ``Overloaded`` and continues the generation elsewhere when
    its worker fails, as :func:`route_options` configured it.
    """
    with state.registry.lease(entry) as routing:
        router = routing.router
        if not router.snapshot.instances:
            # The registry saw the model before this router's own watch did: wait a little.
            await router.wait_for_instances(timeout=state.settings.instance_wait)
        chunks = router.generate(ex.payload)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk


class _EngineResponse(Response):
    """Answers one generation; cancels it when the client disconnects first."""

    def __init__(self, state: FrontendState, entry: ModelEntry, ex: _Exchange) -> None:
        # Response.__init__ is not called: this response writes its own messages.
        self.background = None
        self._state = state
        self._entry = entry
        self._ex = ex
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state, ex = self._state, self._ex
        metrics = state.metrics
        state.enter()
        metrics.inflight.labels(ex.model).inc()
        work = asyncio.create_task(self._respond(send), name=f"frontend-{ex.rid}")
        listener = asyncio.create_task(_disconnected(receive), name=f"frontend-{ex.rid}-listen")
        try:
            await asyncio.wait((work, listener), return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                # The client went away first: cancelling the work closes the router's
                # iterator, which sends Cancel to the worker.
                work.cancel()
                await asyncio.wait((work,))
                metrics.cancellations.labels(ex.model, ex.endpoint, ex.request_type).inc()
                metrics.requests.labels(ex.model, ex.endpoint, ex.request_type, "cancelled").inc()
                _log.debug("client disconnected; generation cancelled", id=ex.rid)
            else:
                work.result()  # _respond answers every error itself; this re-raises a bug
        finally:
            for task in (work, listener):
                task.cancel()
            await asyncio.wait((work, listener))
            metrics.inflight.labels(ex.model).dec()
            metrics.duration.labels(ex.model).observe(time.perf_counter() - ex.started)
            state.leave()

    async def _respond(self, send: Send) -> None:
        state, ex = self._state, self._ex
        metrics = state.metrics
        chunks = _generate(state, self._entry, ex)
        try:
            async with contextlib.aclosing(chunks):
                if ex.stream:
                    await self._stream(chunks, send)
                else:
                    async for chunk in chunks:
                        ex.absorb(chunk, metrics)
                    await self._send_json(send, 200, ex.full())
        except TroupeError as exc:
            reply = error_reply(exc)
            log = _log.warning if reply.status >= 500 else _log.info
            log(
                "generation failed",
                id=ex.rid,
                model=ex.model,
                status=reply.status,
                error_type=type(exc).__name__,
                error=str(exc),  # the detail the client is not shown
            )
            await self._fail(send, reply.status, reply.body())
        except Exception as exc:  # noqa: BLE001 - the documented catch-all: JSON 500, no traceback
            _log.error("unexpected error in a generation", id=ex.rid, exc_info=exc)
            await self._fail(
                send, 500, error_body("internal error", "server_error", code="internal_error")
            )
        else:
            metrics.requests.labels(ex.model, ex.endpoint, ex.request_type, "success").inc()
            metrics.input_tokens.labels(ex.model).observe(ex.prompt_tokens)
            metrics.output_tokens.labels(ex.model).observe(ex.completion_tokens)

    async def _fail(self, send: Send, status: int, body: dict[str, Any]) -> None:
        ex = self._ex
        self._state.metrics.error(ex.model, ex.endpoint, ex.request_type, status)
        if self._started:
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + _ENCODE(body) + b"\n\n" + _DONE,
                    "more_body": False,
                }
            )
        else:
            await self._send_json(send, status, body)

    async def _send_json(self, send: Send, status: int, body: dict[str, Any]) -> None:
        self._started = True
        await send({"type": "http.response.start", "status": status, "headers": _JSON_HEADERS})
        await send({"type": "http.response.body", "body": _ENCODE(body), "more_body": False})

    async def _stream(self, chunks: AsyncGenerator[Any, None], send: Send) -> None:
        ex, metrics = self._ex, self._state.metrics
        # Wait for the first chunk before committing to 200: early failures get a real status.
        first: Any = None
        has_first = True
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            has_first = False
        self._started = True
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        head = ex.first_sse() if ex.kind == "chat" else b""
        if has_first:
            text = ex.absorb(first, metrics)
            await _body(send, head + (ex.sse(text, None) if text else b""))
            async for chunk in chunks:
                text = ex.absorb(chunk, metrics)
                if text:
                    await _body(send, ex.sse(text, None))
        elif head:
            await _body(send, head)
        tail = ex.sse("", ex.finish_reason or "stop")
        if ex.include_usage:
            tail += ex.usage_sse()
        await send({"type": "http.response.body", "body": tail + _DONE, "more_body": False})


async def _body(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _disconnected(receive: Receive) -> None:
    """Return when the client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


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
        ex = _Exchange(req)
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
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: unexpected},
        lifespan=lifespan,
    )
