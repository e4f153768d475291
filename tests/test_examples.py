"""Every example, and the demo that `make demo` runs, works as documented."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from troupe.demo.mocker import VOCABULARY
from troupe.testing import free_port

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
    assert "frontend listening on http://127.0.0.1:" in out
    assert "migration on: --migration-limit 2 (troupe frontend's default is 0" in out
    assert "GET /v1/models -> ['troupe-mock']" in out
    assert "usage: {'prompt_tokens': 7, 'completion_tokens': 16, 'total_tokens': 23}" in out
    assert "(finish_reason=length)" in out
    assert "kill -9 worker" in out
    assert "resumed on worker" in out
    # the interrupted answer arrives whole: every token once, in order, across two workers
    crash = out.split("a worker is killed midway", 1)[1].split("\nworkers (pids)", 1)[0]
    words = [
        w
        for line in crash.splitlines()
        if line.startswith("  ") and not line.startswith("  !")
        for w in line.split()
    ]
    vocabulary = " ".join(VOCABULARY[:24])
    assert " ".join(words) == vocabulary
    restarts = ast.literal_eval(out.split("restarts: ", 1)[1].splitlines()[0])
    assert sorted(restarts.values()) == [0, 1]  # exactly the killed worker was replaced
    assert "done: every process stopped, every thread joined." in out


def test_hello_world_worker_and_client(tmp_path: Path) -> None:
    env = dict(os.environ)  # already scrubbed of troupe variables by conftest._scrub_env
    env |= {
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_FILE_KV": str(tmp_path / "kv"),
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_LOG": "error",
    }
    worker = subprocess.Popen(
        [sys.executable, "examples/hello_world/worker.py"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().startswith("serving hello.world.generate")
        client = subprocess.run(
            [sys.executable, "examples/hello_world/client.py", "Ada", "Grace"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=30,
            check=False,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.splitlines() == ["hello, Ada!", "hello, Grace!"]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0
    finally:
        worker.kill()
        worker.wait()


@pytest.mark.parametrize("plane", ["tcp", "http", "nats"])
def test_request_planes_script(plane: str, request: pytest.FixtureRequest) -> None:
    env = dict(os.environ)  # already scrubbed of troupe variables by conftest._scrub_env
    env["PYTHON"] = sys.executable
    if plane == "nats":
        env["NATS_SERVER"] = request.getfixturevalue("nats_server").url
    result = subprocess.run(
        ["bash", "examples/request_planes.sh", plane],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"workers on the {plane} plane:" in out
    scheme = {"tcp": "tcp://", "http": "http://", "nats": "nats:"}[plane]
    table = out.split("calling", 1)[0]
    assert table.count(scheme) == 2, out
    chunks = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [c["word"] for c in chunks] == ["hello", "from", "the", "request", "plane"] * 2
    assert len({c["pid"] for c in chunks}) == 2  # round robin reached both workers


def test_request_planes_script_without_a_nats_server_says_so_within_seconds() -> None:
    env = dict(os.environ)  # already scrubbed of troupe variables by conftest._scrub_env
    env["PYTHON"] = sys.executable
    env["NATS_SERVER"] = f"nats://127.0.0.1:{free_port()}"  # nobody listens
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "examples/request_planes.sh", "nats"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 20
    assert "failed to start" in result.stderr
    assert "cannot connect to NATS" in result.stderr
    assert "NATS_SERVER" in result.stderr
    assert "Traceback" not in result.stderr
