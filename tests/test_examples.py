"""Every example, and the demo that `make demo` runs, works as documented."""

from __future__ import annotations

import ast
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
    out = result.stdout
    assert "router sees 3 workers" in out
    assert "kill -9 worker" in out
    assert "migrated to worker" in out
    # every word of the interrupted sentence arrives exactly once, in order
    sentence = "a worker is killed in the middle of this sentence yet the stream goes on"
    start = out.index(repr(sentence))
    words = [
        line.split("] ", 1)[1] for line in out[start:].splitlines()[1:] if line.startswith("  [")
    ][: len(sentence.split())]
    assert words == sentence.split()
    restarts = ast.literal_eval(out.split("restarts: ", 1)[1].splitlines()[0])
    assert sorted(restarts.values()) == [0, 0, 1]  # exactly the killed worker was replaced
    assert "done: every process stopped, every thread joined." in out
