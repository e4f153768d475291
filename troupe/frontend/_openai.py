"""The OpenAI wire shapes: request structs, their validation, and response/error bodies.

Requests are decoded with msgspec straight into typed structs; a type error becomes an
:class:`~troupe.errors.InvalidRequest` whose ``param`` names the offending field the way OpenAI
does (``messages[0].content``). Unknown fields are ignored, as the OpenAI API does for fields it
does not use. JSON nested too deeply to decode is an ``InvalidRequest`` too, and ``ext`` (the one
free-form field) may nest at most :data:`MAX_EXT_DEPTH` deep. Responses are plain dicts encoded
with msgspec (no intermediate objects on the streaming hot path).

The engine protocol (frontend → worker) is built here too: :func:`engine_request`. See
``docs/frontend.md``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from troupe.errors import InvalidRequest

__all__ = [
    "MAX_EXT_DEPTH",
    "MAX_TOKENS_LIMIT",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "ResponseHead",
    "StreamOptions",
    "chat_chunk",
    "chat_max_tokens",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "decode_chat",
    "decode_completion",
    "engine_request",
    "error_body",
    "new_id",
    "render_chat",
    "usage",
]

RequestKind = Literal["chat", "completion"]

_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_MAX_TEMPERATURE: Final = 2.0
_DEFAULT_COMPLETION_MAX_TOKENS: Final = 16  # OpenAI's default for /v1/completions
MAX_TOKENS_LIMIT: Final = 2**31 - 1
"""The largest ``max_tokens`` accepted (every integer sent to the engine must fit msgpack)."""
_SEED_RANGE: Final = range(-(2**63), 2**63)
MAX_EXT_DEPTH: Final = 32
"""How deeply ``ext`` may nest objects and arrays (``{"a": {"b": 1}}`` is 2 deep)."""
# msgspec: "Expected `str`, got `int` - at `$.messages[0].content`"
_AT_PATH: Final = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
# msgspec: "Object missing required field `messages`" (possibly followed by " - at `$...`")
_MISSING: Final = re.compile(r"missing required field `(?P<field>[^`]+)`")


class ContentPart(msgspec.Struct):
    """One part of a multi-part chat message (only ``text`` parts carry text)."""

    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    """One chat message."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    """``stream_options``: ``include_usage`` adds a last chunk carrying ``usage``."""

    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    """Fields shared by both endpoints."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ext: dict[str, Any] | None = None
    """troupe extension: passed verbatim to the engine (e.g. ``{"mocker": {...}}``)."""


class ChatCompletionRequest(_Common, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionRequest(_Common, kw_only=True):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    echo: bool = False


def _param_of(message: str) -> str | None:
    missing = _MISSING.search(message)
    at = _AT_PATH.search(message)
    path = at.group("path") if at else ""
    if missing:
        field = missing.group("field")
        return f"{path}.{field}" if path else field
    return path or None


def _decode(body: bytes, kind: type[msgspec.Struct]) -> Any:
    if not body.strip():
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        param = _param_of(text)
        if param is None and text.startswith("Expected `object`"):
            raise InvalidRequest("the request body must be a JSON object") from exc
        raise InvalidRequest(_AT_PATH.sub("", text), param=param) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        # msgspec decodes (and skips unknown fields) recursively and stops at the
        # interpreter's recursion limit: hostile `[[[[...]]]]`, not a malfunction.
        raise InvalidRequest(
            "the request body nests JSON arrays or objects too deeply to decode"
        ) from exc


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` (decoded JSON) nests objects and arrays more than ``limit`` deep."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def _check_common(req: _Common, max_tokens: int | None, max_tokens_field: str) -> None:
    if not req.model:
        raise InvalidRequest("model must be a non-empty string", param="model")
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidRequest(
            f"{max_tokens_field} must be between 1 and {MAX_TOKENS_LIMIT}", param=max_tokens_field
        )
    if req.seed is not None and req.seed not in _SEED_RANGE:
        raise InvalidRequest("seed must be a 64-bit signed integer", param="seed")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest(
            "stream_options is only allowed when stream is true", param="stream_options"
        )
    if req.n is not None and req.n != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    if req.temperature is not None and not 0.0 <= req.temperature <= _MAX_TEMPERATURE:
        raise InvalidRequest("temperature must be between 0 and 2", param="temperature")
    if req.top_p is not None and not 0.0 <= req.top_p <= 1.0:
        raise InvalidRequest("top_p must be between 0 and 1", param="top_p")
    if req.ext is not None and _nests_deeper(req.ext, MAX_EXT_DEPTH):
        # The one free-form field: bounded so that every hop after this one (msgpack to the
        # worker, the engine's own decoding) stays far from any recursion limit.
        raise InvalidRequest(
            f"ext nests objects or arrays more than {MAX_EXT_DEPTH} levels deep", param="ext"
        )


def decode_chat(body: bytes) -> ChatCompletionRequest:
    """Decode and validate a chat completion request.

    Raises:
        InvalidRequest: malformed JSON, a wrong type, a missing field or a bad value; ``param``
            names the field.
    """
    req: ChatCompletionRequest = _decode(body, ChatCompletionRequest)
    if not req.messages:
        raise InvalidRequest("messages must contain at least one message", param="messages")
    for index, message in enumerate(req.messages):
        if message.role not in _ROLES:
            raise InvalidRequest(
                f"unknown role {message.role!r}; expected one of {', '.join(sorted(_ROLES))}",
                param=f"messages[{index}].role",
            )
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise InvalidRequest(
            "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens"
        )
    field = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
    _check_common(req, chat_max_tokens(req), field)
    return req


def decode_completion(body: bytes) -> CompletionRequest:
    """Decode and validate a (legacy) completion request.

    Raises:
        InvalidRequest: as :func:`decode_chat`; a list of more than one prompt is refused
            (batches are not supported).
    """
    req: CompletionRequest = _decode(body, CompletionRequest)
    if isinstance(req.prompt, list) and len(req.prompt) != 1:
        raise InvalidRequest("exactly one prompt is supported", param="prompt")
    _check_common(req, req.max_tokens, "max_tokens")
    return req


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    """``max_completion_tokens`` (the newer name) or ``max_tokens``."""
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def _text_of(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text or "" for part in content if part.type == "text")


def render_chat(messages: list[ChatMessage]) -> str:
    """The messages as one prompt string: a ``role: content`` line each."""
    return "\n".join(f"{m.role}: {_text_of(m.content)}" for m in messages)


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def engine_request(req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """The msgpack-able request sent to the worker (the engine protocol).

    A chat request carries ``messages`` (the engine applies its own chat template; see
    :func:`render_chat` for the plain rendering) and no ``prompt``; a completion request
    carries ``prompt`` and no ``messages``: the text travels once.
    """
    if isinstance(req, ChatCompletionRequest):
        return {
            "kind": "chat",
            "model": req.model,
            "messages": [{"role": m.role, "content": _text_of(m.content)} for m in req.messages],
            "max_tokens": chat_max_tokens(req),
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stop": _stops(req.stop),
            "seed": req.seed,
            "ext": req.ext or {},
        }
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    return {
        "kind": "completion",
        "model": req.model,
        "prompt": prompt,
        "max_tokens": req.max_tokens
        if req.max_tokens is not None
        else (_DEFAULT_COMPLETION_MAX_TOKENS),
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": _stops(req.stop),
        "seed": req.seed,
        "ext": req.ext or {},
    }


# --- responses ---------------------------------------------------------------------------------


def new_id(kind: RequestKind) -> str:
    """A fresh response id: ``chatcmpl-…`` or ``cmpl-…``."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The fields every response object and chunk of one generation repeats."""

    id: str
    created: int
    model: str
    fingerprint: str | None = None

    def fields(self, kind: str) -> dict[str, Any]:
        """``id``, ``object``, ``created``, ``model``, ``system_fingerprint``."""
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }


def chat_response(
    head: ResponseHead, text: str, finish_reason: str, counts: dict[str, int]
) -> dict[str, Any]:
    """A non-streaming ``chat.completion``; ``counts`` is a :func:`usage` object."""
    body = head.fields("chat.completion")
    body["choices"] = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
            "logprobs": None,
        }
    ]
    body["usage"] = counts
    return body


def chat_chunk(
    head: ResponseHead, delta: dict[str, Any], finish_reason: str | None
) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk`` with one choice."""
    body = head.fields("chat.completion.chunk")
    body["choices"] = [
        {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    ]
    return body


def completion_response(
    head: ResponseHead, text: str, finish_reason: str, counts: dict[str, int]
) -> dict[str, Any]:
    """A non-streaming ``text_completion``; ``counts`` is a :func:`usage` object."""
    body = head.fields("text_completion")
    body["choices"] = [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]
    body["usage"] = counts
    return body


def completion_chunk(head: ResponseHead, text: str, finish_reason: str | None) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk."""
    body = head.fields("text_completion")
    body["choices"] = [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]
    return body


def error_body(
    message: str, kind: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
