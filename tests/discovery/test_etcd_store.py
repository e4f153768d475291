"""The etcd store on real servers: restarts, fail-over between endpoints, auth and TLS."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from troupe.config import EtcdConfig
from troupe.discovery import EtcdStore, Put, Watch
from troupe.errors import DiscoveryError, DiscoveryUnavailable
from troupe.messages import InstanceRecord, encode_record, new_instance_id
from troupe.testing import EtcdServer, free_port, make_tls_files

from ._helpers import WatchReader, is_put

Readers = Callable[[Watch], WatchReader]


@pytest.mark.slow
async def test_a_restart_breaks_the_watch_and_a_new_watch_resumes(
    fresh_etcd_server: EtcdServer, readers: Readers
) -> None:
    server = fresh_etcd_server
    async with EtcdStore(EtcdConfig(endpoints=(server.url,), connect_timeout=1.0)) as store:
        await store.put("/services/a", b"1")
        first = readers(store.watch("/services"))
        assert [kv.key for kv in (await first.snapshot()).items] == ["/services/a"]

        server.stop()
        await first.ended.wait()
        assert isinstance(first.error, DiscoveryUnavailable)
        started = time.monotonic()
        with pytest.raises(DiscoveryUnavailable) as info:
            await store.put("/services/b", b"2")
        assert time.monotonic() - started < 3.0
        assert server.url in str(info.value)

        server.start()
        second = readers(store.watch("/services"))
        snapshot = await second.snapshot(timeout=10)
        assert [kv.key for kv in snapshot.items] == ["/services/a"]  # etcd kept its data
        await store.put("/services/c", b"3")
        assert isinstance(await second.until(is_put("/services/c")), Put)


async def test_a_dead_first_endpoint_is_skipped(etcd_server: EtcdServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = EtcdConfig(endpoints=(dead, etcd_server.url), connect_timeout=2.0)
    async with EtcdStore(config) as store:
        rev = await store.put("/failover/k", b"v")
        kv = await store.get("/failover/k")
        assert kv is not None
        assert kv.revision == rev


@pytest.mark.slow
async def test_losing_the_current_endpoint_fails_over_to_the_next(
    fresh_etcd_server: EtcdServer,
) -> None:
    with EtcdServer() as other:
        servers = {fresh_etcd_server.url: fresh_etcd_server, other.url: other}
        config = EtcdConfig(endpoints=tuple(servers), connect_timeout=2.0)
        async with EtcdStore(config) as store:
            await store.put("/failover/first", b"1")
            used = [
                url
                for url, server in servers.items()
                if "/failover/first" in server.etcdctl("get", "--prefix", "/failover/")
            ]
            assert len(used) == 1
            servers[used[0]].kill()
            await store.put("/failover/second", b"2")  # no error: the other endpoint took over
            (survivor,) = (s for url, s in servers.items() if url != used[0])
            assert "/failover/second" in survivor.etcdctl("get", "/failover/second")


async def test_nothing_reachable_names_every_endpoint() -> None:
    urls = (f"http://127.0.0.1:{free_port()}", f"http://localhost:{free_port()}")
    store = EtcdStore(EtcdConfig(endpoints=urls, connect_timeout=1.0))
    with pytest.raises(DiscoveryUnavailable) as info:
        await store.connect()
    assert info.value.endpoints == urls
    for url in urls:
        assert url in str(info.value)
    await store.close()


@pytest.mark.slow
async def test_basic_auth(fresh_etcd_server: EtcdServer, readers: Readers) -> None:
    server = fresh_etcd_server
    server.enable_auth("root-secret")
    server.add_user("app", "app-secret", prefix="/services/")
    good = EtcdConfig(endpoints=(server.url,), username="app", password="app-secret")
    async with EtcdStore(good) as store:
        lease = await store.grant_lease(5)
        await store.put("/services/ns/x", b"1", lease=lease)
        watch = readers(store.watch("/services/ns"))
        assert len((await watch.snapshot()).items) == 1
        await store.keep_alive(lease)
        with pytest.raises(DiscoveryError) as denied:
            await store.put("/elsewhere", b"no")
        assert not isinstance(denied.value, DiscoveryUnavailable)
        assert "permission denied" in str(denied.value)
        await store.revoke_lease(lease)
    assert "/services/ns/x" not in server.etcdctl("get", "--prefix", "/services/")

    bad = EtcdConfig(endpoints=(server.url,), username="app", password="wrong")
    store = EtcdStore(bad)
    with pytest.raises(DiscoveryError) as info:
        await store.connect()
    assert not isinstance(info.value, DiscoveryUnavailable)  # retrying will not help
    assert "authentication failed" in str(info.value)
    assert "'app'" in str(info.value)
    await store.close()


@pytest.mark.slow
async def test_an_expired_auth_token_is_renewed() -> None:
    with EtcdServer(extra_args=["--auth-token-ttl=1"]) as server:
        server.enable_auth("root-secret")
        server.add_user("app", "app-secret")
        config = EtcdConfig(endpoints=(server.url,), username="app", password="app-secret")
        async with EtcdStore(config) as store:
            await store.put("/k", b"1")
            await asyncio.sleep(2.5)  # the server forgets idle simple tokens after 1 s
            await store.put("/k", b"2")  # re-authenticates instead of failing
            kv = await store.get("/k")
            assert kv is not None
            assert kv.value == b"2"


@pytest.mark.slow
async def test_tls_with_client_certificates(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "tls")
    with EtcdServer(tls=files) as server:
        assert server.url.startswith("https://")
        config = EtcdConfig(
            endpoints=(server.url,),
            ca=files.ca,
            client_cert=files.client_cert,
            client_key=files.client_key,
        )
        async with EtcdStore(config) as store:
            await store.put("/tls/k", b"secure")
            kv = await store.get("/tls/k")
            assert kv is not None
            assert kv.value == b"secure"

        no_cert = EtcdConfig(endpoints=(server.url,), ca=files.ca, connect_timeout=1.0)
        store = EtcdStore(no_cert)
        with pytest.raises(DiscoveryError):
            await store.connect()
        await store.close()


async def test_a_registration_reads_well_in_etcdctl(etcd_server: EtcdServer) -> None:
    instance_id = new_instance_id()
    record = InstanceRecord.create(
        "demo", "backend", "generate", instance_id=instance_id, transport={"tcp": "tcp://h:1"}
    )
    async with EtcdStore(EtcdConfig(endpoints=(etcd_server.url,))) as store:
        lease = await store.grant_lease(10)
        await store.put(record.key, encode_record(record), lease=lease)
        shown = etcd_server.etcdctl("get", "--prefix", "/services/demo/").splitlines()
        await store.revoke_lease(lease)
    assert shown[0] == f"/services/demo/backend/generate/{instance_id}"
    assert json.loads(shown[1])["transport"] == {"tcp": "tcp://h:1"}
    assert etcd_server.etcdctl("get", "--prefix", "/services/demo/") == ""
