"""Across processes: a worker registers with a lease and is SIGKILLed; the watcher sees it leave.

Runs on the stores that several processes can share (file, etcd, NATS), with real processes and,
for etcd and NATS, real servers.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from troupe.config import DiscoveryConfig, EtcdConfig, FileKvConfig, NatsConfig
from troupe.discovery import Delete, KeyValueStore, Put, Watch, open_store
from troupe.messages import InstanceRecord, decode_record, endpoint_prefix, new_instance_id

from ._helpers import WatchReader, wait_until

Readers = Callable[[Watch], WatchReader]
TTL = 1.5  # short to keep the test quick, long enough for keep-alives on a loaded 2-core box

# The worker: registers one instance record under a lease, keeps the lease alive, never exits.
WORKER = """
import asyncio, sys
from troupe.config import DiscoveryConfig, EtcdConfig, FileKvConfig, NatsConfig
from troupe.discovery import open_store
from troupe.messages import InstanceRecord, encode_record

async def main() -> None:
    kv_store, where, instance_id, ttl = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    config = DiscoveryConfig(
        kv_store=kv_store,
        etcd=EtcdConfig(endpoints=(where,) if kv_store == "etcd" else ("http://x:1",)),
        file=FileKvConfig(path=where),
    )
    store = open_store(config, NatsConfig(server=where if kv_store == "nats" else "nats://x:1"))
    await store.connect()
    record = InstanceRecord.create(
        "ns", "comp", "ep", instance_id=instance_id, transport={"tcp": "tcp://127.0.0.1:4000"}
    )
    lease = await store.grant_lease(ttl)
    await store.put(record.key, encode_record(record), lease=lease)
    print("registered", flush=True)
    while True:
        await asyncio.sleep(ttl / 3)
        await store.keep_alive(lease)

asyncio.run(main())
"""


@pytest.fixture(params=["file", "etcd", "nats"])
def shared_backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """A backend that processes can share, and where it lives (directory or URL)."""
    name = str(request.param)
    if name == "file":
        return name, str(tmp_path / "kv")
    server = request.getfixturevalue("etcd_server" if name == "etcd" else "nats_server")
    return name, str(server.url)


def _store(kv_store: str, where: str) -> KeyValueStore:
    config = DiscoveryConfig(
        kv_store=kv_store,
        etcd=EtcdConfig(endpoints=(where,) if kv_store == "etcd" else ("http://x:1",)),
        file=FileKvConfig(path=where),
    )
    return open_store(config, NatsConfig(server=where if kv_store == "nats" else "nats://x:1"))


@pytest.mark.slow
async def test_a_killed_worker_leaves_within_ttl(
    shared_backend: tuple[str, str], readers: Readers
) -> None:
    kv_store, where = shared_backend
    instance_id = new_instance_id()
    prefix = endpoint_prefix("ns", "comp", "ep")
    async with _store(kv_store, where) as store:
        watch = readers(store.watch(prefix))
        await watch.snapshot()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER, kv_store, where, instance_id, str(TTL),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"registered\n"
            joined = await watch.until(lambda e: isinstance(e, Put), timeout=5)
            assert isinstance(joined, Put)
            assert joined.key == f"{prefix}/{instance_id}"
            record = decode_record(joined.kv.value, key=joined.key)
            assert isinstance(record, InstanceRecord)
            assert record.pid == proc.pid
            # The worker keeps its key alive past several TTLs: no Delete of it meanwhile.
            until = asyncio.get_running_loop().time() + 2 * TTL
            await watch.none_until(lambda e: isinstance(e, Delete), until)
            assert await store.get(joined.key) is not None
        finally:
            proc.kill()
            await proc.wait()
        killed = time.monotonic()
        left = await watch.until(lambda e: isinstance(e, Delete), timeout=TTL + 2.0)
        assert isinstance(left, Delete)
        assert (left.key, left.expired) == (f"{prefix}/{instance_id}", True)
        assert time.monotonic() - killed < TTL + 2.0

        async def gone() -> bool:
            return await store.get(f"{prefix}/{instance_id}") is None

        await wait_until(gone, timeout=2.0, what="the dead worker's key is gone")
