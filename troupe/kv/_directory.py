"""Who the KV-event publishers are, and how to ask one of them: the follower's other seam.

A follower needs two things besides the event stream: the set of live workers (from discovery:
the instances of the ``kv_events_query`` endpoint, each with its record's metadata) and a way to
send one of them a query. :class:`RouterDirectory` gets both from a
:class:`~troupe.actors.routing.Router` over the query endpoint: its snapshots are discovery's
view (every known instance, set-aside ones included), and ``generate(..., instance_id=...)``
reaches one worker directly over whatever request plane it registered.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from troupe.kv._query import KvQueryAnswer, decode_answer

if TYPE_CHECKING:  # troupe.actors.routing imports troupe.kv (its KV policy): no cycle at run time
    from troupe.actors.routing import Router, RouterSnapshot

__all__ = ["KvWorkerDirectory", "RouterDirectory"]


class KvWorkerDirectory(ABC):
    """The live KV-event publishers and their query endpoints."""

    @abstractmethod
    def members(self) -> AsyncIterator[Mapping[str, Mapping[str, Any]]]:
        """Yield the current workers (instance id -> record metadata), then again after every
        change; runs until cancelled."""

    @abstractmethod
    async def query(self, worker: str, request: dict[str, Any]) -> KvQueryAnswer:
        """Send ``request`` to ``worker``'s query endpoint and return its joined answer.

        Raises:
            TroupeError: the worker cannot be reached, refused, or answered garbage.
        """


class RouterDirectory(KvWorkerDirectory):
    """Workers and queries through a router over the ``kv_events_query`` endpoint."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def members(self) -> AsyncIterator[Mapping[str, Mapping[str, Any]]]:
        version = -1
        members: Mapping[str, Mapping[str, Any]] | None = None
        while True:

            def newer(snapshot: RouterSnapshot, seen: int = version) -> bool:
                return snapshot.version != seen

            snapshot = await self.router.wait_for_snapshot(newer)
            assert snapshot is not None  # no timeout
            version = snapshot.version
            current: Mapping[str, Mapping[str, Any]] = {
                i.instance_id: i.record.metadata for i in snapshot.instances
            }
            if current != members:  # a set-aside change alone is no news
                members = current
                yield current

    async def query(self, worker: str, request: dict[str, Any]) -> KvQueryAnswer:
        stream = self.router.generate(request, instance_id=worker)
        async with contextlib.aclosing(stream):
            chunks = [chunk async for chunk in stream]
        return decode_answer(chunks)
