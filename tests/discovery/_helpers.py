"""Helpers of the discovery tests: reading a watch with deadlines (the conformance kit's
:class:`WatchReader`), and polling a store until a condition holds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from troupe.testing.conformance import WatchReader
from troupe.testing.conformance._watch import apply, is_delete, is_put

__all__ = ["WatchReader", "apply", "is_delete", "is_put", "wait_until"]


async def wait_until(
    probe: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, what: str = ""
) -> None:
    """Await ``probe()`` until it returns True; fail the test at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await probe():
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what or probe!r}")
        await asyncio.sleep(0.05)  # the poll interval
