"""Discovery rows: how fast a router learns who joined and left, and what routing costs.

Per backend (etcd, file, NATS; real servers on loopback, started here):

- **register → Joined**: one runtime registers an instance (``Runtime.register``, through its
  LeaseActor), another runtime's WatcherActor tells a subscriber (what a RouterActor is fed by);
  the time between the call and the ``Joined``. Also **unregister → Left**.
- **kill -9 → Left**: ``troupe worker`` processes with a short lease TTL are SIGKILLed; the time
  until ``Left``. It is dominated by the TTL (the lease must run out), which the note gives.
- **snapshot of 1,000**: 1,000 instances registered under one lease; the time from starting a new
  WatcherActor to its subscriber holding all 1,000.

And, backend-independent, the **router pick cost** with 2 and with 1,000 instances per policy:
the snapshot read plus the policy's choice (``Router._pick``, the private step ``generate`` runs
per attempt: no public path times it without a network round trip). It must not grow with the
number of instances: target ratio ≤ 1.5.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks._harness import BenchContext, Row, median, percentile
from benchmarks._procs import Event, Probe, WorkerProcesses, scrubbed_env
from troupe.actors import Joined, Left, Router
from troupe.config import (
    Config,
    DiscoveryConfig,
    EtcdConfig,
    FileKvConfig,
    LogConfig,
    NatsConfig,
    RequestPlaneConfig,
    TcpConfig,
)
from troupe.messages import InstanceRecord, encode_record, new_instance_id
from troupe.runtime import Runtime
from troupe.testing import EtcdServer, NatsServer

__all__ = ["SUITE", "run"]

SUITE = "discovery"

_POLICIES = ("round_robin", "random", "least_loaded")
_SNAPSHOT_SIZE = 1000
_PICK_TARGET = 1.5
_JITTER = 0.05  # seconds: the file store's poll interval
_FAKE_ADDRESS = {"tcp": "tcp://127.0.0.1:9"}  # never called: only discovery is measured


@dataclass(frozen=True)
class _Plan:
    """How much to do: counts, and which backends get the multi-process kill rows."""

    joins: int
    kill_backends: tuple[str, ...]
    kill_reps: int
    kill_ttl: float
    picks: int
    repetitions: int

    @classmethod
    def of(cls, ctx: BenchContext) -> _Plan:
        if ctx.quick:
            return cls(20, ("etcd", "file"), 2, 1.0, 20_000, ctx.repetitions)
        return cls(100, ("etcd", "file", "nats"), 3, 1.0, 200_000, ctx.repetitions)


@dataclass(frozen=True)
class _Servers:
    etcd: EtcdServer
    nats: NatsServer
    scratch: Path

    def config(self, backend: str, ttl: float) -> Config:
        """A runtime configuration on ``backend``: loopback only, quiet logs."""
        return Config(
            discovery=DiscoveryConfig(
                backend=backend,
                lease_ttl=ttl,
                etcd=EtcdConfig(endpoints=(self.etcd.url,)),
                file=FileKvConfig(path=str(self.scratch / "kv")),
            ),
            nats=NatsConfig(server=self.nats.url),
            request_plane=RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1")),
            log=LogConfig(level="error"),
        )

    def env(self, backend: str, ttl: float) -> dict[str, str]:
        """The same configuration as environment variables, for worker processes."""
        return scrubbed_env(
            {
                "DYN_DISCOVERY_BACKEND": backend,
                "DYN_LEASE_TTL": f"{ttl:g}",
                "ETCD_ENDPOINTS": self.etcd.url,
                "NATS_SERVER": self.nats.url,
                "DYN_FILE_KV": str(self.scratch / "kv"),
                "DYN_REQUEST_PLANE": "tcp",
                "DYN_TCP_RPC_HOST": "127.0.0.1",
                "DYN_LOG": "error",
            }
        )


def run(ctx: BenchContext) -> list[Row]:
    """Start etcd and NATS on loopback, measure every backend, then the router pick cost."""
    plan = _Plan.of(ctx)
    rows: list[Row] = []
    with EtcdServer() as etcd, NatsServer() as nats:
        servers = _Servers(etcd, nats, ctx.scratch)
        for backend in ("etcd", "file", "nats"):
            ctx.log(f"discovery: {backend}")
            rows += _backend_rows(ctx, plan, servers, backend)
    ctx.log("discovery: router pick cost")
    rows += _pick_rows(ctx, plan)
    return rows


@contextlib.contextmanager
def _runtime(config: Config) -> Iterator[Runtime]:
    with Runtime(config, handle_signals=False) as rt:
        yield rt


def _ms(seconds: list[float]) -> list[float]:
    return [s * 1000.0 for s in seconds]


def _latency_row(
    group: str, name: str, seconds: list[float], attempted: int, note: str = ""
) -> Row:
    values = _ms(seconds)
    missing = attempted - len(values)
    if missing:
        note = (
            f"{note}; {missing} of {attempted} not seen in time"
            if note
            else (f"{missing} of {attempted} not seen in time")
        )
    return Row(
        group=group,
        name=name,
        value=median(values),
        unit="ms",
        p99=percentile(values, 99) if values else None,
        note=note,
        samples=values,
    )


def _backend_rows(ctx: BenchContext, plan: _Plan, servers: _Servers, backend: str) -> list[Row]:
    group = f"discovery: {backend}"
    rows: list[Row] = []
    with (
        _runtime(servers.config(backend, 10.0)) as watching,
        _runtime(servers.config(backend, 10.0)) as registering,
    ):
        rows += _join_rows(ctx, plan, group, watching, registering)
        rows.append(_snapshot_row(ctx, plan, group, watching, registering))
        if backend in plan.kill_backends:
            rows.append(_kill_row(ctx, plan, group, servers, backend, watching))
    return rows


# --- register → Joined, unregister → Left ------------------------------------------------------


def _join_rows(
    ctx: BenchContext, plan: _Plan, group: str, watching: Runtime, registering: Runtime
) -> list[Row]:
    joined: list[float] = []
    left: list[float] = []
    suite_deadline = time.monotonic() + 30.0
    rng = random.Random(8)
    with Probe(watching, "/services/bench/join") as probe:
        # Warm-up: the first registration grants the lease and opens the store's paths.
        record = registering.register("bench", "join", "warmup", _FAKE_ADDRESS)
        probe.wait_for(_is_joined(record.key), timeout=10)
        registering.unregister(record)
        probe.wait_for(_is_left(record.key), timeout=10)
        for index in range(plan.joins):
            if time.monotonic() > suite_deadline:
                break
            # A random pause, so that polling stores (file) are not phase-locked to the loop.
            time.sleep(rng.uniform(0.0, _JITTER))
            t0 = time.monotonic()
            record = registering.register("bench", "join", f"e{index}", _FAKE_ADDRESS)
            event = probe.wait_for(_is_joined(record.key), timeout=5)
            if event is not None:
                joined.append(event.at - t0)
            time.sleep(rng.uniform(0.0, _JITTER))
            t0 = time.monotonic()
            registering.unregister(record)
            event = probe.wait_for(_is_left(record.key), timeout=5)
            if event is not None:
                left.append(event.at - t0)
    ctx.log(f"{group}: {len(joined)} joins, p50 {median(_ms(joined)):.1f} ms")
    via = (
        "Runtime.register (LeaseActor) in one runtime → WatcherActor subscriber in another; "
        f"random 0-{_JITTER * 1000:.0f} ms pauses between operations (file polls every 50 ms)"
    )
    return [
        _latency_row(group, "register → Joined", joined, plan.joins, via),
        _latency_row(group, "unregister → Left", left, plan.joins),
    ]


def _is_joined(key: str) -> _Match:
    return _Match(Joined, key)


def _is_left(key: str) -> _Match:
    return _Match(Left, key)


@dataclass(frozen=True)
class _Match:
    kind: type[Joined] | type[Left]
    key: str

    def __call__(self, message: Joined | Left) -> bool:
        return isinstance(message, self.kind) and message.key == self.key


# --- snapshot of 1,000 ---------------------------------------------------------------------------


def _snapshot_row(
    ctx: BenchContext, plan: _Plan, group: str, watching: Runtime, registering: Runtime
) -> Row:
    store = registering.store  # used on its own runtime's I/O loop only

    async def fill() -> int:
        lease = await store.grant_lease(120.0)
        records = [
            InstanceRecord.create(
                "bench", "snap", "e", instance_id=new_instance_id(), transport=_FAKE_ADDRESS
            )
            for _ in range(_SNAPSHOT_SIZE)
        ]
        for start in range(0, len(records), 50):
            batch = records[start : start + 50]
            await asyncio.gather(*(store.put(r.key, encode_record(r), lease=lease) for r in batch))
        return lease

    owner = registering.io
    t0 = time.monotonic()
    lease = owner.run(fill(), timeout=120)
    ctx.log(f"{group}: 1,000 registered in {time.monotonic() - t0:.1f} s")
    seconds: list[float] = []
    try:
        for _ in range(plan.repetitions):
            started = time.monotonic()
            seen: set[str] = set()
            last: Event | None = None
            with Probe(watching, "/services/bench/snap") as probe:
                deadline = started + 30.0
                while len(seen) < _SNAPSHOT_SIZE and (event := probe.next(deadline)):
                    if isinstance(event.message, Joined):
                        seen.add(event.message.key)
                        last = event
            if len(seen) < _SNAPSHOT_SIZE or last is None:
                break
            seconds.append(last.at - started)
        ctx.log(f"{group}: snapshot of 1,000 in {median(_ms(seconds)):.0f} ms")
    finally:
        owner.run(store.revoke_lease(lease), timeout=30)
    return _latency_row(
        group,
        "new watcher: snapshot of 1,000",
        seconds,
        plan.repetitions,
        "WatcherActor start → its subscriber holds 1,000 Joined (records decoded)",
    )


# --- kill -9 → Left ------------------------------------------------------------------------------


def _kill_row(
    ctx: BenchContext,
    plan: _Plan,
    group: str,
    servers: _Servers,
    backend: str,
    watching: Runtime,
) -> Row:
    env = servers.env(backend, plan.kill_ttl)
    log_dir = servers.scratch / f"workers-{backend}"
    log_dir.mkdir(parents=True, exist_ok=True)
    seconds: list[float] = []
    with Probe(watching, "/services/bench/kill") as probe, WorkerProcesses(log_dir, env) as pool:
        procs = [pool.start("bench.kill.words") for _ in range(plan.kill_reps)]
        ids: dict[int, str] = {}  # pid -> instance id
        pids = {proc.pid for proc in procs}
        deadline = time.monotonic() + 30.0
        while len(ids) < len(procs) and (event := probe.next(deadline)):
            record = event.message.instance if isinstance(event.message, Joined) else None
            if isinstance(record, InstanceRecord) and record.pid in pids:
                ids[record.pid] = record.instance_id
        for proc in procs:
            if proc.pid not in ids:
                raise RuntimeError(
                    f"worker {proc.pid} did not register on {backend}: {pool.log_tail(proc)}"
                )
        killed_at: dict[str, float] = {}
        for proc in procs:
            killed_at[ids[proc.pid]] = time.monotonic()
            WorkerProcesses.kill(proc)
        deadline = time.monotonic() + plan.kill_ttl * 3 + 10.0
        while killed_at and (event := probe.next(deadline)):
            message = event.message
            if isinstance(message, Left) and message.instance_id in killed_at:
                seconds.append(event.at - killed_at.pop(message.instance_id))
        _reap(procs)
    ctx.log(f"{group}: kill → Left p50 {median(_ms(seconds)):.0f} ms")
    return _latency_row(
        group,
        "kill -9 → Left",
        seconds,
        plan.kill_reps,
        f"DYN_LEASE_TTL={plan.kill_ttl:g} s, {plan.kill_reps} workers killed together: the "
        "time is the lease running out, not the watch (expect between TTL minus one keep-alive "
        "period, TTL/3, and TTL plus the store's expiry check)",
    )


def _reap(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.wait(10)


# --- router pick cost ----------------------------------------------------------------------------


def _pick_rows(ctx: BenchContext, plan: _Plan) -> list[Row]:
    rows: list[Row] = []
    config = Config(
        discovery=DiscoveryConfig(backend="memory"),
        request_plane=RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1")),
        log=LogConfig(level="error"),
    )
    with _runtime(config) as rt:
        store = rt.store

        async def fill(endpoint: str, count: int) -> None:
            lease = await store.grant_lease(600.0)
            for _ in range(count):
                record = InstanceRecord.create(
                    "bench",
                    "pick",
                    endpoint,
                    instance_id=new_instance_id(),
                    transport=_FAKE_ADDRESS,
                )
                await store.put(record.key, encode_record(record), lease=lease)

        rt.io.run(fill("two", 2), timeout=30)
        rt.io.run(fill("many", _SNAPSHOT_SIZE), timeout=60)
        for policy in _POLICIES:
            small = _ready_router(rt, "bench.pick.two", policy, 2)
            large = _ready_router(rt, "bench.pick.many", policy, _SNAPSHOT_SIZE)
            small_ns: list[float] = []
            large_ns: list[float] = []
            for _ in range(plan.repetitions):  # interleaved, so drift hits both alike
                small_ns.append(_time_pick(small, plan.picks))
                large_ns.append(_time_pick(large, plan.picks))
            small.close()
            large.close()
            rows.append(
                Row(
                    group="router pick",
                    name=f"{policy}, 1,000 instances",
                    value=median(large_ns),
                    unit="ns",
                    reference="2 instances",
                    reference_value=median(small_ns),
                    higher_is_better=False,
                    target=_PICK_TARGET,
                    note="Router._pick (snapshot read + policy choice), private: no public path "
                    "times it without a round trip"
                    if policy == _POLICIES[0]
                    else "",
                    samples=large_ns,
                )
            )
            ctx.log(
                f"discovery: pick {policy}: {median(small_ns):.0f} ns (2) vs "
                f"{median(large_ns):.0f} ns (1,000)"
            )
    return rows


def _ready_router(rt: Runtime, endpoint: str, policy: str, count: int) -> Router:
    router = rt.router(endpoint, policy=policy)
    deadline = time.monotonic() + 30.0
    while len(router.snapshot.instances) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"router saw {len(router.snapshot.instances)} of {count}")
        time.sleep(0.01)  # the actor publishes as the watch's snapshot arrives
    return router


def _time_pick(router: Router, count: int) -> float:
    """Nanoseconds per pick over ``count`` picks."""
    pick = router._pick
    t0 = time.perf_counter()
    for _ in range(count):
        pick(None, None)  # a first attempt: no instance named, nothing tried yet
    return (time.perf_counter() - t0) / count * 1e9
