"""KvFollower: the router side of KV events: every worker's blocks, in order, with no gaps.

The follower subscribes to the ``kv-events`` topic of one namespace and component, watches
discovery for the workers publishing there (a :class:`~troupe.kv.KvWorkerDirectory`), and feeds
a :class:`~troupe.kv.KvSink` each worker's events in ``event_id`` order. Per worker it is a small
state machine::

    joined --> fetching (a dump) --answer--> live --event id > last + 1--> fetching (the range)
    live: id == last + 1 applied; id <= last a duplicate, dropped
    fetching: events buffered (up to ``buffer_limit``), applied after the answer
    any --left discovery--> gone (the sink forgets the worker at once)

- A newly seen worker is fetched whole (a dump from its query endpoint); events that arrive
  meanwhile are buffered and those the dump already covers are dropped (``superseded``).
- A gap (an event id beyond ``last + 1``) asks the worker for the missing range; a worker whose
  ring no longer holds it answers with a dump, which replaces the worker's state in the sink.
- Events from a publisher that discovery does not (yet) list are dropped and counted
  (``unknown``): when it appears, its dump covers them. Nothing is buffered for strangers, so a
  stream of events from nowhere costs no memory.
- A payload that is not a :class:`~troupe.kv.KvCacheEvent` is counted (``malformed``) and
  dropped; the next event from that worker shows the gap and recovers it.
- A failed query is retried with backoff while the worker is in discovery.

Everything runs as tasks on one event loop (the runtime's I/O loop), owned by the follower and
stopped by :meth:`KvFollower.close`; the sink is called from that loop only.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from troupe._support._logging import get_logger
from troupe.errors import InvalidRequest, ProtocolError, TroupeError
from troupe.events import Envelope, EventPlane, EventScope, EventSubscription, decode_payload_as
from troupe.kv._directory import KvWorkerDirectory
from troupe.kv._events import KV_EVENTS_TOPIC, KvCacheEvent
from troupe.kv._publisher import BLOCK_SIZE_KEY
from troupe.kv._query import KvQueryAnswer, dump_request, range_request
from troupe.kv._sink import KvSink

__all__ = ["FollowerSettings", "KvFollower", "KvFollowerCounters"]

_log = get_logger("troupe.kv.follower")


@dataclasses.dataclass(frozen=True, slots=True)
class FollowerSettings:
    """How a follower recovers.

    Attributes:
        fetch_timeout: seconds one query to a worker may take.
        buffer_limit: events held per worker while a query is under way; past it they are
            dropped and a dump follows the answer.
        retry_min: first pause after a failed query, in seconds (doubled up to ``retry_max``).
        retry_max: longest pause between tries.
    """

    fetch_timeout: float = 5.0
    buffer_limit: int = 10_000
    retry_min: float = 0.05
    retry_max: float = 2.0

    def __post_init__(self) -> None:
        for name in ("fetch_timeout", "retry_min", "retry_max"):
            if not getattr(self, name) > 0:
                raise InvalidRequest(f"{name} must be > 0", param=name)
        if self.buffer_limit < 1:
            raise InvalidRequest("buffer_limit must be >= 1", param="buffer_limit")


@dataclasses.dataclass(slots=True)
class KvFollowerCounters:
    """What a follower saw, for one worker or in total."""

    received: int = 0
    """Events that decoded."""
    applied: int = 0
    """Events applied to the sink from the stream or from a fetched range (dump events: none)."""
    malformed: int = 0
    """Payloads that were not a KV event (or envelopes that were not an envelope, in total)."""
    duplicates: int = 0
    """Events with an id already applied."""
    superseded: int = 0
    """Events buffered during a query whose answer already covered them."""
    gaps: int = 0
    """Times an event id skipped ahead of ``last + 1``."""
    recovered: int = 0
    """Gaps closed by a fetched range or dump."""
    dumps: int = 0
    """Dumps applied (one per join, plus fall-backs)."""
    fetch_failures: int = 0
    """Queries that failed and were retried."""
    unknown: int = 0
    """Events from publishers not in discovery (in total only)."""

    def add(self, other: KvFollowerCounters) -> None:
        """Add ``other``'s counts to these."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


@dataclasses.dataclass(slots=True, eq=False)
class _Worker:
    id: str
    metadata: Mapping[str, Any]
    counters: KvFollowerCounters = dataclasses.field(default_factory=KvFollowerCounters)
    last: int = 0  # the last event id applied
    synced: bool = False  # a dump was applied: ``last`` means something
    fetch: asyncio.Task[None] | None = None
    gap: bool = False  # the fetch under way closes a gap
    buffer: dict[int, KvCacheEvent] = dataclasses.field(default_factory=dict)
    overflow: bool = False  # the buffer overflowed during the fetch: dump after it


class KvFollower:
    """Follows the KV events of one namespace and component into ``sink``.

    Args:
        plane: the event plane to subscribe on.
        scope: the workers' namespace and component.
        directory: the live workers and their query endpoints.
        sink: what the ordered events are applied to.
        settings: timeouts, buffer and retry limits.
    """

    def __init__(
        self,
        plane: EventPlane,
        scope: EventScope,
        directory: KvWorkerDirectory,
        sink: KvSink,
        *,
        settings: FollowerSettings | None = None,
    ) -> None:
        self.scope = scope
        self.sink = sink
        self.settings = settings if settings is not None else FollowerSettings()
        self._plane = plane
        self._directory = directory
        self._workers: dict[str, _Worker] = {}
        self._departed = KvFollowerCounters()  # what workers that left had counted
        self._strangers = KvFollowerCounters()  # events of publishers not in discovery
        self._subscription: EventSubscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._waiters: set[asyncio.Future[None]] = set()
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe, then watch discovery (so no event published after a dump is missed)."""
        if self._subscription is not None:
            return
        self._subscription = await self._plane.subscribe(self.scope, KV_EVENTS_TOPIC)
        name = f"{self.scope.namespace}.{self.scope.component}"
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read(self._subscription), name=f"KvFollower-{name}-events"),
            loop.create_task(self._watch(), name=f"KvFollower-{name}-workers"),
        ]
        for task in self._tasks:
            task.add_done_callback(_report_crash)

    async def close(self) -> None:
        """Stop every task and unsubscribe; the sink keeps what it has."""
        if self._closed:
            return
        self._closed = True
        tasks = self._tasks + [w.fetch for w in self._workers.values() if w.fetch is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._subscription is not None:
            await self._subscription.close()
        self._notify()

    # --- what it knows ---------------------------------------------------------------------------

    def workers(self) -> list[str]:
        """The workers discovery lists, sorted."""
        return sorted(self._workers)

    def synced(self, worker: str) -> bool:
        """Whether ``worker``'s state in the sink is complete up to :meth:`last_event_id`."""
        w = self._workers.get(worker)
        return w is not None and w.synced and w.fetch is None

    def last_event_id(self, worker: str) -> int | None:
        """The last event id applied for ``worker`` (None: not followed)."""
        w = self._workers.get(worker)
        return None if w is None else w.last

    def block_size(self, worker: str) -> int | None:
        """The KV block size ``worker`` announced (``kv_block_size`` in its record)."""
        w = self._workers.get(worker)
        size = None if w is None else w.metadata.get(BLOCK_SIZE_KEY)
        return size if isinstance(size, int) else None

    def counters(self, worker: str | None = None) -> KvFollowerCounters:
        """A copy of ``worker``'s counters (zeros if unknown), or of the totals."""
        if worker is not None:
            w = self._workers.get(worker)
            return dataclasses.replace(w.counters) if w is not None else KvFollowerCounters()
        total = dataclasses.replace(self._departed)
        total.add(self._strangers)
        for w in self._workers.values():
            total.add(w.counters)
        if self._subscription is not None:
            total.malformed += self._subscription.malformed
        return total

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate()`` holds, checked after every change; False on timeout.

        Call it on the follower's loop.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    if self._closed:
                        return False
                    waiter = loop.create_future()
                    self._waiters.add(waiter)
                    try:
                        await waiter
                    finally:
                        self._waiters.discard(waiter)
        except TimeoutError:
            return False
        return True

    def _notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- discovery -------------------------------------------------------------------------------

    async def _watch(self) -> None:
        async for members in self._directory.members():
            for worker in [w for w in self._workers if w not in members]:
                self._leave(worker)
            for worker, metadata in members.items():
                known = self._workers.get(worker)
                if known is not None:
                    known.metadata = metadata
                else:
                    self._join(worker, metadata)
            self._notify()

    def _join(self, worker: str, metadata: Mapping[str, Any]) -> None:
        w = _Worker(worker, metadata)
        self._workers[worker] = w
        _log.debug("KV events: worker joined; fetching its state", worker=worker)
        self._start_fetch(w, dump_request())

    def _leave(self, worker: str) -> None:
        w = self._workers.pop(worker)
        if w.fetch is not None:
            w.fetch.cancel()  # it checks that its worker is still current before applying
        self._departed.add(w.counters)
        self.sink.remove_worker(worker)
        _log.debug("KV events: worker left; its blocks are forgotten", worker=worker)

    # --- the event stream ------------------------------------------------------------------------

    async def _read(self, subscription: EventSubscription) -> None:
        async for envelope in subscription:
            self._on_envelope(envelope)
            self._notify()

    def _on_envelope(self, envelope: Envelope) -> None:
        w = self._workers.get(envelope.publisher_id)
        counters = w.counters if w is not None else self._strangers
        try:
            event = decode_payload_as(envelope.payload, KvCacheEvent)
        except ProtocolError as exc:
            counters.malformed += 1
            _log.debug(
                "KV events: malformed payload dropped", worker=envelope.publisher_id, error=str(exc)
            )
            return
        counters.received += 1
        if w is None:
            counters.unknown += 1
            return
        if w.fetch is not None:
            self._hold(w, event)
        elif event.event_id <= w.last:
            w.counters.duplicates += 1
        elif event.event_id == w.last + 1:
            self._apply(w, event)
        else:
            self._gap(w, event)

    def _apply(self, w: _Worker, event: KvCacheEvent) -> None:
        self.sink.apply(w.id, event)
        w.last = event.event_id
        w.counters.applied += 1

    def _hold(self, w: _Worker, event: KvCacheEvent) -> None:
        """A query is under way: keep the event for after its answer."""
        if (w.synced and event.event_id <= w.last) or event.event_id in w.buffer:
            w.counters.duplicates += 1
        elif len(w.buffer) >= self.settings.buffer_limit:
            w.buffer.clear()
            w.overflow = True
        elif not w.overflow:
            w.buffer[event.event_id] = event

    def _gap(self, w: _Worker, event: KvCacheEvent) -> None:
        w.counters.gaps += 1
        _log.debug(
            "KV events: gap; fetching the missing range",
            worker=w.id,
            missing_from=w.last + 1,
            missing_to=event.event_id - 1,
        )
        w.buffer[event.event_id] = event
        w.gap = True
        self._start_fetch(w, range_request(w.last + 1, event.event_id - 1))

    # --- queries ---------------------------------------------------------------------------------

    def _start_fetch(self, w: _Worker, request: dict[str, Any]) -> None:
        w.fetch = asyncio.get_running_loop().create_task(
            self._fetch(w, request), name=f"KvFollower-fetch-{w.id}"
        )
        w.fetch.add_done_callback(_report_crash)

    async def _fetch(self, w: _Worker, request: dict[str, Any]) -> None:
        delay = self.settings.retry_min
        while True:
            try:
                async with asyncio.timeout(self.settings.fetch_timeout):
                    answer = await self._directory.query(w.id, request)
            except (TroupeError, TimeoutError) as exc:
                w.counters.fetch_failures += 1
                log = _log.warning if delay == self.settings.retry_min else _log.debug
                log(
                    "KV events query failed; retrying",
                    worker=w.id,
                    request=request,
                    error=str(exc) or type(exc).__name__,
                    retry_in=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max)
                continue
            break
        if self._workers.get(w.id) is not w:
            return  # it left meanwhile
        w.fetch = None
        self._on_answer(w, request, answer)
        self._notify()

    def _on_answer(self, w: _Worker, request: dict[str, Any], answer: KvQueryAnswer) -> None:
        if answer.dump:
            self.sink.remove_worker(w.id)
            for event in answer.events:
                self.sink.apply(w.id, event)
            w.last = answer.last_event_id
            w.synced = True
            w.counters.dumps += 1
        else:
            first = w.last + 1
            ids = [event.event_id for event in answer.events]
            if ids != list(range(first, request.get("last", 0) + 1)):
                _log.warning(
                    "KV events query answered the wrong range; fetching a dump",
                    worker=w.id,
                    asked=request,
                    got=f"{ids[0]}..{ids[-1]}" if ids else "nothing",
                )
                self._start_fetch(w, dump_request())
                return
            for event in answer.events:
                self._apply(w, event)
        if w.gap:
            w.gap = False
            w.counters.recovered += 1
        if w.overflow:
            w.overflow = False
            w.buffer.clear()
            w.gap = True
            self._start_fetch(w, dump_request())
            return
        self._drain(w)

    def _drain(self, w: _Worker) -> None:
        """Apply the buffered events that follow ``last``; a hole starts another fetch."""
        held = w.buffer
        for event_id in sorted(held):
            event = held.pop(event_id)
            if event_id <= w.last:
                w.counters.superseded += 1
            elif event_id == w.last + 1:
                self._apply(w, event)
            else:
                held[event_id] = event  # keep it (and those after it) for after the range
                self._gap(w, event)
                return


def _report_crash(task: asyncio.Task[None]) -> None:
    """A follower task ended on an error nobody expected (a sink that raised): say so."""
    if not task.cancelled() and (error := task.exception()) is not None:
        _log.error("KV follower task stopped on an error", task=task.get_name(), error=repr(error))
