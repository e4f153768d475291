"""troupe's side of a peer comparison: one worker, a router in this process, the planes' loops.

The peer suites (Ray, NVIDIA Dynamo) measure troupe next to the peer in the same run: each
repetition of a peer's figure is followed at once by the same figure on troupe, with the planes
suite's code (:mod:`benchmarks.bench_planes`: its handler, its loops, its sizes).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable
from typing import Any

from benchmarks._harness import BenchContext, Row, median
from benchmarks.bench_planes import (
    _Child,
    _child_env,
    _Cpu,
    _PlaneResult,
    _sizes,
    _troupe_env,
    _troupe_rtt,
    _troupe_stream,
    _troupe_tp,
    series_rows,
)

__all__ = ["TroupeSide"]


class TroupeSide:
    """A ``troupe worker`` on ``plane`` and this process's router; one repetition per call.

    CPU per operation adds the worker, ``extra_pids`` (nats-server on the nats plane) and this
    process. ``label`` prefixes the progress lines and names the endpoint.
    """

    def __init__(
        self,
        ctx: BenchContext,
        plane: str,
        *,
        label: str,
        nats_url: str | None = None,
        extra_pids: Iterable[int] = (),
    ) -> None:
        self.ctx = ctx
        self.plane = plane
        self.label = label
        self.endpoint = f"bench.{label}.{plane}"
        self.nats_url = nats_url
        self.extra_pids = sorted(extra_pids)
        self.sizes = _sizes(plane, ctx.quick)
        self.result = _PlaneResult()
        self._stack = contextlib.ExitStack()
        self.pids: set[int] = set()  # the worker's: a peer's CPU accounting leaves it out
        self._rt: Any = None
        self._router: Any = None
        self._timeout = self.sizes.cap * 3 + 30

    def __enter__(self) -> TroupeSide:
        from troupe.runtime import Runtime  # noqa: PLC0415

        ctx = self.ctx
        environ = _troupe_env(ctx, self.plane, self.nats_url)
        try:
            worker = _Child(
                [
                    sys.executable,
                    "-m",
                    "troupe",
                    "worker",
                    self.endpoint,
                    "benchmarks.bench_planes:handler",
                ],
                env=_child_env(environ),
                log=ctx.scratch / f"troupe-{self.label}-{self.plane}-worker.log",
            )
            self._stack.callback(worker.stop)
            self.pids = {worker.pid}
            self._rt = self._stack.enter_context(Runtime.from_env(environ, handle_signals=False))
            self._router = self._rt.router(self.endpoint)
            self._stack.callback(self._router.close)
            try:
                self._router.wait_for_instances_sync(timeout=60)
            except BaseException:
                self._log(f"worker did not register: {worker.tail()}")
                raise
        except BaseException:
            self._stack.close()
            raise
        ctx.log(f"{self.label}: troupe {self.plane} worker up, measured after each peer repetition")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _cpu_pids(self) -> list[int]:
        return sorted(self.pids) + self.extra_pids

    def rtt(self) -> None:
        """One round-trip repetition (1 in flight)."""
        sizes, router = self.sizes, self._router

        async def measure() -> tuple[list[float], float]:
            await _troupe_rtt(router, sizes.warm_rtt, sizes.cap)
            cpu = _Cpu(self._cpu_pids())
            lat = await _troupe_rtt(router, sizes.rtt, sizes.cap)
            return lat, cpu.done()[1]

        lat, cpu_s = self._rt.io.run(measure(), timeout=self._timeout)
        self.result.troupe["rtt"].add_latencies(lat, cpu_s, len(lat))
        self._log(f"round trip: p50 {median(lat):.0f} µs over {len(lat)}")

    def tp(self) -> None:
        """One throughput repetition (64 in flight)."""
        sizes, router = self.sizes, self._router

        async def measure() -> tuple[int, float, float]:
            await _troupe_tp(router, sizes.warm_tp, sizes.cap)
            cpu = _Cpu(self._cpu_pids())
            ops = await _troupe_tp(router, sizes.tp, sizes.cap)
            return (ops, *cpu.done())

        ops, seconds, cpu_s = self._rt.io.run(measure(), timeout=self._timeout)
        self.result.troupe["tp"].add_rate(ops, seconds, cpu_s)
        self._log(f"throughput: {self.result.troupe['tp'].rate[-1]:,.0f} req/s")

    def stream(self) -> None:
        """One streaming repetition (streams of 100 chunks, one at a time)."""
        sizes, router = self.sizes, self._router

        async def measure() -> tuple[int, float, float]:
            await _troupe_stream(router, max(1, sizes.warm_rtt // 100), sizes.cap)
            cpu = _Cpu(self._cpu_pids())
            chunks = await _troupe_stream(router, sizes.streams, sizes.cap)
            return (chunks, *cpu.done())

        chunks, seconds, cpu_s = self._rt.io.run(measure(), timeout=self._timeout)
        self.result.troupe["stream"].add_rate(chunks, seconds, cpu_s)
        self._log(f"stream: {self.result.troupe['stream'].rate[-1]:,.0f} chunks/s")

    def _log(self, what: str) -> None:
        self.ctx.log(f"{self.label}: troupe {self.plane} {what}")

    def rows(self, group: str, prefix: str, note: str) -> list[Row]:
        """``<prefix><figure>`` rows without a reference (the peer suite pairs them)."""
        return series_rows(group, prefix, self.result.troupe, rtt_note=note)
