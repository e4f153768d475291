"""``python -m benchmarks``: run the suites, print one table, write the rows as JSON.

Suites run in order (planes, ray, dynamo, discovery, failure, events, kv); a suite that raises
becomes one FAILED row and the others still run. ``--quick`` is the reduced run behind
``make bench-quick``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks._harness import BenchContext, Row

SUITES = ("planes", "ray", "dynamo", "discovery", "failure", "events", "kv")
_RESULTS = Path(__file__).resolve().parent / "results"
_ROOT = Path(__file__).resolve().parent.parent


def _fmt(value: float | None, digits: int = 3) -> str:
    """A compact number: thousands separators for big figures, a few digits for small ones."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits - 1}f}" if magnitude >= 1 else f"{value:.{digits}g}"


def _target(row: Row) -> str:
    if row.target is None:
        return "-"
    return f"{'≥' if row.higher_is_better else '≤'}{row.target:.3g}x"


def _met(row: Row) -> str:
    met = row.met
    if met is None:
        return "-"
    return "yes" if met else "NO"


def render_table(rows: list[Row]) -> str:
    """The rows as one aligned text table (group, row, value, p99, CPU, reference, ratio, ...)."""
    header = [
        "group",
        "row",
        "value",
        "p99",
        "CPU µs/op",
        "reference",
        "ref value",
        "ratio",
        "target",
        "met?",
    ]
    lines: list[list[str]] = [header]
    for row in rows:
        unit = f" {row.unit}" if row.unit else ""
        lines.append(
            [
                row.group,
                row.name,
                _fmt(row.value) + unit,
                _fmt(row.p99) if row.p99 is not None else "-",
                _fmt(row.cpu_us),
                row.reference or "-",
                _fmt(row.reference_value),
                f"{row.ratio:.2f}x" if row.ratio is not None else "-",
                _target(row),
                _met(row),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {2, 3, 4, 6, 7}
    out: list[str] = []
    for index, line in enumerate(lines):
        cells = [
            cell.rjust(widths[i]) if i in numeric and index else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"  [{r.group} / {r.name}] {r.note}" for r in rows if r.note]
    if notes:
        out.append("")
        out.append("notes:")
        out.extend(notes)
    return "\n".join(out)


def _git_rev() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    rev = done.stdout.strip() or "unknown"
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        dirty = ""
    return f"{rev}+dirty" if dirty else rev


def _machine() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "troupe_rev": _git_rev(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop  # noqa: PLC0415

        facts["uvloop"] = getattr(uvloop, "__version__", "?")
    except ImportError:
        facts["uvloop"] = None
    return facts


def _clean(value: Any) -> Any:
    """NaN and infinities become None so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _run_suite(name: str, ctx: BenchContext) -> list[Row]:
    started = time.monotonic()
    ctx.log(f"suite {name}: start")
    try:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        rows: list[Row] = list(module.run(ctx))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - one failing suite must not hide the others
        ctx.log(f"suite {name}: FAILED: {exc!r}")
        traceback.print_exc(file=sys.stderr)
        rows = [
            Row(
                group=name,
                name="FAILED",
                value=math.nan,
                unit="",
                note=f"{type(exc).__name__}: {exc}",
            )
        ]
    ctx.log(f"suite {name}: done in {time.monotonic() - started:.1f} s")
    return rows


def _comparisons(rows: list[Row], suites: list[str]) -> list[Row]:
    """The "troupe tcp vs Ray" rows (``bench_ray.versus``) whenever the ray suite ran.

    The ray suite measures troupe's tcp figures itself, interleaved with Ray's; the planes
    suite's tcp rows are only the fallback (and the rows' notes say which was used).
    """
    if "ray" not in suites:
        return []
    try:
        module = importlib.import_module("benchmarks.bench_ray")
        versus = getattr(module, "versus", None)
        return list(versus(rows)) if versus is not None else []
    except Exception as exc:  # noqa: BLE001 - a comparison must not lose the measured rows
        return [
            Row(group="troupe tcp vs Ray", name="FAILED", value=math.nan, unit="", note=repr(exc))
        ]


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments, run the suites, print the table, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced run (< 2 minutes)")
    parser.add_argument(
        "--only", nargs="+", choices=SUITES, metavar="SUITE", help=f"run only: {SUITES}"
    )
    parser.add_argument("--json", type=Path, default=None, help="where to write the JSON")
    parser.add_argument(
        "--repetitions", type=int, default=None, help="override repetitions (3 quick, 5 full)"
    )
    args = parser.parse_args(argv)
    suites = [s for s in SUITES if args.only is None or s in args.only]
    repetitions = args.repetitions or (3 if args.quick else 5)

    scratch = Path(tempfile.mkdtemp(prefix="troupe-bench-"))
    started = time.time()
    rows: list[Row] = []
    durations: dict[str, float] = {}
    try:
        ctx = BenchContext(quick=args.quick, repetitions=repetitions, scratch=scratch)
        for name in suites:
            t0 = time.monotonic()
            suite_dir = scratch / name
            suite_dir.mkdir(parents=True, exist_ok=True)
            suite_ctx = BenchContext(
                quick=ctx.quick, repetitions=ctx.repetitions, scratch=suite_dir
            )
            rows.extend(_run_suite(name, suite_ctx))
            durations[name] = round(time.monotonic() - t0, 1)
        rows.extend(_comparisons(rows, suites))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(render_table(rows))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    path = args.json or _RESULTS / f"{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "started_utc": stamp,
        "quick": args.quick,
        "repetitions": repetitions,
        "suites": suites,
        "suite_seconds": durations,
        "machine": _machine(),
        "rows": [_clean({**asdict(r), "ratio": r.ratio, "met": r.met}) for r in rows],
    }
    path.write_text(json.dumps(document, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
    print(f"\nresults written to {path}", file=sys.stderr)
    return 1 if any(r.name == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
