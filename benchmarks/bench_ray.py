"""The Ray peer rows: the same round trip as a Ray actor method call, 64 in flight, and a stream.

Ray is the peer troupe's tcp plane is held against (issue 8: at least 5x Ray's actor call on
latency and throughput, 10x on streamed chunks). The rows are produced with ``reference=None``;
:data:`RAY_TARGETS` names the factors and :func:`versus` turns them into the "troupe tcp vs Ray"
comparison rows.

troupe's side of that comparison is measured here too, interleaved: a ``troupe worker`` on the
tcp plane (file discovery in the suite's scratch directory) runs next to Ray, and each
repetition of a Ray figure is followed at once by the same figure on troupe, with the planes
suite's code (:mod:`benchmarks.bench_planes`: its handler, its loops, its sizes) — the rows
``troupe tcp: <figure>``. Only when those are missing does :func:`versus` fall back to the
planes suite's tcp rows, measured minutes apart, and says so.

Ray binds to the machine's interface address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is
set before it is imported: this suite sets it (and turns usage reporting off), starts a local
Ray bound to 127.0.0.1, and checks with ``ss`` that no process of Ray's tree listens on, or is
connected to, anything but loopback; a violation stops the suite at once.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks._harness import (
    BenchContext,
    Row,
    median,
    percentile,
    process_cpu_seconds,
    self_cpu_seconds,
)
from benchmarks._procs import descendants, foreign_peers, listeners, non_loopback
from benchmarks._troupe_side import TroupeSide

__all__ = ["RAY_TARGETS", "SUITE", "TCP_ROWS", "TROUPE_PREFIX", "run", "versus"]

SUITE = "ray"
GROUP = "ray"

RAY_TARGETS: dict[str, float] = {
    "round trip p50": 5.0,
    "throughput @64": 5.0,
    "stream 100 chunks": 10.0,
}
"""Ray row name → how many times better troupe's tcp plane must be (issue 8, point 6).

Latency: Ray's µs ÷ troupe's µs; throughput and streams: troupe's rate ÷ Ray's rate."""

TCP_ROWS: dict[str, tuple[str, str]] = {
    "round trip p50": ("tcp", "round trip p50"),
    "throughput @64": ("tcp", "throughput @64"),
    "stream 100 chunks": ("tcp", "stream 100 chunks"),
}
"""Ray row name → the (group, name) of the planes suite's row it is compared with, when this
suite has no interleaved ``troupe tcp: <name>`` row of its own."""

TROUPE_PREFIX = "troupe tcp: "
"""This suite's troupe rows are named ``TROUPE_PREFIX + <Ray row name>``."""

_PAYLOAD = b"x" * 1024
_CHUNK = b"x" * 64
_CHUNKS = 100
_IN_FLIGHT = 64
_LATENCY = frozenset({"round trip p50"})


def run(ctx: BenchContext) -> list[Row]:
    """Start a loopback-only local Ray, measure the three rows, shut Ray down."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray on 127.0.0.1
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage report to the outside world
    try:
        ray: Any = importlib.import_module("ray")
    except ImportError:
        return [
            Row(
                group=GROUP,
                name="skipped",
                value=math.nan,
                unit="",
                note="ray not installed: pip install 'troupe[bench]'",
            )
        ]
    constants: Any = importlib.import_module("ray._private.ray_constants")
    if constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            "ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: it would "
            "bind to the machine's interface address; run this suite in a fresh process"
        )
    return _Bench(ctx, ray).run()


class _Bench:
    """One local Ray session and the measurements made in it."""

    def __init__(self, ctx: BenchContext, ray: Any) -> None:
        self.ctx = ctx
        self.ray = ray
        quick = ctx.quick
        self.warmup = 50 if quick else 500
        self.calls = 300 if quick else 3000
        self.tp_calls = 800 if quick else 10_000
        self.streams = 8 if quick else 60
        self.time_limit = 3.0 if quick else 20.0  # per repetition of each figure
        self.repetitions = ctx.repetitions
        self.exclude: set[int] = set()  # troupe's worker: not part of Ray's CPU

    def run(self) -> list[Row]:
        ray, ctx = self.ray, self.ctx
        started = time.monotonic()
        ctx.log("ray: starting a local Ray on 127.0.0.1")
        try:
            ray.init(
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                num_cpus=2,
                log_to_driver=False,
                configure_logging=False,
                logging_level=logging.WARNING,
                object_store_memory=128 * 1024 * 1024,
                _temp_dir=str(ctx.scratch / "ray"),
            )
            actor = self._actor()
            ray.get(actor.echo.remote(b""), timeout=60)
            ctx.log(f"ray: up in {time.monotonic() - started:.1f} s")
            with TroupeSide(ctx, "tcp", label="ray") as troupe:
                self.exclude = troupe.pids
                checked = self._check_loopback()
                rows = [
                    self._round_trip(actor, after=troupe.rtt),
                    self._throughput(actor, after=troupe.tp),
                    self._stream(actor, after=troupe.stream),
                ]
                checked += self._check_loopback()
                for row in rows:
                    row.note = (row.note + "; " if row.note else "") + checked_note(checked)
                note = "each repetition right after Ray's, in this suite; the planes suite's code"
                return rows + troupe.rows(GROUP, TROUPE_PREFIX, note)
        finally:
            ray.shutdown()
            ctx.log(f"ray: shut down after {time.monotonic() - started:.1f} s")

    def _actor(self) -> Any:
        ray = self.ray

        class Echo:
            def echo(self, data: bytes) -> bytes:
                return data

            def stream(self, count: int, chunk: bytes) -> Iterator[bytes]:
                for _ in range(count):
                    yield chunk

        # A generator method streams its items as separate objects (one ref per chunk).
        setattr(Echo, "stream", ray.method(num_returns="streaming")(Echo.stream))  # noqa: B010
        return ray.remote(num_cpus=0)(Echo).remote()

    # --- safety --------------------------------------------------------------------------------

    def _check_loopback(self) -> int:
        """Raise if Ray's processes listen on or talk to a non-loopback address; 1 if checked."""
        pids = {os.getpid(), *descendants(os.getpid())}
        found = listeners(pids)
        if found is None:
            return 0
        bad = [f"{b.process}({b.pid}) listens on {b.address}:{b.port}" for b in non_loopback(found)]
        bad += [f"connected to {peer}" for peer in foreign_peers(pids) or []]
        if bad:
            raise RuntimeError("Ray reaches beyond loopback: " + "; ".join(bad))
        self.ctx.log(f"ray: {len(found)} listeners, all on loopback")
        return 1

    # --- CPU accounting ------------------------------------------------------------------------

    @contextmanager
    def _cpu(self, result: list[float]) -> Iterator[None]:
        """Append the CPU seconds spent meanwhile by this process and Ray's whole tree."""
        pids = [pid for pid in descendants(os.getpid()) if pid not in self.exclude]
        before = {pid: process_cpu_seconds(pid) for pid in pids}
        mine = self_cpu_seconds()
        yield
        spent = self_cpu_seconds() - mine
        for pid, was in before.items():
            now = process_cpu_seconds(pid)
            if not (math.isnan(now) or math.isnan(was)):
                spent += now - was
        result.append(spent)

    # --- the figures ---------------------------------------------------------------------------

    def _round_trip(self, actor: Any, after: Callable[[], None]) -> Row:
        ray, ctx = self.ray, self.ctx
        for _ in range(self.warmup):
            ray.get(actor.echo.remote(_PAYLOAD))
        latencies: list[float] = []
        p50s: list[float] = []
        cpu: list[float] = []
        calls = 0
        for rep in range(self.repetitions):
            mine: list[float] = []
            deadline = time.monotonic() + self.time_limit
            with self._cpu(cpu):
                while len(mine) < self.calls and time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    ray.get(actor.echo.remote(_PAYLOAD))
                    mine.append((time.perf_counter() - t0) * 1e6)
            calls += len(mine)
            latencies += mine
            p50s.append(median(mine))
            ctx.log(f"ray: round trip rep {rep + 1}: p50 {p50s[-1]:.0f} µs over {len(mine)}")
            after()
        return Row(
            group=GROUP,
            name="round trip p50",
            value=median(latencies),
            unit="µs",
            p99=percentile(latencies, 99),
            cpu_us=sum(cpu) / calls * 1e6 if calls else None,
            note=f"ray.get(actor.echo.remote(1 KiB)), {calls} calls",
            samples=p50s,
        )

    def _throughput(self, actor: Any, after: Callable[[], None]) -> Row:
        ctx = self.ctx
        rates: list[float] = []
        cpu: list[float] = []
        calls = 0
        for rep in range(self.repetitions):
            with self._cpu(cpu):
                done, seconds = asyncio.run(self._pipelined(actor))
            calls += done
            rates.append(done / seconds)
            ctx.log(f"ray: throughput rep {rep + 1}: {rates[-1]:,.0f} calls/s")
            after()
        return Row(
            group=GROUP,
            name="throughput @64",
            value=median(rates),
            unit="req/s",
            cpu_us=sum(cpu) / calls * 1e6 if calls else None,
            note=f"{_IN_FLIGHT} asyncio tasks awaiting actor.echo.remote(1 KiB)",
            samples=rates,
        )

    async def _pipelined(self, actor: Any) -> tuple[int, float]:
        total, deadline = self.tp_calls, time.monotonic() + self.time_limit
        issued = 0
        done = 0

        async def caller() -> None:
            nonlocal issued, done
            while issued < total and time.monotonic() < deadline:
                issued += 1
                await actor.echo.remote(_PAYLOAD)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(_IN_FLIGHT)))
        return done, time.perf_counter() - t0

    def _stream(self, actor: Any, after: Callable[[], None]) -> Row:
        ray, ctx = self.ray, self.ctx
        for ref in actor.stream.remote(_CHUNKS, _CHUNK):  # warm-up
            ray.get(ref)
        rates: list[float] = []
        cpu: list[float] = []
        chunks_total = 0
        for rep in range(self.repetitions):
            chunks = 0
            deadline = time.monotonic() + self.time_limit
            t0 = time.perf_counter()
            with self._cpu(cpu):
                for _ in range(self.streams):
                    if time.monotonic() >= deadline:
                        break
                    for ref in actor.stream.remote(_CHUNKS, _CHUNK):
                        ray.get(ref)
                        chunks += 1
            rates.append(chunks / (time.perf_counter() - t0))
            chunks_total += chunks
            ctx.log(f"ray: stream rep {rep + 1}: {rates[-1]:,.0f} chunks/s")
            after()
        return Row(
            group=GROUP,
            name="stream 100 chunks",
            value=median(rates),
            unit="chunks/s",
            cpu_us=sum(cpu) / chunks_total * 1e6 if chunks_total else None,
            note='generator method, num_returns="streaming", 100 x 64 B, streams one at a time',
            samples=rates,
        )


def checked_note(checks: int) -> str:
    """Say whether the loopback check ran."""
    if checks:
        return "every Ray listener checked on loopback (ss)"
    return "loopback NOT verified: ss is missing"


def versus(rows: list[Row]) -> list[Row]:
    """The "troupe tcp vs Ray" rows, from this suite's rows (the planes suite's as a fallback).

    troupe's figure is this suite's interleaved ``troupe tcp: <name>`` row when there is one,
    else the planes suite's tcp row (measured apart from Ray's: the note says so). Each
    compares troupe's figure with Ray's (``reference_value``) so that ``ratio`` reads "times
    better than Ray" against :data:`RAY_TARGETS`: for latency the row's value is Ray's µs and
    its reference troupe's; for rates the value is troupe's and the reference Ray's. Rows with
    no counterpart are left out.
    """
    by_key = {(row.group, row.name): row for row in rows}
    made: list[Row] = []
    for name, target in RAY_TARGETS.items():
        ray_row = by_key.get((GROUP, name))
        tcp_row = by_key.get((GROUP, TROUPE_PREFIX + name))
        pairing = "interleaved: each troupe repetition right after Ray's, in the ray suite"
        if tcp_row is None or math.isnan(tcp_row.value):
            tcp_row = by_key.get(TCP_ROWS[name])
            pairing = (
                "NOT interleaved: troupe's figure from the planes suite, Ray's from the ray "
                "suite, measured apart"
            )
        if ray_row is None or tcp_row is None:
            continue
        if math.isnan(ray_row.value) or math.isnan(tcp_row.value):
            continue
        pick: Callable[[Row], float] = lambda row: row.value  # noqa: E731
        if name in _LATENCY:
            value, reference, ref_name = pick(ray_row), pick(tcp_row), "troupe tcp"
            note = f"Ray's latency ÷ troupe tcp's: how many times faster troupe is; {pairing}"
        else:
            value, reference, ref_name = pick(tcp_row), pick(ray_row), "Ray actor"
            note = f"troupe tcp's rate ÷ Ray's: how many times more troupe does; {pairing}"
        made.append(
            Row(
                group="troupe tcp vs Ray",
                name=name,
                value=value,
                unit=tcp_row.unit if name not in _LATENCY else ray_row.unit,
                reference=ref_name,
                reference_value=reference,
                higher_is_better=True,
                target=target,
                note=note,
            )
        )
    return made
