"""Router replicas share their active requests, so neither overloads a worker the other fills.

Each KV router counts the blocks of the requests it sent and has not seen end (a worker's
``decode_blocks``). Two frontends routing one model each see only their own half. With replica
sync on, every router publishes ``ActiveAdded`` when it sends a request and ``ActiveFreed`` when
it ends, on the topic ``active_sequences_events`` of the endpoint's component, and adds what the
other routers published to its own count.

Best effort, as the event plane is: an event lost in transit is not recovered, and the
requests of a replica that stops without freeing them are forgotten after ``stale_after``
seconds. Its own events are ignored by the publisher's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import msgspec

from troupe._support._logging import get_logger
from troupe.errors import ProtocolError, TroupeError
from troupe.events import (
    EventPlane,
    EventPublisher,
    EventScope,
    EventSubscription,
    decode_payload_as,
)

__all__ = ["ACTIVE_TOPIC", "ActiveAdded", "ActiveFreed", "ReplicaSync"]

ACTIVE_TOPIC = "active_sequences_events"

_log = get_logger("troupe.actors.router")


class ActiveAdded(msgspec.Struct, frozen=True, tag=True):
    """A router sent a request of ``blocks`` blocks to ``worker``."""

    token: int
    worker: str
    blocks: int


class ActiveFreed(msgspec.Struct, frozen=True, tag=True):
    """The request of ``token`` ended."""

    token: int


ActiveEvent = ActiveAdded | ActiveFreed


class ReplicaSync:
    """One router's side of replica sync: publishes its own requests, counts the others'.

    Runs on the runtime's I/O loop (what the policy calls is synchronous and never waits: events
    are queued and published in order by one task).

    Args:
        stale_after: seconds after which another replica's request is forgotten.
        clock: monotonic seconds.
    """

    def __init__(
        self, *, stale_after: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stale_after = stale_after
        self._clock = clock
        self._outbox: asyncio.Queue[ActiveEvent] | None = None
        self._publisher: EventPublisher | None = None
        self._subscription: EventSubscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Other replicas' requests: (publisher id, token) -> (worker, blocks, when seen).
        self._remote: dict[tuple[str, int], tuple[str, int, float]] = {}
        self.remote_blocks: dict[str, int] = {}
        """Blocks in flight per worker, sent by the other replicas."""
        self.received = 0
        self.malformed = 0

    async def start(self, plane: EventPlane, scope: EventScope, publisher_id: str) -> None:
        """Publish as ``publisher_id`` and follow the other replicas (on the I/O loop)."""
        self._publisher = await plane.publisher(scope, ACTIVE_TOPIC, publisher_id)
        self._subscription = await plane.subscribe(scope, ACTIVE_TOPIC)
        self._outbox = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._send(), name=f"ReplicaSync-send-{scope.component}"),
            loop.create_task(self._follow(), name=f"ReplicaSync-follow-{scope.component}"),
        ]

    async def close(self) -> None:
        """Stop publishing and following."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for closing in (self._subscription, self._publisher):
            if closing is not None:
                with contextlib.suppress(TroupeError):
                    await closing.close()

    # --- what the policy calls (I/O loop, never waits) ------------------------------------------

    def added(self, token: int, worker: str, blocks: int) -> None:
        """This router sent a request."""
        if self._outbox is not None:
            self._outbox.put_nowait(ActiveAdded(token, worker, blocks))

    def freed(self, token: int) -> None:
        """A request this router sent ended."""
        if self._outbox is not None:
            self._outbox.put_nowait(ActiveFreed(token))

    # --- tasks ----------------------------------------------------------------------------------

    async def _send(self) -> None:
        assert self._outbox is not None
        assert self._publisher is not None
        while True:
            event = await self._outbox.get()
            try:
                await self._publisher.publish(event)
            except TroupeError as exc:  # best effort: the other replicas miss this one
                _log.debug("replica sync event not published", error=str(exc))

    async def _follow(self) -> None:
        assert self._subscription is not None
        assert self._publisher is not None
        me = self._publisher.publisher_id
        async for envelope in self._subscription:
            if envelope.publisher_id == me:
                continue
            try:
                event: Any = decode_payload_as(envelope.payload, ActiveEvent)  # type: ignore[arg-type]
            except ProtocolError:
                self.malformed += 1
                continue
            self.received += 1
            self.apply(envelope.publisher_id, event)

    def apply(self, replica: str, event: ActiveEvent) -> None:
        """Count another replica's event (public for tests)."""
        now = self._clock()
        if isinstance(event, ActiveAdded):
            self._forget_stale(now)
            self._remote[replica, event.token] = (event.worker, event.blocks, now)
            self.remote_blocks[event.worker] = (
                self.remote_blocks.get(event.worker, 0) + event.blocks
            )
        else:
            entry = self._remote.pop((replica, event.token), None)
            if entry is not None:
                self._release(entry[0], entry[1])

    def _release(self, worker: str, blocks: int) -> None:
        left = self.remote_blocks.get(worker, 0) - blocks
        if left > 0:
            self.remote_blocks[worker] = left
        else:
            self.remote_blocks.pop(worker, None)

    def _forget_stale(self, now: float) -> None:
        oldest = now - self._stale_after
        if not self._remote or next(iter(self._remote.values()))[2] > oldest:
            return  # insertion order is time order: the first entry is the oldest
        for key, (worker, blocks, seen) in list(self._remote.items()):
            if seen > oldest:
                break
            del self._remote[key]
            self._release(worker, blocks)
