"""A mock LLM engine with a paged KV cache: what ``make demo``, the frontend tests and the
benchmarks serve.

    troupe worker demo.mocker.generate troupe.demo.mocker:generate --model mock-model

It speaks the frontend's engine protocol (docs/frontend.md): the request is a dict with
``token_ids`` (the prompt, tokenized by the frontend) and/or ``prompt`` (completions) or
``messages`` (chat), ``max_tokens``, ``stop`` and ``ext``. A request without ``token_ids`` is
tokenized here with the frontend's built-in tokenizer
(:class:`~troupe.frontend._tokenizer.WordTokenizer`: one token per word of the prompt; for chat,
of one ``role: content`` line per message). It streams a deterministic pseudo-text, one word
(token) per chunk, ``output_tokens`` of them (finish reason ``stop``) unless ``max_tokens`` cuts
it short (``length``) or a word equals a ``stop`` string (``stop``, the word not sent). A
``resume`` field (sent by the frontend after a worker failure) skips the tokens the client
already has, and so does ``ctx.received`` (a router migrating the stream: the handler is
:func:`~troupe.transports.resumable`, one chunk per token). It stops within one pause when the
caller goes away.

Timing model. A :class:`Mocker` is one simulated GPU, shared by the requests it serves:

- **Admission**: a request holds its prompt's blocks in the KV cache
  (:class:`~troupe.demo._kvcache.KvCache`: ``num_gpu_blocks`` blocks of ``block_size`` tokens,
  chained block hashes, prefix reuse, LRU eviction of blocks no running request uses) while it
  runs. At most ``max_num_seqs`` run at once; a request that finds them all taken, or the cache
  full of blocks in use, waits in line (first come, first served).
- **Prefill**: one at a time, in admission order, at ``prefill_tokens_per_second`` over the
  prompt tokens *not* already cached: a cached prefix makes the first token come sooner. The
  first token comes ``time_to_first_token`` after the prefill ends.
- **Decode**: each running request then gets a token every ``1 / tokens_per_second`` seconds
  (decoding is batched: running requests do not slow each other down), but a prefill pauses
  every decoding request: a token whose wait a prefill overlaps comes that much later. So load
  matters: new requests queue behind each other's prefills and stall the running ones.
- Every duration is divided by ``speedup_ratio``.

The cache's changes go to an optional sink (:class:`KvEventSink`: ``stored``, ``removed``,
``cleared``; a ``troupe.kv.KvPublisher`` in a worker) as they happen; :meth:`Mocker.stats` and
:meth:`Mocker.collector` (Prometheus series) report its usage and hit rate.

Settings: :class:`MockerConfig` (``Mocker(MockerConfig(block_size=16, ...))``; the handler is
``mocker.generate``); per request, ``request["ext"]["mocker"] = {"tokens_per_second": ...,
"time_to_first_token": ..., "output_tokens": ...}``. The module-level :func:`generate` serves one
mocker with the defaults, shared by every runtime of the process that serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any, Final

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from troupe._handlers import handler_factory
from troupe.demo._engine import KvEventSink, MockEngine, MockerConfig, MockerStats, Ticket
from troupe.errors import InvalidRequest
from troupe.frontend._tokenizer import Tokenizer, WordTokenizer, prompt_text
from troupe.transports import RequestContext, resumable

__all__ = [
    "VOCABULARY",
    "KvEventSink",
    "Mocker",
    "MockerConfig",
    "MockerHandler",
    "MockerStats",
    "generate",
    "make_generate",
]

# Documented here, defined beside the engine: reprs and tracebacks name the public module.
KvEventSink.__module__ = MockerConfig.__module__ = MockerStats.__module__ = __name__

VOCABULARY: Final = tuple(
    "troupe streams this answer one word at a time from a mock engine so that "  # noqa: SIM905
    "frontends routers and clients can be tried without a model or a GPU".split()
)
"""The words the mocker generates, cycled."""

MockerHandler = Callable[[Any, RequestContext], AsyncIterator[dict[str, Any]]]

_MAX_TOKEN_ID: Final = 2**32 - 1  # block hashes read token ids as unsigned 32-bit integers


def _token_ids(request: Any, tokenizer: Tokenizer) -> list[int]:
    """The prompt's token ids: the request's ``token_ids``, else its prompt tokenized."""
    if not isinstance(request, dict):
        raise InvalidRequest("expected an engine request (an object)")
    ids = request.get("token_ids")
    if ids is None:
        return tokenizer.encode(prompt_text(request))
    if (
        not isinstance(ids, list)
        or not all(type(token) is int for token in ids)
        or (ids and (min(ids) < 0 or max(ids) > _MAX_TOKEN_ID))
    ):
        raise InvalidRequest(
            "token_ids must be a list of integers 0..4294967295", param="token_ids"
        )
    return ids


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


class Mocker:
    """One simulated GPU serving mock generations: serve :meth:`generate` once per worker.

    Args:
        config: sizes, speeds and defaults (see :class:`MockerConfig`).
        sink: told what the KV cache stores and evicts (e.g. ``rt.kv_events(endpoint,
            block_size=config.block_size)``); ``None``: no events.
        tokenizer: tokenizes requests that carry no ``token_ids``; the frontend's built-in
            tokenizer by default, so a request has the same ids whoever tokenized it.
        clock: monotonic seconds the engine computes its times with (the handler sleeps until
            it says they are due).
    """

    def __init__(
        self,
        config: MockerConfig | None = None,
        *,
        sink: KvEventSink | None = None,
        tokenizer: Tokenizer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else MockerConfig()
        self.engine = MockEngine(self.config, sink=sink, clock=clock)
        self.tokenizer: Tokenizer = tokenizer if tokenizer is not None else WordTokenizer()
        self._fingerprint = f"mocker-{os.getpid()}"

    def stats(self) -> MockerStats:
        """The engine now: requests running and waiting, KV cache usage and hit rate."""
        return self.engine.stats()

    def collector(self) -> Collector:
        """Prometheus series of :meth:`stats`, for ``rt.metrics.registry.register(...)``."""
        return _MockerCollector(self.engine)

    def clear_cache(self) -> None:
        """Evict every KV block no running request uses (the sink hears of it)."""
        self.engine.clear_cache()

    @resumable
    async def generate(
        self, request: Any, ctx: RequestContext
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Stream mock tokens for an engine-protocol request (see :mod:`troupe.demo.mocker`)."""
        config, engine = self.config, self.engine
        token_ids = _token_ids(request, self.tokenizer)
        ext = request.get("ext") or {}
        settings = ext.get("mocker") if isinstance(ext, dict) else None
        settings = settings if isinstance(settings, dict) else {}
        tps = _number(settings, "tokens_per_second", config.tokens_per_second, positive=True)
        ttft = _number(settings, "time_to_first_token", config.time_to_first_token, positive=False)
        wanted = int(_number(settings, "output_tokens", config.output_tokens, positive=True))
        max_tokens = request.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise InvalidRequest("max_tokens must be an integer >= 1", param="max_tokens")
        if not engine.cache.fits(len(token_ids)):
            raise InvalidRequest(
                f"the prompt has {len(token_ids)} tokens; this engine's KV cache holds "
                f"{config.num_gpu_blocks * config.block_size}",
                param="prompt",
            )
        stops = set(request.get("stop") or ())
        resume = request.get("resume") or {}
        start = resume.get("tokens", 0) if isinstance(resume, dict) else 0
        start = (start if isinstance(start, int) and start > 0 else 0) + ctx.received
        limit = wanted if max_tokens is None else min(wanted, max_tokens)
        finish = "length" if max_tokens is not None and max_tokens < wanted else "stop"
        prompt_tokens = len(token_ids)
        if start >= limit:
            yield {"text": "", "tokens": 0, "finish_reason": finish, "prompt_tokens": prompt_tokens}
            return

        ticket = await engine.admit(token_ids, ctx)
        if ticket is None:
            return  # stopped while waiting for admission
        try:
            due = engine.first_token_at(ticket, ttft)
            await _pause(ctx, due - engine.clock())
            for index in range(start, limit):
                if ctx.is_stopped():
                    return
                if index > start:
                    due = await self._next_token(ctx, ticket, due, tps)
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
                    chunk["fingerprint"] = self._fingerprint  # which process serves it
                if not stopped and index == limit - 1:
                    chunk["finish_reason"] = finish
                yield chunk
                if stopped:
                    return
        finally:
            engine.release(ticket)

    async def _next_token(
        self, ctx: RequestContext, ticket: Ticket, last: float, tokens_per_second: float
    ) -> float:
        """Wait until the token after ``last`` is due (prefills admitted meanwhile delay it)."""
        engine = self.engine
        while True:
            due = engine.next_token_at(last, tokens_per_second)
            wait = due - engine.clock()
            if wait <= 0 or ctx.is_stopped():
                break
            await _pause(ctx, wait)
        engine.advance(ticket, due)
        return due


class _MockerCollector(Collector):
    """The engine's stats as Prometheus series, computed at scrape time."""

    def __init__(self, engine: MockEngine) -> None:
        self._engine = engine

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        s = self._engine.stats()
        gauges = (
            ("kv_cache_usage", "Fraction of KV-cache blocks used by running requests", s.usage),
            ("kv_cache_hit_rate", "Fraction of prompt tokens found in the KV cache", s.hit_rate),
            ("kv_total_blocks", "KV-cache capacity in blocks", s.total_blocks),
            ("kv_active_blocks", "KV-cache blocks used by running requests", s.active_blocks),
            ("kv_cached_blocks", "KV-cache blocks held with a hash", s.cached_blocks),
            ("running_requests", "Requests admitted and not finished", s.running),
            ("waiting_requests", "Requests waiting for admission", s.waiting),
        )
        for name, help, value in gauges:
            yield GaugeMetricFamily(f"troupe_mocker_{name}", help, value=value)
        yield CounterMetricFamily(
            "troupe_mocker_prompt_tokens", "Prompt tokens admitted", value=s.prompt_tokens
        )
        yield CounterMetricFamily(
            "troupe_mocker_cached_prompt_tokens",
            "Prompt tokens found in the KV cache",
            value=s.cached_prompt_tokens,
        )


def make_generate(
    tokens_per_second: float = 100.0,
    time_to_first_token: float = 0.05,
    output_tokens: int = 16,
) -> MockerHandler:
    """The handler of a new :class:`Mocker` with these defaults (each overridable per request)
    and the other settings of :class:`MockerConfig` at theirs.

    Args:
        tokens_per_second: the rate tokens are streamed at after the first.
        time_to_first_token: seconds from the prefill's end to the first token.
        output_tokens: tokens generated when ``max_tokens`` does not cut it short.

    Raises:
        ConfigError: a setting out of range.
    """
    config = MockerConfig(
        tokens_per_second=tokens_per_second,
        time_to_first_token=time_to_first_token,
        output_tokens=output_tokens,
    )
    return Mocker(config).generate


_DEFAULT: Final = Mocker()


@resumable
async def generate(request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
    """The mocker with its defaults, one engine for the process (:class:`MockerConfig`: 100
    tokens/s, 50 ms to the first token after the prefill, 16 tokens).

    A module-level function, so that worker processes can import it by name.
    """
    async with contextlib.aclosing(_DEFAULT.generate(request, ctx)) as chunks:
        async for chunk in chunks:
            yield chunk


@handler_factory
def kv_worker(rt: Any, endpoint: Any) -> tuple[Any, dict[str, Any]]:
    """A worker's own mocker (defaults of :class:`MockerConfig`) publishing its KV events on the
    runtime's event plane, for KV-aware routing: ``troupe worker ENDPOINT
    troupe.demo.mocker:kv_worker`` (or ``rt.spawn_workers``). Its record announces the block size
    and capacity; its cache series join the worker's ``/metrics``.
    """
    mocker, metadata = kv_mocker(rt, endpoint, MockerConfig())
    return mocker.generate, metadata


def kv_mocker(
    rt: Any, endpoint: Any, config: MockerConfig, *, events: bool = True
) -> tuple[Mocker, dict[str, Any]]:
    """A worker's mocker for ``endpoint``: publishing its KV events on ``rt``'s event plane
    (unless ``events`` is false), its cache series on ``rt``'s ``/metrics``; with the record
    metadata that announces its block size and capacity (``kv_block_size``,
    ``kv_total_blocks``)."""
    sink = rt.kv_events(endpoint, block_size=config.block_size) if events else None
    mocker = Mocker(config, sink=sink)
    rt.metrics.registry.register(mocker.collector())
    metadata = {"kv_block_size": config.block_size, "kv_total_blocks": config.num_gpu_blocks}
    return mocker, metadata
