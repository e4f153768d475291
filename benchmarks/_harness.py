"""The benchmark harness: the row type every suite returns, the run context, and measuring helpers.

Each suite (``benchmarks/bench_<name>.py``) exposes ``SUITE = "<name>"`` and
``run(ctx: BenchContext) -> list[Row]``. A :class:`Row` carries one figure, the reference it is
compared with (measured in the same run), and an optional target for the ratio between them;
``benchmarks/__main__.py`` prints every row in one table and writes them as JSON.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from troupe.testing.servers import free_port

__all__ = [
    "BenchContext",
    "Row",
    "free_port",
    "median",
    "percentile",
    "process_cpu_seconds",
    "self_cpu_seconds",
]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class Row:
    """One figure in the table, with its same-run reference and the target for their ratio.

    Attributes:
        group: Table section ("tcp", "http", "nats", "ray", "discovery: etcd", ...).
        name: What is measured ("round trip p50", "throughput @64", ...).
        value: The median over repetitions (or over requests for latency rows).
        unit: "µs", "ms", "req/s", "chunks/s", "failed", ...
        p99: The 99th percentile, where it means something.
        cpu_us: CPU µs per operation over every process involved, if measured.
        reference: What the value is compared with ("pyzmq floor", "Ray actor", ...).
        reference_value: The reference's figure, measured in the same run.
        higher_is_better: Direction of the comparison.
        target: Target for ``ratio = value / reference_value``: ``ratio >= target`` when higher
            is better, else ``ratio <= target``.
        note: Free text printed after the row.
        samples: Per-repetition values (kept in the JSON).
    """

    group: str
    name: str
    value: float
    unit: str
    p99: float | None = None
    cpu_us: float | None = None
    reference: str | None = None
    reference_value: float | None = None
    higher_is_better: bool = True
    target: float | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """``value / reference_value``, or None without a usable reference."""
        if self.reference_value is None or self.reference_value == 0:
            return None
        if math.isnan(self.value) or math.isnan(self.reference_value):
            return None
        return self.value / self.reference_value

    @property
    def met(self) -> bool | None:
        """Whether the ratio meets the target (None when there is no target or no ratio)."""
        ratio = self.ratio
        if self.target is None or ratio is None:
            return None
        return ratio >= self.target if self.higher_is_better else ratio <= self.target


@dataclass(frozen=True)
class BenchContext:
    """What a suite gets: the mode, how many repetitions, and a scratch directory.

    Attributes:
        quick: Reduced run (``make bench-quick``).
        repetitions: Repetitions per figure (3 quick, 5 full).
        scratch: A temporary directory for this run, removed afterwards.
    """

    quick: bool
    repetitions: int
    scratch: Path

    def log(self, message: str) -> None:
        """Print one progress line to stderr."""
        stamp = time.strftime("%H:%M:%S")
        print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[mid])
    return (ordered[mid - 1] + ordered[mid]) / 2.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (``q`` in [0, 100]), linear interpolation."""
    if not values:
        return math.nan
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = math.ceil(pos)
    if low == high:
        return float(ordered[low])
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def process_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid``, including its reaped children, from /proc/<pid>/stat.

    Returns NaN when the process is gone or /proc is unavailable.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime=14, stime=15, cutime=16, cstime=17 (1-based).
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return (utime + stime + cutime + cstime) / _CLOCK_TICKS


def self_cpu_seconds() -> float:
    """User+system CPU seconds of this process (all threads)."""
    times = os.times()
    return times.user + times.system
