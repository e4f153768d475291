"""Every example, and the demo that `make demo` runs, works as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )


def test_supervision_example_survives_a_crash() -> None:
    result = _run("examples/supervision.py")
    assert result.returncode == 0, result.stderr
    assert "db: top/backend/db restarts=1" in result.stdout
    assert "cache: top/cache restarts=0" in result.stdout
    assert result.stdout.strip().endswith("cache ok, db ok, api ok")


def test_demo_runs_and_carries_on_after_a_crash() -> None:
    result = _run("-m", "troupe.demo")
    assert result.returncode == 0, result.stderr
    assert "job 5: 'and the show goes on'" in result.stdout
    assert "restarts per worker: {'counter-0': 1" in result.stdout
    assert "every thread joined" in result.stdout
