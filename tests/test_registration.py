"""Registration through the Runtime, seen across processes on the file, etcd and NATS backends.

A child process registers an instance; this process watches the endpoint prefix with a
WatcherActor. A clean SIGTERM removes the key within a second (the lease is revoked); a SIGKILL
removes it within TTL + 2 s (the lease expires).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from troupe import Config, Runtime
from troupe.actors import Actor
from troupe.actors._watcher import Joined, Left, Subscribe, WatcherActor
from troupe.messages import InstanceRecord, decode_record, endpoint_prefix
from troupe.testing import EtcdServer, NatsServer
from troupe.testing._wait import eventually

ROOT = Path(__file__).resolve().parent.parent
TTL = 1.0
PREFIX = endpoint_prefix("ns", "comp", "ep")


class Collector(Actor[Joined | Left]):
    def __init__(self, seen: list[tuple[float, Joined | Left]]) -> None:
        super().__init__()
        self.seen = seen

    def receive(self, message: Joined | Left) -> None:
        self.seen.append((time.monotonic(), message))


def _decode(key: str, value: bytes) -> tuple[str, InstanceRecord]:
    record = decode_record(value, key=key)
    return record.instance_id, record


@pytest.fixture(params=["file", "etcd", "nats"])
def backend_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    env = {"DYN_LEASE_TTL": str(TTL), "DYN_LOG": "warning"}
    if request.param == "file":
        env |= {"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(tmp_path / "kv")}
    elif request.param == "etcd":
        server: EtcdServer = request.getfixturevalue("etcd_server")
        env |= {"DYN_DISCOVERY_BACKEND": "etcd", "ETCD_ENDPOINTS": server.url}
    else:
        nats: NatsServer = request.getfixturevalue("nats_server")
        env |= {"DYN_DISCOVERY_BACKEND": "nats", "NATS_SERVER": nats.url}
    return env


def _spawn_registrant(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_registrant.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("registered "):
        proc.kill()
        raise AssertionError(
            f"registrant failed: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        )
    return proc, line.split()[1]


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_join_and_leave_across_processes(backend_env: dict[str, str], how: str) -> None:
    config = Config.from_env(backend_env)
    seen: list[tuple[float, Joined | Left]] = []
    with Runtime(config, handle_signals=False) as rt:
        collector = rt.spawn(lambda: Collector(seen))
        store = rt.store
        watcher = rt.spawn(lambda: WatcherActor(store, PREFIX, _decode))
        watcher.ask(Subscribe(collector))
        proc, instance_id = _spawn_registrant(backend_env)
        try:
            joined = eventually(
                lambda: [m for _, m in seen if isinstance(m, Joined)], timeout=5, what="Joined"
            )
            assert joined[0].instance_id == instance_id
            assert joined[0].instance.metadata == {"model": "m"}
            assert joined[0].instance.pid == proc.pid
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
            limit = 1.0 if how == "sigterm" else TTL + 2.0
            left = eventually(
                lambda: [(t, m) for t, m in seen if isinstance(m, Left)],
                timeout=limit + 3.0,
                what="Left",
            )
            took = left[0][0] - start
            assert left[0][1].instance_id == instance_id
            assert took <= limit, f"Left after {took:.2f} s (limit {limit} s)"
        finally:
            proc.kill()
            proc.wait(10)


def test_etcd_key_layout_is_readable_with_etcdctl(etcd_server: EtcdServer) -> None:
    env = {"DYN_DISCOVERY_BACKEND": "etcd", "ETCD_ENDPOINTS": etcd_server.url, "DYN_LOG": "warning"}
    proc, instance_id = _spawn_registrant(env)
    try:
        out = etcd_server.etcdctl("get", "--prefix", "/services/ns/comp/ep/")
        key, value = out.strip().splitlines()[:2]
        assert key == f"/services/ns/comp/ep/{instance_id}"
        assert len(instance_id) == 16
        assert all(c in "0123456789abcdef" for c in instance_id)
        record: dict[str, Any] = json.loads(value)
        assert record["namespace"] == "ns"
        assert record["component"] == "comp"
        assert record["endpoint"] == "ep"
        assert record["instance_id"] == instance_id
        assert record["transport"] == {"tcp": "tcp://127.0.0.1:1"}
        assert record["pid"] == proc.pid
        assert {"host", "started_at", "metadata"} <= set(record)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert etcd_server.etcdctl("get", "--prefix", "/services/").strip() == ""


@pytest.mark.slow
def test_etcd_outage_longer_than_ttl_then_keys_come_back(fresh_etcd_server: EtcdServer) -> None:
    env = {
        "DYN_DISCOVERY_BACKEND": "etcd",
        "ETCD_ENDPOINTS": fresh_etcd_server.url,
        "DYN_LEASE_TTL": str(TTL),
        "DYN_LOG": "error",
    }
    proc, instance_id = _spawn_registrant(env)
    try:
        fresh_etcd_server.stop()
        deadline = time.monotonic() + 3 * TTL  # past the TTL: the lease has expired meanwhile
        eventually(lambda: time.monotonic() >= deadline, timeout=10)
        fresh_etcd_server.start()
        key = f"/services/ns/comp/ep/{instance_id}"
        eventually(
            lambda: key in fresh_etcd_server.etcdctl("get", "--prefix", "/services/"),
            timeout=10,
            what="key re-registered after etcd returned",
        )
        assert proc.poll() is None, "the worker process must keep running"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
