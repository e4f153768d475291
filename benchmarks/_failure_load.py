"""The failure window's load and what it records: one request's outcome, one scenario's outcome.

Both runtimes are driven the same way (troupe here, on the runtime's I/O loop; NVIDIA Dynamo in
its client process, :func:`benchmarks._dynamo._failure`): requests of ``troupe.demo:words`` (5
words, 20 ms apart: about 80 ms each), either open loop (``rate`` requests a second whatever the
completions) or closed loop (``inflight`` callers, each sending its next request when the last
one ends), for ``duration`` seconds. The first chunk that arrives from the victim after
``kill_at`` seconds triggers its ``kill -9``, so the kill always lands on a request in flight.
Times are seconds from the start of the load.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from troupe.actors import Router
from troupe.errors import TroupeError

__all__ = ["DELAY", "TEXT", "WORDS", "Load", "Outcome", "Request", "run_load"]

TEXT = "one two three four five"
WORDS = len(TEXT.split())
DELAY = 0.02  # seconds between words: a request streams for about 80 ms
_HUNG = 30.0  # seconds: a request still open this long after the load ends is "hung"


@dataclass(frozen=True)
class Load:
    """Open loop (``rate`` > 0 requests a second) or closed loop (``inflight`` callers)."""

    rate: float = 0.0
    inflight: int = 0

    @property
    def label(self) -> str:
        return f"{self.rate:g} req/s" if self.rate > 0 else f"{self.inflight} in flight"


@dataclass(frozen=True)
class Request:
    """One request: when it started (s), how long it took, how it failed (None: complete)."""

    start: float
    latency: float
    failure: str | None
    migrated: bool = False
    duplicates: int = 0  # chunks received twice (same word index), in a completed stream


@dataclass
class Outcome:
    """One scenario: its settings and every request's outcome.

    ``killed_at`` (s from the start) is None when the victim never served a chunk after
    ``kill_at``; ``left_at`` is when the caller's side saw the dead instance leave (the
    watcher's ``Left`` for troupe), None if not within the run.
    """

    runtime: str
    lease_ttl: float
    load: Load
    migration_limit: int
    duration: float
    requests: list[Request] = field(default_factory=list)
    killed_at: float | None = None
    left_at: float | None = None

    @property
    def sent(self) -> int:
        return len(self.requests)

    @property
    def failures(self) -> Counter[str]:
        return Counter(r.failure for r in self.requests if r.failure is not None)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def left_after(self) -> float | None:
        """Seconds from the kill to the caller seeing the instance leave."""
        if self.killed_at is None or self.left_at is None:
            return None
        return self.left_at - self.killed_at


async def run_load(router: Router, victim: int, outcome: Outcome, kill_at: float) -> float:
    """Run ``outcome.load`` through ``router`` on this loop; the monotonic time it started."""
    load, duration = outcome.load, outcome.duration
    start = time.monotonic()

    def maybe_kill(chunk: Any) -> None:
        if outcome.killed_at is not None or not isinstance(chunk, dict):
            return
        now = time.monotonic() - start
        if now >= kill_at and chunk.get("pid") == victim:
            os.kill(victim, signal.SIGKILL)  # mid-stream; reaped after the run
            outcome.killed_at = now

    async def one() -> None:
        t0 = time.monotonic()
        seen: set[int] = set()
        chunks = 0
        migrated = False
        failure: str | None = "hung"  # if cancelled below
        try:
            async for chunk in router.generate({"text": TEXT, "delay": DELAY}):
                maybe_kill(chunk)
                seen.add(chunk["index"])
                chunks += 1
                migrated = migrated or chunk["attempt"] > 0
            failure = None if len(seen) == WORDS else "incomplete"
        except TroupeError as exc:
            failure = type(exc).__name__
        finally:
            outcome.requests.append(
                Request(
                    start=t0 - start,
                    latency=time.monotonic() - t0,
                    failure=failure,
                    migrated=migrated,
                    duplicates=chunks - len(seen) if failure is None else 0,
                )
            )

    async def caller() -> None:
        while time.monotonic() - start < duration:
            await one()

    tasks: list[asyncio.Task[None]] = []
    if load.rate > 0:
        for n in range(int(duration * load.rate)):
            await asyncio.sleep(max(0.0, start + n / load.rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(), name=f"bench-failure-request-{n}"))
    else:
        tasks = [
            asyncio.create_task(caller(), name=f"bench-failure-caller-{n}")
            for n in range(load.inflight)
        ]
    _, pending = await asyncio.wait(tasks, timeout=duration + _HUNG)
    for task in pending:
        task.cancel()  # its request is recorded as "hung"
    await asyncio.gather(*pending, return_exceptions=True)
    return start


def from_dynamo(answer: dict[str, Any], outcome: Outcome) -> Outcome:
    """Fill ``outcome`` from the Dynamo client's answer to a ``failure`` command."""
    outcome.requests = [
        Request(start=r["start"], latency=r["latency"], failure=r["failure"])
        for r in answer["records"]
    ]
    outcome.killed_at = answer["killed_at"]
    outcome.left_at = answer["gone_at"]
    return outcome
