"""Failure window: requests lost when a worker is SIGKILLed under load, troupe and NVIDIA Dynamo.

Each scenario runs two workers of ``troupe.demo:words`` (5 words over about 80 ms) and a load
(:mod:`benchmarks._failure_load`) during which the first chunk from one worker after ``kill_at``
triggers its ``kill -9``. troupe's workers are ``troupe worker`` processes (tcp plane on
127.0.0.1, file discovery in the scratch directory, no supervisor: the killed one stays dead);
this process routes with ``migration_limit=0`` and then ``3``. Scenarios, in order:

1. troupe at the default lease TTL (10 s): 10 requests a second (open loop), then 20 requests
   in flight (closed loop), each without and with migration;
2. NVIDIA Dynamo (``ai-dynamo-runtime``, when installed): two workers on its tcp plane with etcd
   discovery at its default lease TTL (30 s), its own client process, the same two loads; its
   runtime client has no migration;
3. troupe at a short lease TTL (2 s), 10 requests a second, without and with migration.

Each scenario's rows (:mod:`benchmarks._failure_rows`): requests failed; those started after the
kill that failed (NVIDIA Dynamo's own version of this test lost 32 of 100 counting these, routed
to the dead worker until its lease expired); kill → the dead instance gone; with migration, the
latency of the moved requests and the chunks a completed stream held twice. troupe's rows give
Dynamo's counts under the same load as their reference. The watcher's ``Left`` events are
collected after the last scenario, so the default TTL's wait overlaps the later scenarios.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks._dynamo_peer import (
    DYNAMO,
    DynamoProcesses,
    LoopbackViolation,
    unavailable,
    version,
)
from benchmarks._failure_load import DELAY, TEXT, Load, Outcome, from_dynamo, run_load
from benchmarks._failure_rows import rows as outcome_rows
from benchmarks._harness import BenchContext, Row
from benchmarks._procs import Event, Probe, WorkerProcesses, scrubbed_env
from troupe.actors import Joined, Left, Router
from troupe.config import (
    Config,
    DiscoveryConfig,
    FileKvConfig,
    LogConfig,
    RequestPlaneConfig,
    TcpConfig,
)
from troupe.messages import InstanceRecord
from troupe.runtime import Runtime

__all__ = ["SUITE", "run"]

SUITE = "failure"

DEFAULT_TTL = 10.0  # troupe's default DYN_LEASE_TTL
SHORT_TTL = 2.0
DYNAMO_TTL = 30.0  # NVIDIA Dynamo's default ETCD_LEASE_TTL
MIGRATION_LIMIT = 3
OPEN = Load(rate=10.0)
CLOSED = Load(inflight=20)
_PREFIX = "/services/bench/failure"


@dataclass(frozen=True)
class _Scenario:
    lease_ttl: float
    load: Load
    limit: int

    @property
    def endpoint(self) -> str:
        shape = f"r{self.load.rate:g}" if self.load.rate > 0 else f"f{self.load.inflight}"
        return f"bench.failure.t{self.lease_ttl:g}-{shape}-m{self.limit}"


@dataclass
class _Killed:
    """A troupe scenario whose victim's ``Left`` is looked for after the last scenario."""

    outcome: Outcome
    started: float  # time.monotonic() at the start of its load
    instance_id: str


def _timing(quick: bool) -> tuple[float, float]:
    """(duration, kill_at) of every scenario."""
    return (4.0, 1.0) if quick else (20.0, 5.0)


def run(ctx: BenchContext) -> list[Row]:
    """troupe at the default TTL, NVIDIA Dynamo, troupe at the short TTL; then the rows."""
    duration, kill_at = _timing(ctx.quick)
    kv_dir = ctx.scratch / "kv"
    kv_dir.mkdir(parents=True, exist_ok=True)
    killed: list[_Killed] = []
    peer: dict[Load, Outcome] = {}
    peer_rows: list[Row] = []
    with Runtime(_config(str(kv_dir)), handle_signals=False) as rt, Probe(rt, _PREFIX) as probe:
        seen = _Seen(probe)
        plan = [(DEFAULT_TTL, load, limit) for load in (OPEN, CLOSED) for limit in (0, 3)]
        killed += _troupe(ctx, rt, seen, kv_dir, plan, duration, kill_at)
        peer_rows = _dynamo(ctx, peer, duration, kill_at)
        plan = [(SHORT_TTL, OPEN, limit) for limit in (0, MIGRATION_LIMIT)]
        killed += _troupe(ctx, rt, seen, kv_dir, plan, duration, kill_at)
        for item in killed:
            _find_left(seen, item)
    rows: list[Row] = []
    for item in killed:
        rows += outcome_rows(item.outcome, peer.get(item.outcome.load))
    for outcome in peer.values():
        rows += outcome_rows(outcome, None)
    return rows + peer_rows


def _config(kv_dir: str) -> Config:
    return Config(
        discovery=DiscoveryConfig(backend="file", lease_ttl=10.0, file=FileKvConfig(path=kv_dir)),
        request_plane=RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1")),
        log=LogConfig(level="critical"),  # failures are counted here; no log lines needed
    )


class _Seen:
    """Every event the probe delivered, kept: a later search still finds an earlier Left."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.events: list[Event] = []

    def find(self, match: Callable[[Joined | Left], bool], deadline: float) -> Event | None:
        for kept in self.events:
            if match(kept.message):
                return kept
        while (event := self.probe.next(deadline)) is not None:
            self.events.append(event)
            if match(event.message):
                return event
        return None


# --- troupe ------------------------------------------------------------------------------------


def _troupe(
    ctx: BenchContext,
    rt: Runtime,
    seen: _Seen,
    kv_dir: Path,
    plan: list[tuple[float, Load, int]],
    duration: float,
    kill_at: float,
) -> list[_Killed]:
    """Start two workers per scenario (all at this TTL), run the scenarios one after another."""
    ttl = plan[0][0]
    env = scrubbed_env(
        {
            "DYN_DISCOVERY_BACKEND": "file",
            "DYN_FILE_KV": str(kv_dir),
            "DYN_LEASE_TTL": f"{ttl:g}",
            "DYN_REQUEST_PLANE": "tcp",
            "DYN_TCP_RPC_HOST": "127.0.0.1",
            "DYN_LOG": "error",
        }
    )
    scenarios = [_Scenario(*item) for item in plan]
    log_dir = ctx.scratch / f"ttl{ttl:g}"
    log_dir.mkdir(parents=True, exist_ok=True)
    made: list[_Killed] = []
    ctx.log(f"failure: lease TTL {ttl:g} s: starting {2 * len(scenarios)} troupe workers")
    with WorkerProcesses(log_dir, env) as pool:
        pairs = {s: [pool.start(s.endpoint) for _ in range(2)] for s in scenarios}
        ids = _wait_registered(seen, [p for pair in pairs.values() for p in pair], pool)
        for scenario in scenarios:
            victim = pairs[scenario][0]
            outcome = Outcome("troupe", ttl, scenario.load, scenario.limit, duration)
            started = _one(ctx, rt, scenario, victim, outcome, kill_at)
            made.append(_Killed(outcome, started, ids[victim.pid]))
    return made


def _one(
    ctx: BenchContext,
    rt: Runtime,
    scenario: _Scenario,
    victim: subprocess.Popen[bytes],
    outcome: Outcome,
    kill_at: float,
) -> float:
    router = rt.router(scenario.endpoint, policy="round_robin", migration_limit=scenario.limit)
    try:
        _wait_routable(router, 2)
        ctx.log(
            f"failure: troupe {scenario.endpoint}: {outcome.duration:g} s, {outcome.load.label}"
        )
        started = rt.io.run(
            run_load(router, victim.pid, outcome, kill_at), timeout=outcome.duration + 60
        )
    finally:
        router.close()
    WorkerProcesses.kill(victim)  # reaped (it is dead already)
    migrated = sum(1 for r in outcome.requests if r.migrated)
    ctx.log(
        f"failure: troupe {scenario.endpoint}: {outcome.failed} of {outcome.sent} failed "
        f"({dict(outcome.failures)}), {migrated} migrated"
    )
    return started


def _find_left(seen: _Seen, item: _Killed) -> None:
    outcome = item.outcome
    if outcome.killed_at is None:
        return
    deadline = item.started + outcome.killed_at + outcome.lease_ttl * 1.5 + 5.0
    event = seen.find(lambda m: isinstance(m, Left) and m.instance_id == item.instance_id, deadline)
    if event is not None:
        outcome.left_at = event.at - item.started


def _wait_registered(
    seen: _Seen, procs: list[subprocess.Popen[bytes]], pool: WorkerProcesses
) -> dict[int, str]:
    """pid → instance id of every worker, once each has registered."""
    ids: dict[int, str] = {}
    pids = {proc.pid for proc in procs}

    def joined(message: Joined | Left) -> bool:
        record = message.instance if isinstance(message, Joined) else None
        if isinstance(record, InstanceRecord) and record.pid in pids:
            ids.setdefault(record.pid, record.instance_id)
        return len(ids) == len(pids)

    seen.find(joined, time.monotonic() + 30.0)
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


# --- NVIDIA Dynamo -----------------------------------------------------------------------------


def _dynamo(
    ctx: BenchContext, into: dict[Load, Outcome], duration: float, kill_at: float
) -> list[Row]:
    """Both loads on Dynamo (tcp plane, etcd discovery); rows only when it could not run."""
    from troupe.testing.servers import EtcdServer  # noqa: PLC0415

    group = f"failure window: {DYNAMO}"
    reason = unavailable()
    if reason is not None:
        return [Row(group=group, name="skipped", value=math.nan, unit="", note=reason)]
    try:
        with EtcdServer() as etcd, DynamoProcesses(ctx, "tcp", etcd.url, None) as dynamo:
            for load in (OPEN, CLOSED):
                path = f"bench.failure.{'open' if load.rate > 0 else 'closed'}"
                victim = dynamo.worker(path, "words")
                dynamo.worker(path, "words")
                client = dynamo.client(path, instances=2)
                dynamo.check_loopback()
                ctx.log(f"failure: {DYNAMO} {path}: {duration:g} s, {load.label}")
                answer = client.ask(
                    {
                        "op": "failure",
                        "rate": load.rate,
                        "inflight": load.inflight,
                        "duration": duration,
                        "kill_at": kill_at,
                        "victim": victim.pid,
                        "text": TEXT,
                        "delay": DELAY,
                    },
                    timeout=duration + 60,
                )
                outcome = from_dynamo(answer, Outcome(DYNAMO, DYNAMO_TTL, load, 0, duration))
                into[load] = outcome
                ctx.log(
                    f"failure: {DYNAMO} {path}: {outcome.failed} of {outcome.sent} failed "
                    f"({dict(outcome.failures)})"
                )
                with contextlib.suppress(subprocess.TimeoutExpired):
                    victim.proc.wait(10)  # reap the killed worker now
    except LoopbackViolation:
        raise
    except Exception as exc:  # noqa: BLE001 - the peer failing must not hide troupe's rows
        ctx.log(f"failure: {DYNAMO} did not run: {exc!r}")
        note = f"{DYNAMO} {version()}: {type(exc).__name__}: {exc}"
        return [Row(group=group, name="did not run", value=math.nan, unit="", note=note)]
    return []
