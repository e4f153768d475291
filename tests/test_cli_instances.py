"""`troupe instances`: table, JSON lines, and --watch, on the file backend across processes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from troupe._cli_discovery import resolve_prefix
from troupe.config import FileKvConfig
from troupe.discovery import FileStore
from troupe.errors import ConfigError
from troupe.messages import InstanceRecord, encode_record

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    return env | {"DYN_LEASE_TTL": "2", "DYN_LOG": "error"}


def troupe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "troupe", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def registrant(env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_registrant.py")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().split()[1]


def test_list_as_table_and_json(env: dict[str, str]) -> None:
    empty = troupe(env, "instances")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.split()[:4] == ["INSTANCE", "NAMESPACE", "COMPONENT", "ENDPOINT"]
    proc, instance_id = registrant(env)
    try:
        table = troupe(env, "instances", "ns.comp")
        assert table.returncode == 0, table.stderr
        row = table.stdout.splitlines()[1].split()
        assert row[:5] == [instance_id, "ns", "comp", "ep", "tcp://127.0.0.1:1"]
        lines = troupe(env, "instances", "--json").stdout.splitlines()
        assert len(lines) == 1
        record = json.loads(lines[0])
        assert record["instance_id"] == instance_id
        assert record["metadata"] == {"model": "m"}
        other = troupe(env, "instances", "otherns")
        assert len(other.stdout.splitlines()) == 1  # the header only
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_record_bound_to_no_lease_is_named_on_stderr_not_listed(env: dict[str, str]) -> None:
    forged = InstanceRecord.create(
        "ns", "comp", "ep", instance_id="00000000000000ff", transport={"tcp": "tcp://10.0.0.9:1"}
    )

    async def write_by_hand() -> None:  # as a file copied into the store would be
        async with FileStore(FileKvConfig(path=env["DYN_FILE_KV"])) as store:
            await store.put(forged.key, encode_record(forged))

    asyncio.run(write_by_hand())
    proc, instance_id = registrant(env)
    try:
        table = troupe(env, "instances")
        assert table.returncode == 0, table.stderr
        rows = table.stdout.splitlines()[1:]
        assert [row.split()[0] for row in rows] == [instance_id]
        assert f"troupe: ignoring {forged.key}: bound to no lease" in table.stderr
        lines = troupe(env, "instances", "--json").stdout.splitlines()
        assert [json.loads(line)["instance_id"] for line in lines] == [instance_id]
    finally:
        proc.terminate()
        proc.wait(10)


def test_watch_streams_joins_and_leaves_until_interrupted(env: dict[str, str]) -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "troupe", "instances", "--watch", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        proc, instance_id = registrant(env)
        assert watch.stdout is not None
        joined = json.loads(watch.stdout.readline())
        assert joined["event"] == "joined"
        assert joined["instance_id"] == instance_id
        proc.terminate()
        proc.wait(10)
        left = json.loads(watch.stdout.readline())
        assert left == {
            "event": "left",
            "key": f"/services/ns/comp/ep/{instance_id}",
            "instance_id": instance_id,
            "reason": "expired",
        }
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0
    finally:
        watch.kill()


def test_unreachable_store_is_one_line(env: dict[str, str]) -> None:
    env = env | {"DYN_DISCOVERY_BACKEND": "etcd", "ETCD_ENDPOINTS": "http://127.0.0.1:1"}
    result = troupe(env, "instances")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "127.0.0.1:1" in result.stderr


def test_prefix_forms() -> None:
    assert resolve_prefix("") == "/services"
    assert resolve_prefix("dyn://ns.comp.ep") == "/services/ns/comp/ep"
    assert resolve_prefix("/services/ns/") == "/services/ns"
    with pytest.raises(ConfigError):
        resolve_prefix("a.b.c.d")
    with pytest.raises(ConfigError):
        resolve_prefix("Bad.Name")
