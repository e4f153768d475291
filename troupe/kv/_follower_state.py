"""What a :class:`~troupe.kv.KvFollower` is told (:class:`FollowerSettings`), what it counts
(:class:`KvFollowerCounters`), and what it keeps per worker (:class:`WorkerState`).

Plain data, no I/O; the follower (``_follower``) is the only writer.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any

from troupe.errors import InvalidRequest
from troupe.kv._events import KvCacheEvent
from troupe.messages import validate_name

__all__ = ["FollowerSettings", "KvFollowerCounters", "WorkerState"]


@dataclasses.dataclass(frozen=True, slots=True)
class FollowerSettings:
    """How a follower recovers, replays and snapshots.

    Attributes:
        fetch_timeout: seconds one query to a worker may take.
        buffer_limit: events held per worker while a query is under way; past it they are
            dropped and a dump follows the answer.
        retry_min: first pause after a failed query, in seconds (doubled up to ``retry_max``).
        retry_max: longest pause between tries.
        replay: on a durable event plane, rebuild the workers' state from the stream (after the
            latest snapshot) instead of asking each worker for a dump.
        replay_grace: seconds a worker listed in discovery waits for its history to come out of
            the replayed stream before it is asked for a dump, and seconds the replayed state of
            a publisher that discovery does not list is kept (a worker that is gone).
        snapshot_threshold: replaying followers save a snapshot of their view after this many
            events applied since the last one (0: never).
        snapshot_name: the snapshot's name in the stream's object store (``[a-z0-9_-]+``).
    """

    fetch_timeout: float = 5.0
    buffer_limit: int = 10_000
    retry_min: float = 0.05
    retry_max: float = 2.0
    replay: bool = True
    replay_grace: float = 5.0
    snapshot_threshold: int = 1_000_000
    snapshot_name: str = "kv-follower"

    def __post_init__(self) -> None:
        for name in ("fetch_timeout", "retry_min", "retry_max", "replay_grace"):
            if not getattr(self, name) > 0:
                raise InvalidRequest(f"{name} must be > 0", param=name)
        if self.buffer_limit < 1:
            raise InvalidRequest("buffer_limit must be >= 1", param="buffer_limit")
        if self.snapshot_threshold < 0:
            raise InvalidRequest("snapshot_threshold must be >= 0", param="snapshot_threshold")
        validate_name("snapshot_name", self.snapshot_name)


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
    """Events dropped because their publisher is not in discovery (and, replaying, has no
    complete history in the stream)."""
    restored: int = 0
    """Workers restored from a snapshot (in total only)."""
    snapshots: int = 0
    """Snapshots of the view saved (in total only)."""

    def add(self, other: KvFollowerCounters) -> None:
        """Add ``other``'s counts to these."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


@dataclasses.dataclass(slots=True, eq=False)
class WorkerState:
    """One publisher as the follower knows it.

    ``synced`` with no ``fetch``: the sink holds its state up to ``last``. A fetch under way:
    events wait in ``buffer``. Replaying, a worker may also be *pending* (listed, not synced,
    no fetch: its history is expected from the stream until ``timer`` fires) or *unlisted*
    (events in the stream, not in discovery: kept until ``timer`` finds it silent).
    """

    id: str
    metadata: Mapping[str, Any]
    listed: bool = True  # discovery lists it
    counters: KvFollowerCounters = dataclasses.field(default_factory=KvFollowerCounters)
    last: int = 0  # the last event id applied
    synced: bool = False  # the sink holds its state up to ``last``
    fetch: asyncio.Task[None] | None = None
    gap: bool = False  # the fetch under way closes a gap
    buffer: dict[int, KvCacheEvent] = dataclasses.field(default_factory=dict)
    overflow: bool = False  # the buffer overflowed during the fetch: dump after it
    seen_at: float = 0.0  # loop time of its last event (unlisted workers)
    timer: asyncio.TimerHandle | None = None  # replay grace: pending or unlisted

    def cancel_timer(self) -> None:
        """Stop the grace timer, if any."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
