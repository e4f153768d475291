"""The mock engine's scheduler: admission, the prefill lane, decode timing and KV events.

:class:`MockEngine` is the simulated GPU behind :class:`troupe.demo.mocker.Mocker`: it owns the
:class:`~troupe.demo._kvcache.KvCache`, decides when each request's tokens are due, and tells
its sink what the cache stored and evicted. It computes times from its clock and never sleeps;
the handler sleeps until the times it is given. The timing model is described in
:mod:`troupe.demo.mocker`. Thread-safe: one lock guards its state, so runtimes on several event
loops may share one engine; a request waiting for admission is woken on its own loop.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol

from troupe.demo._kvcache import Admission, KvCache
from troupe.errors import ConfigError
from troupe.transports import RequestContext

__all__ = ["KvEventSink", "MockEngine", "MockerConfig", "MockerStats", "Ticket"]


class KvEventSink(Protocol):
    """Where the engine reports its KV cache's changes (``troupe.kv.KvPublisher`` is one).

    Called with the engine's lock held, in the order the cache changed: must not block.
    """

    def stored(self, block_hashes: list[int], parent_hash: int | None) -> object:
        """The cache now holds ``block_hashes`` (chained sequence hashes, in prompt order),
        which follow the block ``parent_hash`` (``None``: they start the prompt)."""
        ...

    def removed(self, block_hashes: list[int]) -> None:
        """The cache no longer holds ``block_hashes``."""
        ...

    def cleared(self) -> None:
        """The cache holds nothing."""
        ...


@dataclass(frozen=True, slots=True)
class MockerConfig:
    """How the mock engine behaves (names follow NVIDIA Dynamo's mocker where it has them).

    Attributes:
        tokens_per_second: decode speed: the rate of each request's tokens after the first.
        time_to_first_token: seconds added to the prefill before the first token (scheduling,
            the first decode step).
        output_tokens: tokens generated when ``max_tokens`` does not cut it short.
        prefill_tokens_per_second: prefill speed, over the prompt tokens not already cached.
        block_size: tokens per KV-cache block (``--block-size``).
        num_gpu_blocks: the KV cache's capacity in blocks (``--num-gpu-blocks``).
        max_num_seqs: requests running at once; more wait (``--max-num-seqs``).
        speedup_ratio: every simulated duration is divided by it (``--speedup-ratio``).
    """

    tokens_per_second: float = 100.0
    time_to_first_token: float = 0.05
    output_tokens: int = 16
    prefill_tokens_per_second: float = 10_000.0
    block_size: int = 16
    num_gpu_blocks: int = 16_384
    max_num_seqs: int = 256
    speedup_ratio: float = 1.0

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if spec.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(spec.name, value, "an integer >= 1")
                continue
            zero_ok = spec.name == "time_to_first_token"
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
                or (value == 0 and not zero_ok)
            ):
                raise ConfigError(
                    spec.name, value, f"a finite number {'>= 0' if zero_ok else '> 0'}"
                )


@dataclass(frozen=True, slots=True)
class MockerStats:
    """A snapshot of the engine (what its metrics export).

    Attributes:
        running: requests admitted and not finished.
        waiting: requests queued for admission (``max_num_seqs`` reached, or the cache full of
            blocks that running requests use).
        total_blocks: the cache's capacity in blocks.
        active_blocks: blocks used by running requests.
        cached_blocks: blocks the cache holds with a hash (published), used or evictable.
        usage: ``active_blocks / total_blocks``.
        prompt_tokens: prompt tokens admitted so far.
        cached_prompt_tokens: those found in the cache (prefix hits).
        hit_rate: ``cached_prompt_tokens / prompt_tokens`` (0 before any request).
        requests: requests admitted so far.
    """

    running: int
    waiting: int
    total_blocks: int
    active_blocks: int
    cached_blocks: int
    usage: float
    prompt_tokens: int
    cached_prompt_tokens: int
    hit_rate: float
    requests: int


class Ticket:
    """One admitted request: its cache admission and when its prefill runs.

    Attributes:
        id: the engine's id for it.
        admission: what the cache found and changed for its prompt.
        prefill_start: when its prefill starts (engine clock).
        prefill_end: when its prefill ends (engine clock).
        last: its last token's due time (the engine keeps prefills since the oldest).
    """

    __slots__ = ("admission", "id", "last", "prefill_end", "prefill_start")

    def __init__(self, id: int, admission: Admission, start: float, end: float) -> None:
        self.id = id
        self.admission = admission
        self.prefill_start = start
        self.prefill_end = end
        self.last = end

    @property
    def prefill_seconds(self) -> float:
        """The prefill's length: uncached prompt tokens over the prefill speed."""
        return self.prefill_end - self.prefill_start

    def __repr__(self) -> str:
        a = self.admission
        return (
            f"<Ticket {self.id} prompt={a.prompt_tokens} cached={a.cached_tokens} "
            f"prefill={self.prefill_start:.6f}..{self.prefill_end:.6f}>"
        )


class _Waiter:
    """A request queued for admission, woken on its own event loop."""

    __slots__ = ("future", "loop", "ticket", "token_ids")

    def __init__(self, token_ids: Sequence[int], loop: asyncio.AbstractEventLoop) -> None:
        self.token_ids = token_ids
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.ticket: Ticket | None = None  # set under the engine's lock when admitted


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class MockEngine:
    """The simulated GPU: a KV cache, a FIFO admission queue and one prefill lane.

    Args:
        config: sizes and speeds.
        sink: told what the cache stores and evicts; ``None``: no events.
        clock: monotonic seconds (tests pass a manual clock to check the computed times).
    """

    def __init__(
        self,
        config: MockerConfig,
        *,
        sink: KvEventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.cache = KvCache(config.block_size, config.num_gpu_blocks)
        self.clock = clock
        self._sink = sink
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._running: dict[int, Ticket] = {}
        self._waiting: deque[_Waiter] = deque()
        self._lane_free = -math.inf  # when the prefill lane is next free
        self._prefills: deque[tuple[float, float]] = deque()  # (start, end), by start
        self._requests = 0

    # --- admission ------------------------------------------------------------------------------

    def try_admit(self, token_ids: Sequence[int]) -> Ticket | None:
        """Admit a prompt now if nothing waits before it and it fits; ``None`` otherwise."""
        with self._lock:
            return None if self._waiting else self._admit(token_ids)

    async def admit(self, token_ids: Sequence[int], ctx: RequestContext) -> Ticket | None:
        """Admit a prompt, waiting in line (FIFO) while it does not fit.

        Returns ``None`` if ``ctx`` is stopped first. The caller must :meth:`release` the
        ticket.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            ticket = None if self._waiting else self._admit(token_ids)
            if ticket is not None:
                return ticket
            waiter = _Waiter(token_ids, loop)
            self._waiting.append(waiter)
        stopped = loop.create_task(ctx.wait_stopped(), name=f"mocker-wait-{ctx.id}")
        woken = False
        try:
            await asyncio.wait((waiter.future, stopped), return_when=asyncio.FIRST_COMPLETED)
            woken = not ctx.is_stopped()
        finally:
            stopped.cancel()
            await asyncio.wait((stopped,))  # never raises its CancelledError (only ours)
            with self._lock:
                ticket = waiter.ticket
                if ticket is None:
                    self._waiting.remove(waiter)
                    self._drain()  # it may have held the line for those behind it
                elif not woken:  # stopped or cancelled as it was admitted: nobody uses it
                    self.release(ticket)
                    ticket = None
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The request ended: free its blocks for eviction and admit who waits. Idempotent."""
        with self._lock:
            if self._running.pop(ticket.id, None) is None:
                return
            self.cache.release(ticket.id)
            self._drain()

    def _admit(self, token_ids: Sequence[int]) -> Ticket | None:
        """Admit now if possible (lock held): cache blocks, events, a slot on the prefill lane."""
        if len(self._running) >= self.config.max_num_seqs:
            return None
        id = next(self._ids)
        admission = self.cache.admit(id, token_ids)
        if admission is None:
            return None
        self._publish(admission)
        config = self.config
        now = self.clock()
        start = max(now, self._lane_free)
        end = start + admission.uncached_tokens / config.prefill_tokens_per_second / (
            config.speedup_ratio
        )
        self._lane_free = end
        if end > start:
            self._prefills.append((start, end))
        ticket = Ticket(id, admission, start, end)
        self._running[id] = ticket
        self._requests += 1
        self._forget_prefills(now)
        return ticket

    def _drain(self) -> None:
        """Admit waiting requests from the head of the line while they fit (lock held)."""
        while self._waiting:
            waiter = self._waiting[0]
            ticket = self._admit(waiter.token_ids)
            if ticket is None:
                return
            self._waiting.popleft()
            waiter.ticket = ticket
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.future)
            except RuntimeError:  # its loop is closed: nobody will use the ticket
                self._running.pop(ticket.id, None)
                self.cache.release(ticket.id)

    def _publish(self, admission: Admission) -> None:
        sink = self._sink
        if sink is None:
            return
        if admission.evicted:
            sink.removed(list(admission.evicted))
        for run in admission.stored:
            sink.stored(list(run.block_hashes), run.parent_hash)

    # --- timing ---------------------------------------------------------------------------------

    def first_token_at(self, ticket: Ticket, time_to_first_token: float) -> float:
        """When the first token is due: the prefill's end plus the fixed time to first token."""
        return ticket.prefill_end + time_to_first_token / self.config.speedup_ratio

    def next_token_at(self, last: float, tokens_per_second: float) -> float:
        """When the token after one due at ``last`` is due.

        One decode step later, plus every prefill that runs meanwhile (prefills pause decoding,
        including those that the delay itself runs into).
        """
        remaining = 1.0 / tokens_per_second / self.config.speedup_ratio
        due = last
        with self._lock:
            prefills = list(self._prefills)  # disjoint and in order: one lane
        for start, end in prefills:
            if end <= due:
                continue
            if start >= due + remaining:
                break
            remaining -= max(0.0, start - due)  # decoding runs until the prefill starts,
            due = end  # then waits for it to end
        return due + remaining

    def advance(self, ticket: Ticket, due: float) -> None:
        """``ticket``'s request emitted the token due at ``due``."""
        ticket.last = due

    def _forget_prefills(self, now: float) -> None:
        """Drop prefills that ended before every running request's last token (lock held)."""
        horizon = min((t.last for t in self._running.values()), default=now)
        while self._prefills and self._prefills[0][1] <= horizon:
            self._prefills.popleft()

    # --- cache and stats ------------------------------------------------------------------------

    def clear_cache(self) -> None:
        """Evict every block no running request uses (``cleared`` if that empties the cache)."""
        with self._lock:
            evicted = self.cache.clear()
            if self._sink is None:
                return
            if self.cache.used_blocks == 0:
                self._sink.cleared()
            elif evicted:
                self._sink.removed(evicted)

    def stats(self) -> MockerStats:
        """The engine now."""
        with self._lock:
            cache = self.cache
            return MockerStats(
                running=len(self._running),
                waiting=len(self._waiting),
                total_blocks=cache.num_blocks,
                active_blocks=cache.active_blocks,
                cached_blocks=cache.cached_blocks,
                usage=cache.usage,
                prompt_tokens=cache.prompt_tokens,
                cached_prompt_tokens=cache.hit_tokens,
                hit_rate=cache.hit_rate,
                requests=self._requests,
            )
