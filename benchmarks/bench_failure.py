"""Failure window: requests lost when a worker is SIGKILLed under load, without and with migration.

Two ``troupe worker`` processes (tcp plane on 127.0.0.1, file discovery in the scratch
directory, no supervisor: the killed one stays dead) serve ``troupe.demo:words``; each request
streams 5 words over about 80 ms. A caller sends 10 requests a second, open loop (one every
100 ms whatever the completions), for 20 s (quick: 8 s). At 5 s (quick: 2 s) the first chunk
that arrives from the victim triggers its ``kill -9``, so the kill always lands on a request in
flight: with requests of ~80 ms arriving every 100 ms, about one request is on the victim at that
moment, by construction. Each scenario (``migration_limit=0``, then with migration) gives:

- the requests that failed, all of them (the in-flight one(s) above included);
- the requests *started after the kill* that failed: those the router sends while the dead
  worker is still registered, until its lease runs out and the watcher reports it ``Left`` (the
  router must stop routing to it on its own) — and how many of them started before that Left;
- the time from the kill until the watcher saw ``Left``.

The reference system lost 32 of 100 requests in its version of this test, counting the requests
routed to the dead worker until its lease expired: the "started after the kill" row is the one
comparable with it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from benchmarks._harness import BenchContext, Row, median, percentile
from benchmarks._procs import Probe, WorkerProcesses, scrubbed_env
from troupe.actors import Joined, Left, Router
from troupe.config import (
    Config,
    DiscoveryConfig,
    FileKvConfig,
    LogConfig,
    RequestPlaneConfig,
    TcpConfig,
)
from troupe.discovery import InstanceRecord
from troupe.errors import TroupeError
from troupe.runtime import Runtime

__all__ = ["SUITE", "run"]

SUITE = "failure"
GROUP = "failure window"

_TEXT = "one two three four five"
_WORDS = len(_TEXT.split())
_DELAY = 0.02  # seconds between words: a request streams for about 80 ms
_RATE = 10.0  # requests per second, open loop
_LEASE_TTL = 2.0  # the workers' DYN_LEASE_TTL
_MIGRATION_LIMIT = 3
_REFERENCE = "reference system: 32 of 100 failed"


@dataclass
class _Outcome:
    """What one scenario saw."""

    sent: int = 0
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    migrated: int = 0
    latencies: list[float] = field(default_factory=list)
    killed_at: float | None = None  # seconds after the first request
    left_after: float | None = None  # seconds from the kill to the watcher's Left
    kill_clock: float | None = None  # time.monotonic() of the kill
    # (time.monotonic() at the start, failure kind or None) of every request, once it ended.
    requests: list[tuple[float, str | None]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


def run(ctx: BenchContext) -> list[Row]:
    """Start four workers (two per scenario), run without migration, then with it."""
    duration, kill_at = (8.0, 2.0) if ctx.quick else (20.0, 5.0)
    kv_dir = ctx.scratch / "kv"
    kv_dir.mkdir(parents=True, exist_ok=True)
    env = scrubbed_env(
        {
            "DYN_DISCOVERY_BACKEND": "file",
            "DYN_FILE_KV": str(kv_dir),
            "DYN_LEASE_TTL": f"{_LEASE_TTL:g}",
            "DYN_REQUEST_PLANE": "tcp",
            "DYN_TCP_RPC_HOST": "127.0.0.1",
            "DYN_LOG": "error",
        }
    )
    rows: list[Row] = []
    limits = (0, _MIGRATION_LIMIT)
    ctx.log("failure: starting four workers (two per scenario)")
    with (
        Runtime(_config(str(kv_dir)), handle_signals=False) as rt,
        WorkerProcesses(ctx.scratch, env) as pool,
        Probe(rt, "/services/bench/failure") as probe,
    ):
        pairs = {limit: [pool.start(_endpoint(limit)) for _ in range(2)] for limit in limits}
        ids = _wait_registered(probe, [p for pair in pairs.values() for p in pair], pool)
        for limit in limits:
            outcome = _scenario(ctx, rt, probe, pairs[limit], ids, limit, duration, kill_at)
            rows += _rows(outcome, limit, duration)
    return rows


def _endpoint(limit: int) -> str:
    return f"bench.failure.m{limit}"


def _config(kv_dir: str) -> Config:
    return Config(
        discovery=DiscoveryConfig(backend="file", lease_ttl=10.0, file=FileKvConfig(path=kv_dir)),
        request_plane=RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1")),
        log=LogConfig(level="critical"),  # failures are counted here; no log lines needed
    )


def _scenario(
    ctx: BenchContext,
    rt: Runtime,
    probe: Probe,
    procs: list[subprocess.Popen[bytes]],
    ids: dict[int, str],
    limit: int,
    duration: float,
    kill_at: float,
) -> _Outcome:
    """One run of the load against ``procs`` (two workers); the first is killed."""
    router = rt.router(_endpoint(limit), policy="round_robin", migration_limit=limit)
    try:
        _wait_routable(router, 2)
        victim = procs[0]
        outcome = _Outcome()
        ctx.log(f"failure: migration_limit={limit}: {duration:g} s at {_RATE:g} requests/s")
        kill_clock = rt.io.run(
            _load(router, victim, outcome, duration, kill_at), timeout=duration + 60
        )
    finally:
        router.close()
    WorkerProcesses.kill(victim)  # reaped (it is dead already)
    outcome.kill_clock = kill_clock
    if kill_clock is not None:
        event = probe.wait_for(
            lambda m: isinstance(m, Left) and m.instance_id == ids[victim.pid],
            timeout=max(0.0, kill_clock + _LEASE_TTL * 3 + 5.0 - time.monotonic()),
        )
        if event is not None:
            outcome.left_after = event.at - kill_clock
    ctx.log(
        f"failure: migration_limit={limit}: {outcome.failed} of {outcome.sent} failed "
        f"({dict(outcome.failures)}), {outcome.migrated} migrated"
    )
    return outcome


def _wait_registered(
    probe: Probe, procs: list[subprocess.Popen[bytes]], pool: WorkerProcesses
) -> dict[int, str]:
    """pid → instance id of every worker, once each has registered."""
    ids: dict[int, str] = {}
    pids = {proc.pid for proc in procs}
    deadline = time.monotonic() + 30.0
    while len(ids) < len(procs) and (event := probe.next(deadline)):
        record = event.message.instance if isinstance(event.message, Joined) else None
        if isinstance(record, InstanceRecord) and record.pid in pids:
            ids[record.pid] = record.instance_id
    for proc in procs:
        if proc.pid not in ids:
            raise RuntimeError(f"worker {proc.pid} did not register: {pool.log_tail(proc)}")
    return ids


def _wait_routable(router: Router, count: int) -> None:
    deadline = time.monotonic() + 30.0
    while len(router.snapshot.available) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the router sees {len(router.snapshot.available)} of {count}")
        time.sleep(0.01)  # the RouterActor publishes as its watcher's events arrive


async def _load(
    router: Router,
    victim: subprocess.Popen[bytes],
    outcome: _Outcome,
    duration: float,
    kill_at: float,
) -> float | None:
    """Send the open-loop requests on the runtime's I/O loop; the kill's monotonic time."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    kill_clock: float | None = None

    def maybe_kill(chunk: Any) -> None:
        nonlocal kill_clock
        if (
            kill_clock is None
            and loop.time() - start >= kill_at
            and isinstance(chunk, dict)
            and chunk.get("pid") == victim.pid
        ):
            os.kill(victim.pid, signal.SIGKILL)  # mid-stream; reaped after the run
            kill_clock = time.monotonic()
            outcome.killed_at = loop.time() - start

    async def one() -> None:
        started = time.monotonic()  # the kill's clock; uvloop's loop.time() has another base
        failure: str | None = "hung"  # if cancelled below
        try:
            failure = await attempt()
        finally:
            outcome.requests.append((started, failure))

    async def attempt() -> str | None:
        t0 = loop.time()
        seen: set[int] = set()
        attempts: set[int] = set()
        try:
            async for chunk in router.generate({"text": _TEXT, "delay": _DELAY}):
                maybe_kill(chunk)
                seen.add(chunk["index"])
                attempts.add(chunk["attempt"])
        except TroupeError as exc:
            outcome.failures[type(exc).__name__] += 1
            return type(exc).__name__
        if len(seen) != _WORDS:
            outcome.failures["incomplete"] += 1
            return "incomplete"
        outcome.ok += 1
        outcome.latencies.append(loop.time() - t0)
        if max(attempts) > 0:
            outcome.migrated += 1
        return None

    total = int(duration * _RATE)
    tasks: list[asyncio.Task[None]] = []
    for n in range(total):
        await asyncio.sleep(max(0.0, start + n / _RATE - loop.time()))
        tasks.append(asyncio.create_task(one(), name=f"bench-failure-request-{n}"))
        outcome.sent += 1
    done, pending = await asyncio.wait(tasks, timeout=30.0)
    for task in pending:
        task.cancel()
        outcome.failures["hung"] += 1
    await asyncio.gather(*pending, return_exceptions=True)
    del done
    return kill_clock


def _rows(outcome: _Outcome, limit: int, duration: float) -> list[Row]:
    label = "without migration" if limit == 0 else "with migration"
    kill = f"{outcome.killed_at:.2f} s" if outcome.killed_at is not None else "never (!)"
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(outcome.failures.items())) or "none"
    ms = [s * 1000.0 for s in outcome.latencies]
    note = (
        f"of {outcome.sent} requests ({_RATE:g}/s open loop for {duration:g} s, 2 workers, "
        f"kill -9 of one at {kill}, triggered by the victim's first chunk after that time: with "
        f"~80 ms requests every 100 ms, about one request is in flight on it by construction); "
        f"failures: {kinds}"
    )
    if limit:
        note += f"; migration_limit={limit}, {outcome.migrated} requests migrated"
    if ms:
        note += f"; completed requests p50 {median(ms):.0f} ms, p99 {percentile(ms, 99):.0f} ms"
    rows = [
        Row(
            group=GROUP,
            name=f"failed {label}",
            value=float(outcome.failed),
            unit="failed",
            reference=_REFERENCE,
            higher_is_better=False,
            note=note,
            samples=[float(outcome.failed)],
        )
    ]
    rows.append(_after_kill_row(outcome, label))
    left = outcome.left_after
    rows.append(
        Row(
            group=GROUP,
            name=f"kill -9 → Left ({label})",
            value=left * 1000.0 if left is not None else float("nan"),
            unit="ms",
            note=f"workers' DYN_LEASE_TTL={_LEASE_TTL:g} s, file discovery: the lease running "
            "out dominates" + ("" if left is not None else "; Left NOT seen in time"),
        )
    )
    return rows


def _after_kill_row(outcome: _Outcome, label: str) -> Row:
    """Failures among the requests started after the kill (the reference's measure)."""
    name = f"failed, started after the kill ({label})"
    kill = outcome.kill_clock
    if kill is None:
        return Row(group=GROUP, name=name, value=float("nan"), unit="failed", note="no kill")
    after = [(t, failure) for t, failure in outcome.requests if t >= kill]
    failed = [failure for _, failure in after if failure is not None]
    note = f"{len(failed)} of the {len(after)} requests started after the kill -9 failed"
    left = outcome.left_after
    if left is not None:
        window = [failure for t, failure in after if t < kill + left]
        lost = sum(1 for failure in window if failure is not None)
        note += (
            f"; {len(window)} of them started before the watcher's Left ({left * 1000:.0f} ms "
            f"after the kill), {lost} of those failed"
        )
    else:
        note += "; Left NOT seen in time"
    kinds = Counter(failed)
    if kinds:
        note += "; " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    note += (
        "; the reference's 32 of 100 counted requests routed to the dead worker until its "
        "lease expired: this row is the comparable one"
    )
    return Row(
        group=GROUP,
        name=name,
        value=float(len(failed)),
        unit="failed",
        reference=_REFERENCE,
        higher_is_better=False,
        note=note,
        samples=[float(len(failed))],
    )
