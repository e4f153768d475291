"""``troupe status``: every instance with its state, load and counts, from its own request plane."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from _procs import Fleet

from troupe import Config, RequestContext, Runtime
from troupe._cli_status import format_rows, gather
from troupe.discovery import MemoryKvServer
from troupe.messages import services_prefix
from troupe.testing import free_port
from troupe.testing._wait import eventually

ENDPOINT = "demo.backend.words"
HANDLER = "troupe.demo:words"


@pytest.fixture(params=["tcp", "http"])
def plane(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _config(plane: str) -> Config:
    return Config.from_env(
        {
            "DYN_DISCOVERY_BACKEND": "memory",
            "DYN_REQUEST_PLANE": plane,
            "DYN_TCP_RPC_HOST": "127.0.0.1",
            "DYN_HTTP_RPC_HOST": "127.0.0.1",
            "DYN_HTTP_RPC_PORT": "0",
            "DYN_LOG": "warning",
        }
    )


def test_gather_reports_each_endpoint_and_names_the_instances_that_do_not_answer(
    plane: str,
) -> None:
    kv = MemoryKvServer()

    async def slow(request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
        yield "first"
        await ctx.wait_stopped()  # until its caller lets go

    async def fast(request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
        yield request

    config = _config(plane)
    with (
        Runtime(config, handle_signals=False, memory_server=kv) as worker,
        Runtime(config, handle_signals=False, memory_server=kv) as caller,
    ):
        worker.serve("ns.comp.slow", slow, max_inflight=7)
        worker.serve("ns.comp.fast", fast)
        # A registration whose process is gone (its lease still alive): shown, not hidden.
        caller.register("ns", "comp", "fast", {"tcp": f"tcp://127.0.0.1:{free_port()}"})
        fast_router = caller.router("ns.comp.fast")
        fast_router.wait_for_instances_sync(timeout=5)
        for n in range(3):
            assert list(fast_router.generate_sync(n, instance_id=worker.instance_id)) == [n]
        slow_router = caller.router("ns.comp.slow")
        slow_router.wait_for_instances_sync(timeout=5)
        held = slow_router.generate_sync("x")
        assert next(held) == "first"

        store = caller.store
        rows = caller.io.run(gather(store, caller.network, services_prefix("ns"), 1.0))
        by_key = {(r.path, r.record.instance_id): r.as_json() for r in rows}
        slow_row = by_key["ns.comp.slow", worker.instance_id]
        assert (slow_row["state"], slow_row["inflight"], slow_row["max_inflight"]) == (
            "serving",
            1,
            7,
        )
        assert slow_row["requests"] == 1
        fast_row = by_key["ns.comp.fast", worker.instance_id]
        assert (fast_row["inflight"], fast_row["requests"], fast_row["errors"]) == (0, 3, 0)
        assert fast_row["process"]["plane"] == plane
        assert fast_row["process"]["inflight"] == 1  # the slow one, not the status call itself
        assert fast_row["pid"] == os.getpid()
        dead = by_key["ns.comp.fast", caller.instance_id]
        assert dead["state"] == "unreachable"
        assert "refused" in dead["error"].lower()
        table = format_rows(rows)
        assert table.splitlines()[0].split()[:3] == ["ENDPOINT", "INSTANCE", "MODEL"]
        assert "unreachable" in table
        assert "1/7" in table
        held.close()


# --- the command, against a real fleet -------------------------------------------------------


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    return env | {"DYN_LEASE_TTL": "2"}


@pytest.fixture
def fleet(env: dict[str, str], tmp_path: Path) -> Iterator[Fleet]:
    """``troupe worker`` with three worker processes; stopped with SIGTERM after the test."""
    started = Fleet(env, tmp_path, ENDPOINT, HANDLER, "--workers=3")
    try:
        yield started
    finally:
        started.stop()


def _status(env: dict[str, str], *args: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "troupe", "status", "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


@pytest.mark.timeout(120)
def test_status_of_a_three_worker_fleet_moves_under_load_and_counts_restarts(
    env: dict[str, str], fleet: Fleet
) -> None:
    with Runtime(Config.from_env(env), handle_signals=False) as rt:
        router = rt.router(ENDPOINT)
        eventually(lambda: len(router.instance_ids()) == 3, timeout=60, what="3 workers")
        rows = _status(env)
        assert len(rows) == 3
        assert {r["worker"] for r in rows} == {"worker-0", "worker-1", "worker-2"}
        assert all(r["state"] == "serving" and r["inflight"] == 0 for r in rows)
        assert all(r["restarts"] == 0 for r in rows)
        before = sum(r["requests"] for r in rows)

        # Three slow streams in flight (round robin: one on each worker), then status again.
        streams = [
            router.generate_sync({"text": "a b c d e f g h", "delay": 1.0}) for _ in range(3)
        ]
        for stream in streams:
            next(stream)
        rows = _status(env)
        assert sum(r["inflight"] for r in rows) == 3
        assert sum(r["requests"] for r in rows) == before + 3
        for stream in streams:
            stream.close()

        # A worker killed is restarted by its supervisor: the new process says so.
        victim = next(r for r in rows if r["worker"] == "worker-1")
        os.kill(victim["pid"], signal.SIGKILL)

        def restarted() -> bool:
            now = [r for r in _status(env) if r["worker"] == "worker-1"]
            return any(r["restarts"] == 1 and r["state"] == "serving" for r in now)

        eventually(restarted, timeout=60, what="worker-1 restarted")


@pytest.mark.timeout(60)
def test_status_watch_redraws_in_place_until_interrupted(env: dict[str, str], fleet: Fleet) -> None:
    with Runtime(Config.from_env(env), handle_signals=False) as rt:
        router = rt.router(ENDPOINT)
        eventually(lambda: len(router.instance_ids()) == 3, timeout=40, what="3 workers")
    watch = subprocess.Popen(
        [sys.executable, "-m", "troupe", "status", "--watch", "0.3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watch.stdout is not None
    frames = 0
    deadline = time.monotonic() + 30
    while frames < 3 and time.monotonic() < deadline:
        line = watch.stdout.readline()
        if "\x1b[H\x1b[J" in line:
            frames += 1
    watch.send_signal(signal.SIGINT)
    _, err = watch.communicate(timeout=15)
    assert frames == 3
    assert watch.returncode == 0, err
    assert "Traceback" not in err
