"""Helpers for the KV event tests: a directory without discovery, a lossy publisher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec

from troupe.errors import TransportError
from troupe.events import Envelope, EventPublisher
from troupe.kv import KvCacheEvent, KvPublisher, KvView, KvWorkerDirectory, LocalKvIndexer
from troupe.kv._query import KvQueryAnswer, decode_answer, query_handler


class FakeDirectory(KvWorkerDirectory):
    """Workers set by the test; queries answered from their indexers in this process.

    ``fail`` makes the next N queries fail; ``gate``, when set, holds every query until it opens.
    """

    def __init__(self) -> None:
        self.indexers: dict[str, LocalKvIndexer] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.fail = 0
        self.gate: asyncio.Event | None = None
        self._changes: asyncio.Queue[dict[str, Mapping[str, Any]]] = asyncio.Queue()
        self._members: dict[str, Mapping[str, Any]] = {}

    def join(self, worker: str, indexer: LocalKvIndexer, block_size: int = 4) -> None:
        self.indexers[worker] = indexer
        self._members[worker] = {"kv_block_size": block_size}
        self._changes.put_nowait(dict(self._members))

    def leave(self, worker: str) -> None:
        self._members.pop(worker)
        self._changes.put_nowait(dict(self._members))

    async def members(self) -> AsyncIterator[Mapping[str, Mapping[str, Any]]]:
        yield {}
        while True:
            yield await self._changes.get()

    async def query(self, worker: str, request: dict[str, Any]) -> KvQueryAnswer:
        self.requests.append((worker, request))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise TransportError("worker unreachable")
        handler = query_handler(self.indexers[worker], chunk_events=3)
        return decode_answer([chunk async for chunk in handler(request, None)])


class Lossy(EventPublisher):
    """Publishes through ``inner`` except the events whose ids are in ``drop``."""

    def __init__(self, inner: EventPublisher, drop: set[int]) -> None:
        super().__init__(inner.scope, inner.topic, inner.publisher_id)
        self.inner = inner
        self.drop = drop

    async def publish(self, event: msgspec.Struct | bytes) -> Envelope:
        if isinstance(event, KvCacheEvent) and event.event_id in self.drop:
            return self._next(event)  # lost on the way
        return await self.inner.publish(event)

    async def close(self) -> None:
        await self.inner.close()


def rebuilt(publisher: KvPublisher) -> set[int]:
    """What the worker's dump rebuilds: what a follower must hold for it."""
    events, _ = publisher.indexer.dump()
    view = KvView()
    for event in events:
        view.apply("w", event)
    return view.blocks("w")


__all__ = ["FakeDirectory", "Lossy", "TransportError", "rebuilt"]
