"""KvFollower: the router side of KV events: every worker's blocks, in order, with no gaps.

The follower subscribes to the ``kv-events`` topic of one namespace and component, watches
discovery for the workers publishing there (a :class:`~troupe.kv.KvWorkerDirectory`), and feeds
a :class:`~troupe.kv.KvSink` each worker's events in ``event_id`` order. Per worker it is a small
state machine::

    joined --> fetching (a dump) --answer--> live --event id > last + 1--> fetching (the range)
    live: id == last + 1 applied; id <= last a duplicate, dropped
    fetching: events buffered (up to ``buffer_limit``), applied after the answer
    any --left discovery--> gone (the sink forgets the worker at once)

    replaying a durable stream (below):
    joined --> pending --its first event--> live (id 1: applied; later: a gap, the range)
    pending --no event within replay_grace--> fetching (a dump)
    in the stream, not in discovery --> unlisted (applied as live) --listed--> live
    unlisted --a gap--> unlisted, forgotten --listed--> fetching (a dump)
    unlisted --silent for replay_grace--> gone

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

On a durable plane (``plane.durable``: JetStream) the follower *replays* instead (see
:mod:`troupe.kv._replay`): it starts from the latest snapshot of its view, or from the stream's
start, and the stream brings each worker's history in order, so a worker listed in discovery is
not asked for a dump unless its history does not come (within ``replay_grace``) or starts with
a gap. Publishers that the stream shows but discovery does not list yet keep their replayed
state, *unlisted*, until they are listed or stay silent for ``replay_grace`` (gone). Every
``snapshot_threshold`` events applied, the view is saved as a snapshot. A stream that no
longer holds the history (``ReplayUnavailable``) means the workers are asked, as above.

Everything runs as tasks on one event loop (the runtime's I/O loop), owned by the follower and
stopped by :meth:`KvFollower.close`; the sink is called from that loop only.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from troupe._support._logging import get_logger
from troupe.errors import ProtocolError, TroupeError
from troupe.events import Envelope, EventPlane, EventScope, EventSubscription, decode_payload_as
from troupe.kv._directory import KvWorkerDirectory
from troupe.kv._events import KV_EVENTS_TOPIC, KvCacheEvent
from troupe.kv._follower_state import FollowerSettings, KvFollowerCounters, WorkerState
from troupe.kv._publisher import BLOCK_SIZE_KEY
from troupe.kv._query import KvQueryAnswer, dump_request, range_request
from troupe.kv._replay import FollowerSnapshot, SnapshotWriter, open_replay
from troupe.kv._sink import KvSink

__all__ = ["FollowerSettings", "KvFollower", "KvFollowerCounters"]

_log = get_logger("troupe.kv.follower")


class KvFollower:
    """Follows the KV events of one namespace and component into ``sink``.

    Args:
        plane: the event plane to subscribe on.
        scope: the workers' namespace and component.
        directory: the live workers and their query endpoints.
        sink: what the ordered events are applied to.
        settings: timeouts, buffer and retry limits; replay and snapshots.
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
        self._workers: dict[str, WorkerState] = {}
        self._departed = KvFollowerCounters()  # what workers that left had counted
        self._own = KvFollowerCounters()  # events of publishers not in discovery; restores
        self._subscription: EventSubscription | None = None
        self._replaying = False
        self._writer: SnapshotWriter | None = None
        self._since_snapshot = 0  # events applied since the last snapshot was taken
        self._tasks: list[asyncio.Task[None]] = []
        self._waiters: set[asyncio.Future[None]] = set()
        self._on_close: list[Callable[[], Awaitable[None]]] = []
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe (replaying a durable stream, after the latest snapshot), then watch
        discovery (so no event published after a dump is missed).

        Raises:
            TransportError: the event plane cannot be reached.
        """
        if self._subscription is not None:
            return
        settings = self.settings
        if self._plane.durable and settings.replay:
            opened = await open_replay(self._plane, self.scope, settings.snapshot_name)
            if opened is not None:
                self._subscription, snapshot = opened
                self._replaying = True
                if snapshot is not None:
                    self._restore(snapshot)
                # A sink that cannot export answers None even for a worker it does not hold.
                if settings.snapshot_threshold and self.sink.export("") is not None:
                    self._writer = SnapshotWriter(
                        self._plane, self.scope, settings.snapshot_name, self.sink, self._notify
                    )
        if self._subscription is None:
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
        for w in self._workers.values():
            w.cancel_timer()
        tasks = self._tasks + [w.fetch for w in self._workers.values() if w.fetch is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._writer is not None:
            await self._writer.close()
        if self._subscription is not None:
            await self._subscription.close()
        self._notify()
        hooks, self._on_close = self._on_close, []
        for hook in hooks:
            try:
                await hook()
            except Exception as exc:  # noqa: BLE001 - one failing hook must not stop the others
                _log.warning("a close hook failed", scope=str(self.scope), error=repr(exc))

    def on_close(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook()`` (on the I/O loop) once :meth:`close` has stopped the follower: what
        was made for it goes with it. Hooks run in the order they were added."""
        self._on_close.append(hook)

    # --- what it knows ---------------------------------------------------------------------------

    @property
    def replaying(self) -> bool:
        """Whether the follower replays a durable stream (rather than asking for dumps)."""
        return self._replaying

    def workers(self) -> list[str]:
        """The workers discovery lists, sorted."""
        return sorted(w.id for w in list(self._workers.values()) if w.listed)

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
        total.add(self._own)
        for w in list(self._workers.values()):  # a copy: a scrape may read from another thread
            total.add(w.counters)
        if self._subscription is not None:
            total.malformed += self._subscription.malformed
        if self._writer is not None:
            total.snapshots += self._writer.saved
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
            for w in [w for w in self._workers.values() if w.listed and w.id not in members]:
                self._leave(w)
                _log.debug("KV events: worker left; its blocks are forgotten", worker=w.id)
            for worker, metadata in members.items():
                known = self._workers.get(worker)
                if known is None:
                    self._join(worker, metadata)
                else:
                    known.metadata = metadata
                    if not known.listed:
                        self._listed(known)
            self._notify()

    def _join(self, worker: str, metadata: Mapping[str, Any]) -> None:
        w = WorkerState(worker, metadata)
        self._workers[worker] = w
        if self._replaying:  # pending: its history is on its way in the stream
            _log.debug("KV events: worker joined; waiting for its history", worker=worker)
            self._grace(w, self.settings.replay_grace)
        else:
            _log.debug("KV events: worker joined; fetching its state", worker=worker)
            self._start_fetch(w, dump_request())

    def _listed(self, w: WorkerState) -> None:
        """A publisher known from the stream (or a snapshot) appears in discovery."""
        w.listed = True
        w.cancel_timer()
        if not w.synced and w.fetch is None:  # its history in the stream is incomplete
            self._start_fetch(w, dump_request())

    def _leave(self, w: WorkerState) -> None:
        del self._workers[w.id]
        w.cancel_timer()
        if w.fetch is not None:
            w.fetch.cancel()  # it checks that its worker is still current before applying
        self._departed.add(w.counters)
        self.sink.remove_worker(w.id)

    def _grace(self, w: WorkerState, delay: float) -> None:
        w.cancel_timer()
        w.timer = asyncio.get_running_loop().call_later(delay, self._grace_over, w)

    def _grace_over(self, w: WorkerState) -> None:
        """A pending worker's history did not come: fetch it. An unlisted one stayed silent:
        it is gone."""
        w.timer = None
        if self._closed or self._workers.get(w.id) is not w:
            return
        if w.listed:
            if not w.synced and w.fetch is None:
                _log.debug("KV events: no history replayed; fetching its state", worker=w.id)
                self._start_fetch(w, dump_request())
            return
        silent = asyncio.get_running_loop().time() - w.seen_at
        if silent < self.settings.replay_grace:
            self._grace(w, self.settings.replay_grace - silent)
            return
        _log.debug("KV events: a publisher not in discovery went silent; forgotten", worker=w.id)
        self._leave(w)
        self._notify()

    def _restore(self, snapshot: FollowerSnapshot) -> None:
        """Put a snapshot's workers in the sink, unlisted until discovery lists them."""
        now = asyncio.get_running_loop().time()
        for saved in snapshot.workers:
            self.sink.remove_worker(saved.worker)
            for event in saved.events:
                self.sink.apply(saved.worker, event)
            w = WorkerState(saved.worker, {}, listed=False, synced=True, last=saved.last_event_id)
            w.seen_at = now
            self._workers[w.id] = w
            self._grace(w, self.settings.replay_grace)
            self._own.restored += 1
        _log.info("KV events: view restored from a snapshot", workers=len(snapshot.workers))

    # --- the event stream ------------------------------------------------------------------------

    async def _read(self, subscription: EventSubscription) -> None:
        async for envelope in subscription:
            self._on_envelope(envelope)
            if self._writer is not None:
                self._snapshot(subscription.stream_sequence)
            self._notify()

    def _on_envelope(self, envelope: Envelope) -> None:
        w = self._workers.get(envelope.publisher_id)
        if w is None and self._replaying:  # its history may start here: keep it, unlisted
            w = WorkerState(envelope.publisher_id, {}, listed=False, synced=True)
            self._workers[w.id] = w
            self._grace(w, self.settings.replay_grace)
        counters = w.counters if w is not None else self._own
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
        if not w.listed:
            w.seen_at = asyncio.get_running_loop().time()
        if w.fetch is not None:
            self._hold(w, event)
            return
        if not w.synced:
            if not w.listed:  # a history seen with a hole: a dump when it is listed
                w.counters.unknown += 1
                return
            w.cancel_timer()  # pending, and its history starts here (from 1, or a gap)
            w.synced = True
        if event.event_id <= w.last:
            w.counters.duplicates += 1
        elif event.event_id == w.last + 1:
            self._apply(w, event)
        else:
            self._gap(w, event)

    def _apply(self, w: WorkerState, event: KvCacheEvent) -> None:
        self.sink.apply(w.id, event)
        w.last = event.event_id
        w.counters.applied += 1
        self._since_snapshot += 1

    def _hold(self, w: WorkerState, event: KvCacheEvent) -> None:
        """A query is under way: keep the event for after its answer."""
        if (w.synced and event.event_id <= w.last) or event.event_id in w.buffer:
            w.counters.duplicates += 1
        elif len(w.buffer) >= self.settings.buffer_limit:
            w.buffer.clear()
            w.overflow = True
        elif not w.overflow:
            w.buffer[event.event_id] = event

    def _gap(self, w: WorkerState, event: KvCacheEvent) -> None:
        w.counters.gaps += 1
        if not w.listed:  # nobody to ask: forget it until discovery lists it
            _log.debug("KV events: gap in an unlisted publisher's history", worker=w.id)
            self.sink.remove_worker(w.id)
            w.synced, w.last = False, 0
            return
        _log.debug(
            "KV events: gap; fetching the missing range",
            worker=w.id,
            missing_from=w.last + 1,
            missing_to=event.event_id - 1,
        )
        w.buffer[event.event_id] = event
        w.gap = True
        self._start_fetch(w, range_request(w.last + 1, event.event_id - 1))

    def _snapshot(self, sequence: int) -> None:
        """Past the threshold, save the synced workers' view as of stream ``sequence`` (in the
        background)."""
        assert self._writer is not None
        if self._since_snapshot < self.settings.snapshot_threshold:
            return
        synced = [(w.id, w.last) for w in self._workers.values() if w.synced and w.fetch is None]
        if self._writer.save(synced, sequence):
            self._since_snapshot = 0

    # --- queries ---------------------------------------------------------------------------------

    def _start_fetch(self, w: WorkerState, request: dict[str, Any]) -> None:
        w.fetch = asyncio.get_running_loop().create_task(
            self._fetch(w, request), name=f"KvFollower-fetch-{w.id}"
        )
        w.fetch.add_done_callback(_report_crash)

    async def _fetch(self, w: WorkerState, request: dict[str, Any]) -> None:
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

    def _on_answer(self, w: WorkerState, request: dict[str, Any], answer: KvQueryAnswer) -> None:
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

    def _drain(self, w: WorkerState) -> None:
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
