"""KvPublisher: what a worker (or an engine adapter) calls when its KV cache changes.

``stored`` / ``removed`` / ``cleared`` are synchronous, never block, and may be called from any
thread (an engine's own thread included). Each numbers the event (the next ``event_id``), applies
it to the worker's :class:`~troupe.kv.LocalKvIndexer` and queues it, all under one lock, so the
queue is in ``event_id`` order; one task on the publisher's event loop publishes the queue in
order through an :class:`~troupe.events.EventPublisher`.

Publishing is best effort by design: the local indexer is the truth. An event the plane refuses,
or one that would overflow ``max_pending``, is counted and dropped; a follower sees the gap at
the next event and recovers it from the worker's query endpoint (see :mod:`troupe.kv._query`).
After :meth:`KvPublisher.close` changes are still recorded, no longer published.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from troupe._support._logging import get_logger
from troupe.errors import InvalidRequest, TransportError
from troupe.events import EventPlane, EventPublisher, EventScope
from troupe.kv._events import (
    KV_EVENTS_TOPIC,
    Cleared,
    KvCacheEvent,
    KvEventData,
    Removed,
    Stored,
    StoredBlock,
)
from troupe.kv._hashing import local_block_hashes, sequence_hashes
from troupe.kv._local import DEFAULT_RING_SIZE, LocalKvIndexer

__all__ = ["BLOCK_SIZE_KEY", "DEFAULT_MAX_PENDING", "KvPublisher"]

BLOCK_SIZE_KEY = "kv_block_size"
"""The instance-record metadata key that announces a worker's KV block size."""

DEFAULT_MAX_PENDING = 65_536
"""Events queued for publication at most; beyond, new ones are dropped (and later recovered)."""

_log = get_logger("troupe.kv.publisher")


class KvPublisher:
    """Numbers, records and publishes one worker's KV-cache events.

    Args:
        events: the event-plane publisher (topic :data:`~troupe.kv.KV_EVENTS_TOPIC`, publisher id
            = the worker's instance id).
        block_size: tokens per KV block (what :meth:`stored` hashes by).
        ring_size: recent events the local indexer keeps for range queries.
        max_pending: events queued for publication at most.

    Raises:
        InvalidRequest: ``block_size``, ``ring_size`` or ``max_pending`` < 1.
    """

    def __init__(
        self,
        events: EventPublisher,
        *,
        block_size: int = 16,
        ring_size: int = DEFAULT_RING_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        if block_size < 1:
            raise InvalidRequest(f"block_size must be >= 1, not {block_size}", param="block_size")
        if max_pending < 1:
            raise InvalidRequest(
                f"max_pending must be >= 1, not {max_pending}", param="max_pending"
            )
        self.block_size = block_size
        self.indexer = LocalKvIndexer(ring_size)
        """This worker's own view: what it holds and its recent events."""
        self.max_pending = max_pending
        self.published = 0
        """Events handed to the event plane."""
        self.dropped = 0
        """Events not published (queue full, or the plane refused them): followers recover them."""
        self._events = events
        self._lock = threading.Lock()
        self._pending: deque[KvCacheEvent] = deque()
        self._next_id = 1
        self._busy = False  # the task is publishing a batch taken from _pending
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._signalled = False
        self._progress: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        plane: EventPlane,
        scope: EventScope,
        publisher_id: str,
        *,
        block_size: int = 16,
        ring_size: int = DEFAULT_RING_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> KvPublisher:
        """A started publisher of ``scope``'s KV events as ``publisher_id`` (on this loop)."""
        events = await plane.publisher(scope, KV_EVENTS_TOPIC, publisher_id)
        publisher = cls(events, block_size=block_size, ring_size=ring_size, max_pending=max_pending)
        publisher.start()
        return publisher

    @property
    def publisher_id(self) -> str:
        """The worker's instance id, as its events carry it."""
        return self._events.publisher_id

    @property
    def metadata(self) -> dict[str, Any]:
        """What to add to the worker's instance records: ``{"kv_block_size": block_size}``."""
        return {BLOCK_SIZE_KEY: self.block_size}

    @property
    def last_event_id(self) -> int:
        """The id of the last event recorded (0: none)."""
        return self.indexer.last_event_id

    # --- the worker's calls (any thread) ---------------------------------------------------------

    def stored(
        self,
        block_hashes: Sequence[int] | None = None,
        parent_hash: int | None = None,
        *,
        blocks: Sequence[StoredBlock] | None = None,
        token_ids: Sequence[int] | None = None,
        tokens_hashes: Sequence[int] | None = None,
        dp_rank: int = 0,
    ) -> list[int]:
        """Record that a chain of blocks was stored; return their sequence hashes.

        Give one of ``block_hashes`` (the blocks' sequence hashes, computed by the caller with
        :func:`~troupe.kv.block_hashes`; ``tokens_hashes``, their local hashes, if known),
        ``blocks`` (:class:`~troupe.kv.StoredBlock` s) or ``token_ids`` (hashed here in blocks
        of :attr:`block_size`, a partial last block left out). ``parent_hash`` is the sequence
        hash of the block before the first one (None: the chain starts a sequence). Nothing is
        published when there is no block.

        Raises:
            InvalidRequest: not exactly one of ``block_hashes``, ``blocks`` and ``token_ids``;
                a bad token id; ``tokens_hashes`` of another length than ``block_hashes``.
        """
        if sum(given is not None for given in (block_hashes, blocks, token_ids)) != 1:
            raise InvalidRequest(
                "give one of block_hashes, blocks and token_ids", param="block_hashes"
            )
        if token_ids is not None:
            tokens_hashes = local_block_hashes(token_ids, self.block_size)
            block_hashes = sequence_hashes(tokens_hashes, parent_hash)
        if blocks is not None:
            chain = list(blocks)
        elif tokens_hashes is None:
            chain = [StoredBlock(h) for h in block_hashes or ()]
        elif len(tokens_hashes) != len(block_hashes or ()):
            raise InvalidRequest(
                f"{len(tokens_hashes)} tokens_hashes for {len(block_hashes or ())} block_hashes",
                param="tokens_hashes",
            )
        else:
            chain = [
                StoredBlock(h, t) for h, t in zip(block_hashes or (), tokens_hashes, strict=True)
            ]
        if chain:
            self._record(Stored(parent_hash, chain), dp_rank)
        return [block.block_hash for block in chain]

    def removed(self, block_hashes: Iterable[int], *, dp_rank: int = 0) -> None:
        """Record that blocks (by sequence hash) were evicted; nothing if none."""
        hashes = list(block_hashes)
        if hashes:
            self._record(Removed(hashes), dp_rank)

    def cleared(self, *, dp_rank: int = 0) -> None:
        """Record that every block of ``dp_rank`` was dropped."""
        self._record(Cleared(), dp_rank)

    def _record(self, data: KvEventData, dp_rank: int) -> None:
        with self._lock:
            event = KvCacheEvent(self._next_id, data, dp_rank)
            self.indexer.apply(event)
            self._next_id += 1
            if self._closed or len(self._pending) >= self.max_pending:
                self.dropped += 1
                return
            self._pending.append(event)
            if self._signalled or self._loop is None:
                return
            self._signalled = True
            loop, wake = self._loop, self._wake
        assert wake is not None
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:
            pass  # the loop is closed: the runtime is gone, and nobody follows any more

    # --- the publishing task (its event loop) ----------------------------------------------------

    def start(self) -> None:
        """Start publishing from the running event loop (events recorded before are queued)."""
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            self._loop, self._wake, self._progress = loop, asyncio.Event(), asyncio.Event()
            if self._pending:
                self._signalled = True
                self._wake.set()
        scope = self._events.scope
        self._task = loop.create_task(
            self._run(), name=f"KvPublisher-{scope.namespace}.{scope.component}"
        )
        self._task.add_done_callback(_report_crash)

    async def _run(self) -> None:
        assert self._wake is not None
        assert self._progress is not None
        closing = False
        while not closing:
            await self._wake.wait()
            self._wake.clear()
            while True:
                with self._lock:
                    if not self._pending:
                        self._signalled = False
                        closing = self._closed
                        break
                    batch = list(self._pending)
                    self._pending.clear()
                    self._busy = True
                for event in batch:
                    await self._publish(event)
                self._busy = False
                self._progress.set()
                self._progress = asyncio.Event()

    async def _publish(self, event: KvCacheEvent) -> None:
        try:
            await self._events.publish(event)
        except TransportError as exc:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                _log.warning(
                    "KV event not published; followers will recover it from this worker",
                    event_id=event.event_id,
                    dropped=self.dropped,
                    error=str(exc),
                )
        else:
            self.published += 1

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every event recorded so far was published (or dropped).

        Call it on the loop the publisher was started on.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        with self._lock:
            target = self._next_id - 1
        async with asyncio.timeout(timeout):
            while self._queued_up_to(target):
                assert self._progress is not None, "flush() before start()"
                await self._progress.wait()

    def _queued_up_to(self, target: int) -> bool:
        """Whether an event with an id up to ``target`` is queued or being published."""
        with self._lock:
            return self._busy or bool(self._pending and self._pending[0].event_id <= target)

    async def close(self, timeout: float = 5.0) -> None:
        """Publish what is queued (within ``timeout`` seconds), then close the event-plane
        publisher; call it on the publisher's loop. Changes recorded afterwards still reach the
        local indexer (a worker draining its last requests keeps answering queries) but are no
        longer published."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, wake = self._loop, self._wake
        task = self._task
        if task is not None and loop is not None and wake is not None:
            wake.set()
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                _log.warning("KV events still queued at close; dropped", queued=len(self._pending))
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._events.close()


def _report_crash(task: asyncio.Task[None]) -> None:
    """The publishing task ended on an error nobody expected: say so once (events now queue)."""
    if not task.cancelled() and (error := task.exception()) is not None:
        _log.error("KV event publisher stopped on an error", error=repr(error))
