"""The file store across threads, and its on-disk layout (processes: test_multiprocess.py)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from troupe.config import FileKvConfig
from troupe.discovery import FileStore
from troupe.discovery._file import decode_file_name, encode_file_name
from troupe.errors import DiscoveryError, DiscoveryUnavailable, KeyExists

from ._helpers import wait_until


def config(tmp_path: Path) -> FileKvConfig:
    return FileKvConfig(path=str(tmp_path / "kv"))


def test_file_names_are_percent_encoded_keys() -> None:
    key = "/services/ns/comp/ep/694d98147d54be25"
    assert encode_file_name(key) == "%2Fservices%2Fns%2Fcomp%2Fep%2F694d98147d54be25"
    assert encode_file_name(".tmp_x/a.b") == "%2Etmp_x%2Fa%2Eb"  # never a dot file
    for k in (key, ".tmp_x/a.b", "ünï/cødé space", "a%2Fb"):
        assert decode_file_name(encode_file_name(k)) == k
    assert decode_file_name(".revision") is None


def test_sixteen_threads_creating_one_key_give_one_winner(tmp_path: Path) -> None:
    key = "/services/ns/comp/ep/contended"
    barrier = threading.Barrier(16)
    results: list[str] = []
    lock = threading.Lock()

    def creator(i: int) -> None:
        async def run() -> str:
            async with FileStore(config(tmp_path)) as store:
                barrier.wait(timeout=10)
                try:
                    await store.create(key, f"creator-{i}".encode())
                except KeyExists:
                    return "lost"
                return f"won-{i}"

        outcome = asyncio.run(run())
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=creator, args=(i,), name=f"creator-{i}") for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    winners = [r for r in results if r.startswith("won")]
    assert len(results) == 16
    assert len(winners) == 1, results
    data = (tmp_path / "kv" / encode_file_name(key)).read_bytes()
    assert data.endswith(f"creator-{winners[0].split('-')[1]}".encode())
    assert not [n for n in os.listdir(tmp_path / "kv") if n.startswith(".tmp_")]


async def test_an_expired_file_is_invisible_and_reaped(tmp_path: Path) -> None:
    async with FileStore(config(tmp_path), reap_interval=3600) as owner:
        lease = await owner.grant_lease(5.0)
        await owner.put("/k/stale", b"v", lease=lease)
        path = tmp_path / "kv" / encode_file_name("/k/stale")
        old = time.time() - 10
        os.utime(path, (old, old))  # as if the owner stopped refreshing 10 s ago
        assert await owner.get("/k/stale") is None
        assert (await owner.list("/k"))[0] == []
        await owner.create("/k/stale", b"new")  # an expired key counts as absent
        kv = await owner.get("/k/stale")
        assert kv is not None
        assert (kv.value, kv.lease) == (b"new", None)

    async with FileStore(config(tmp_path), reap_interval=0.05) as other:
        lease = await other.grant_lease(5.0)
        await other.put("/k/orphan", b"v", lease=lease)
    orphan = tmp_path / "kv" / encode_file_name("/k/orphan")
    os.utime(orphan, (old, old))  # its owner is gone: any live store removes it
    async with FileStore(config(tmp_path), reap_interval=0.05):

        async def reaped() -> bool:
            return not orphan.exists()

        await wait_until(reaped, timeout=3.0, what="a live store reaps the orphan")


async def test_temporary_and_foreign_files(tmp_path: Path) -> None:
    async with FileStore(config(tmp_path)) as store:
        (tmp_path / "kv" / ".tmp_deadbeef").write_bytes(b"half-written")
        (tmp_path / "kv" / "plain").write_bytes(b"written by hand")
        items, _ = await store.list("")
        assert [(kv.key, kv.value, kv.lease) for kv in items] == [
            ("plain", b"written by hand", None)
        ]


async def test_the_revision_is_shared_by_stores(tmp_path: Path) -> None:
    async with FileStore(config(tmp_path)) as a, FileStore(config(tmp_path)) as b:
        r1 = await a.put("/x", b"1")
        r2 = await b.put("/y", b"2")
        assert await a.delete("/x")
        _, r3 = await b.list("")
        assert r1 < r2 < r3


async def test_a_key_too_long_for_a_file_name_is_refused(tmp_path: Path) -> None:
    async with FileStore(config(tmp_path)) as store:
        with pytest.raises(DiscoveryError) as info:
            await store.put("/" + "k" * 300, b"v")
        assert not isinstance(info.value, DiscoveryUnavailable)
        assert "too long" in str(info.value)


async def test_a_file_with_a_lease_but_no_ttl_is_bound_to_no_lease(tmp_path: Path) -> None:
    # Written by hand to look like a worker's registration: nothing would ever expire it.
    async with FileStore(config(tmp_path)) as store:
        lease = await store.grant_lease(30.0)
        await store.put("/k/real", b"v", lease=lease)
        name = encode_file_name("/k/forged")
        (tmp_path / "kv" / name).write_bytes(b'#troupe-kv {"rev":1,"lease":7}\nforged')
        items, _ = await store.list("/k")
        assert [(kv.key, kv.lease) for kv in items] == [("/k/forged", None), ("/k/real", lease)]
