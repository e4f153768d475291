"""Waiting on conditions with a deadline, for tests: never sleep-then-assert."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["eventually", "eventually_async"]

T = TypeVar("T")


def eventually(
    probe: Callable[[], T], *, timeout: float = 5.0, interval: float = 0.005, what: str = ""
) -> T:
    """Call ``probe`` until it returns something truthy, and return that; fail at the deadline.

    Raises:
        AssertionError: the probe never became truthy within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout:g} s: {what or probe!r}")
        time.sleep(interval)


async def eventually_async(
    probe: Callable[[], T], *, timeout: float = 5.0, interval: float = 0.005, what: str = ""
) -> T:
    """:func:`eventually` for coroutines: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout:g} s: {what or probe!r}")
        await asyncio.sleep(interval)
