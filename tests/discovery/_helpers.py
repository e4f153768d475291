"""Helpers of the discovery tests: reading a watch with deadlines, materialising a view."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from troupe.discovery import Delete, KeyValue, KeyValueStore, Put, Snapshot, Watch, WatchEvent
from troupe.errors import DiscoveryError

StoreFactory = Callable[[], Awaitable[KeyValueStore]]
"""Makes a connected store; every store of one factory sees the same data."""


class WatchReader:
    """Reads a watch in a background task so that tests can wait for events with deadlines."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.events: list[WatchEvent] = []
        self.error: BaseException | None = None
        self.ended = asyncio.Event()
        self._queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name=f"WatchReader-{watch.prefix}")

    async def _run(self) -> None:
        try:
            async for event in self.watch:
                self.events.append(event)
                self._queue.put_nowait(event)
        except DiscoveryError as exc:
            self.error = exc
        finally:
            self.ended.set()

    async def next(self, timeout: float = 5.0) -> WatchEvent:
        """The next event; fails the test at the deadline (or if the watch failed)."""
        get = asyncio.ensure_future(self._queue.get())
        ended = asyncio.ensure_future(self.ended.wait())
        try:
            done, _ = await asyncio.wait(
                {get, ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ended.cancel()
            if not get.done():
                get.cancel()
        if get in done:
            return get.result()
        if self.error is not None:
            raise self.error
        if self.ended.is_set():
            raise AssertionError(f"watch ended; saw {self.events}")
        raise AssertionError(f"no event within {timeout:g} s; saw {self.events}")

    async def snapshot(self, timeout: float = 5.0) -> Snapshot:
        event = await self.next(timeout)
        assert isinstance(event, Snapshot), event
        return event

    async def until(
        self, predicate: Callable[[WatchEvent], bool], timeout: float = 5.0
    ) -> WatchEvent:
        """Skip events until one satisfies ``predicate``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = await self.next(max(0.0, deadline - loop.time()))
            if predicate(event):
                return event

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.watch.aclose()


def apply(view: dict[str, KeyValue], event: WatchEvent) -> None:
    """Apply a watch event to a materialised view."""
    if isinstance(event, Snapshot):
        view.clear()
        view.update({kv.key: kv for kv in event.items})
    elif isinstance(event, Put):
        view[event.key] = event.kv
    elif isinstance(event, Delete):
        view.pop(event.key, None)


def is_delete(key: str) -> Callable[[WatchEvent], bool]:
    return lambda event: isinstance(event, Delete) and event.key == key


def is_put(key: str) -> Callable[[WatchEvent], bool]:
    return lambda event: isinstance(event, Put) and event.key == key


async def wait_until(
    probe: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, what: str = ""
) -> None:
    """Await ``probe()`` until it returns True; fail the test at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await probe():
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what or probe!r}")
        await asyncio.sleep(0.05)
