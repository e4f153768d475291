"""One generation: its state (:class:`_Exchange`), its SSE events, and the response that sends it.

Every handler runs on the frontend's event loop and never blocks it: engine chunks come from
``Router.generate`` (an async iterator bridged from the runtime's I/O loop). A generation is
answered by :class:`_EngineResponse`, a small ASGI response that races the work against the
client's ``http.disconnect``: if the client goes away first (mid-stream, or while waiting for the
first token) the work is cancelled, which closes the router's iterator and sends ``Cancel`` to
the worker. The HTTP status is chosen only once the first engine chunk (or failure) is known, so
a request that fails before streaming gets a proper OpenAI error and status code; a failure after
the stream started is sent as a last ``data: {"error": ...}`` event followed by ``data: [DONE]``.
The chunks come through the model's leased router (:func:`_generate`), which chooses the worker
and retries and migrates as :func:`~troupe.frontend._state.route_options` configured it. The
request sent carries the prompt's ``token_ids``, tokenized here with the frontend's tokenizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Any, Final

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from troupe._support._logging import get_logger
from troupe.errors import TroupeError
from troupe.frontend._errors import _MalformedChunk, error_reply
from troupe.frontend._metrics import FrontendMetrics
from troupe.frontend._models import ModelEntry
from troupe.frontend._openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseHead,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    engine_request,
    error_body,
    new_id,
    usage,
)
from troupe.frontend._state import FrontendState
from troupe.frontend._tokenizer import Tokenizer, prompt_text

__all__ = ["CHAT", "COMPLETIONS"]

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

    def __init__(
        self, req: ChatCompletionRequest | CompletionRequest, tokenizer: Tokenizer
    ) -> None:
        chat = isinstance(req, ChatCompletionRequest)
        self.kind = "chat" if chat else "completion"
        self.endpoint = CHAT if chat else COMPLETIONS
        self.model = req.model
        self.stream = req.stream
        self.request_type = "stream" if req.stream else "unary"
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.payload = engine_request(req)
        self.payload["token_ids"] = tokenizer.encode(prompt_text(self.payload))
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
            await self._fail(send, reply.status, reply.body(), retry_after=reply.retry_after)
        except Exception as exc:  # noqa: BLE001 - the documented catch-all: JSON 500, no traceback
            _log.error("unexpected error in a generation", id=ex.rid, exc_info=exc)
            await self._fail(
                send, 500, error_body("internal error", "server_error", code="internal_error")
            )
        else:
            metrics.requests.labels(ex.model, ex.endpoint, ex.request_type, "success").inc()
            metrics.input_tokens.labels(ex.model).observe(ex.prompt_tokens)
            metrics.output_tokens.labels(ex.model).observe(ex.completion_tokens)

    async def _fail(
        self, send: Send, status: int, body: dict[str, Any], *, retry_after: int | None = None
    ) -> None:
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
            await self._send_json(send, status, body, retry_after=retry_after)

    async def _send_json(
        self, send: Send, status: int, body: dict[str, Any], *, retry_after: int | None = None
    ) -> None:
        self._started = True
        headers = _JSON_HEADERS
        if retry_after is not None:
            headers = [*headers, (b"retry-after", str(retry_after).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
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
