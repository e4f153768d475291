"""Reading a store's watch with deadlines: :class:`WatchReader`, and a materialised view."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from troupe.discovery import Delete, KeyValue, Put, Snapshot, Watch, WatchEvent
from troupe.errors import DiscoveryError

__all__ = ["WatchReader", "apply", "is_delete", "is_put"]


class WatchReader:
    """Reads a watch in a task of its own, so that a test waits for events with deadlines.

    Call :meth:`close` when done (it cancels the task and closes the watch). :attr:`ended` is
    set when the watch ends, normally (its store was closed) or with an error (:attr:`error`).
    """

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
        """The next event.

        Raises:
            AssertionError: no event within ``timeout`` seconds, or the watch ended.
            DiscoveryError: the watch failed with it.
        """
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
        """The next event, which must be a :class:`~troupe.discovery.Snapshot`."""
        event = await self.next(timeout)
        assert isinstance(event, Snapshot), f"expected a Snapshot first, got {event}"
        return event

    async def until(
        self, predicate: Callable[[WatchEvent], bool], timeout: float = 5.0
    ) -> WatchEvent:
        """Skip events until one satisfies ``predicate``; fail at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = await self.next(max(0.0, deadline - loop.time()))
            if predicate(event):
                return event

    async def none_until(self, predicate: Callable[[WatchEvent], bool], deadline: float) -> None:
        """Read events until the loop time ``deadline``; fail if one satisfies ``predicate``."""
        loop = asyncio.get_running_loop()
        while (left := deadline - loop.time()) > 0:
            try:
                event = await self.next(left)
            except AssertionError:
                if self.ended.is_set():
                    raise
                return  # nothing more arrived before the deadline
            assert not predicate(event), f"unexpected event {event}"

    async def close(self) -> None:
        """Stop reading and close the watch."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.watch.aclose()


def apply(view: dict[str, KeyValue], event: WatchEvent) -> None:
    """Apply a watch event to a materialised view (key → :class:`~troupe.discovery.KeyValue`)."""
    if isinstance(event, Snapshot):
        view.clear()
        view.update({kv.key: kv for kv in event.items})
    elif isinstance(event, Put):
        view[event.key] = event.kv
    elif isinstance(event, Delete):
        view.pop(event.key, None)


def is_delete(key: str) -> Callable[[WatchEvent], bool]:
    """A predicate: the event deletes ``key``."""
    return lambda event: isinstance(event, Delete) and event.key == key


def is_put(key: str) -> Callable[[WatchEvent], bool]:
    """A predicate: the event writes ``key``."""
    return lambda event: isinstance(event, Put) and event.key == key
