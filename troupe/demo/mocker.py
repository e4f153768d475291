"""A mock LLM engine: what ``make demo``, the frontend tests and the benchmarks serve.

    troupe worker demo.mocker.generate troupe.demo.mocker:generate --model mock-model

It speaks the frontend's engine protocol (docs/frontend.md): the request is a dict with
``prompt`` (completions) or ``messages`` (chat), ``max_tokens``, ``stop`` and ``ext``; the words
of the prompt (for chat, of one ``role: content`` line per message) are its "tokens". It
waits ``time_to_first_token`` seconds, then streams a deterministic pseudo-text, one word (token)
per chunk, at ``tokens_per_second``, ``output_tokens`` of them (finish reason ``stop``) unless
``max_tokens`` cuts it short (``length``) or a word equals a ``stop`` string (``stop``, the word
not sent). A ``resume`` field (sent by the frontend after a worker failure) skips the tokens the
client already has, and so does ``ctx.received`` (a router migrating the stream: the handler is
:func:`~troupe.transports.resumable`, one chunk per token). It stops within one pause when the
caller goes away.

Per-request settings: ``request["ext"]["mocker"] = {"tokens_per_second": ..., "time_to_first_token":
..., "output_tokens": ...}``; defaults come from :func:`make_generate`.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

from troupe.errors import InvalidRequest
from troupe.transports import RequestContext, resumable

__all__ = ["VOCABULARY", "MockerHandler", "generate", "make_generate"]

VOCABULARY: Final = tuple(
    "troupe streams this answer one word at a time from a mock engine so that "  # noqa: SIM905
    "frontends routers and clients can be tried without a model or a GPU".split()
)
"""The words the mocker generates, cycled."""

MockerHandler = Callable[[Any, RequestContext], AsyncIterator[dict[str, Any]]]


def _prompt_words(request: Any) -> int:
    """The prompt's "tokens": its words (chat: of one ``role: content`` line per message)."""
    if not isinstance(request, dict):
        raise InvalidRequest("expected an engine request (an object)")
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return len(prompt.split())
    messages = request.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise InvalidRequest(
            "expected an engine request with a string prompt or text messages", param="prompt"
        )
    return sum(len(f"{m['role']}: {m['content']}".split()) for m in messages)


def _number(settings: dict[str, Any], name: str, default: float, *, positive: bool) -> float:
    value = settings.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number", param=f"ext.mocker.{name}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise InvalidRequest(
            f"{name} must be a finite number {'> 0' if positive else '>= 0'}",
            param=f"ext.mocker.{name}",
        )
    return float(value)


async def _pause(ctx: RequestContext, seconds: float) -> None:
    """Sleep, but return as soon as the request is stopped."""
    if seconds <= 0:
        await asyncio.sleep(0)
        return
    try:
        async with asyncio.timeout(seconds):
            await ctx.wait_stopped()
    except TimeoutError:
        pass


def make_generate(
    tokens_per_second: float = 100.0,
    time_to_first_token: float = 0.05,
    output_tokens: int = 16,
) -> MockerHandler:
    """A mocker handler with these defaults (each overridable per request).

    Args:
        tokens_per_second: the rate tokens are streamed at after the first.
        time_to_first_token: seconds before the first token.
        output_tokens: tokens generated when ``max_tokens`` does not cut it short.
    """
    if not tokens_per_second > 0:
        raise InvalidRequest("tokens_per_second must be > 0", param="tokens_per_second")
    if time_to_first_token < 0:
        raise InvalidRequest("time_to_first_token must be >= 0", param="time_to_first_token")
    if output_tokens < 1:
        raise InvalidRequest("output_tokens must be >= 1", param="output_tokens")
    fingerprint = f"mocker-{os.getpid()}"

    @resumable
    async def generate(request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        """Stream mock tokens for an engine-protocol request (see the module docstring)."""
        prompt_tokens = _prompt_words(request)
        ext = request.get("ext") or {}
        settings = ext.get("mocker") if isinstance(ext, dict) else None
        settings = settings if isinstance(settings, dict) else {}
        tps = _number(settings, "tokens_per_second", tokens_per_second, positive=True)
        ttft = _number(settings, "time_to_first_token", time_to_first_token, positive=False)
        wanted = int(_number(settings, "output_tokens", output_tokens, positive=True))
        max_tokens = request.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise InvalidRequest("max_tokens must be an integer >= 1", param="max_tokens")
        stops = set(request.get("stop") or ())
        resume = request.get("resume") or {}
        start = resume.get("tokens", 0) if isinstance(resume, dict) else 0
        start = (start if isinstance(start, int) and start > 0 else 0) + ctx.received
        limit = wanted if max_tokens is None else min(wanted, max_tokens)
        finish = "length" if max_tokens is not None and max_tokens < wanted else "stop"

        await _pause(ctx, ttft)
        began = time.monotonic()
        for index in range(start, limit):
            if ctx.is_stopped():
                return
            if index > start:
                await _pause(ctx, began + (index - start) / tps - time.monotonic())
                if ctx.is_stopped():
                    return
            word = VOCABULARY[index % len(VOCABULARY)]
            stopped = word in stops  # a stop string: end here, without the word
            chunk: dict[str, Any] = (
                {"text": "", "tokens": 0, "finish_reason": "stop"}
                if stopped
                else {"text": word if index == 0 else " " + word}
            )
            if index == start:
                chunk["prompt_tokens"] = prompt_tokens
            if index == start or stopped:
                chunk["fingerprint"] = fingerprint  # which process serves it
            if not stopped and index == limit - 1:
                chunk["finish_reason"] = finish
            yield chunk
            if stopped:
                return
        if start >= limit:
            yield {"text": "", "tokens": 0, "finish_reason": finish, "prompt_tokens": prompt_tokens}

    return generate


generate: Final = make_generate()
"""The mocker with its defaults: 100 tokens/s, 50 ms to the first token, 16 tokens."""
