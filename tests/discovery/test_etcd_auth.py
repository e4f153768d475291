"""etcd with authentication, each process's user granted only the ``/services/`` prefix.

The roles are those docs/discovery.md tells operators to create: workers read and write keys
under ``/services/``, frontends and ``troupe instances`` only read them. A worker registers (lease
grant, keep-alive, revoke), a frontend-side runtime routes to it and watches ``/services`` as the
frontend's model table does, and ``troupe instances`` lists it, all without touching a key
outside the prefix (listing ``/services`` as the range ``[/services, /services0)`` would need a
grant on the key ``/services`` itself).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from troupe import Config, Runtime
from troupe.actors._watcher import Instances, WatcherActor
from troupe.config import EtcdConfig
from troupe.discovery import EtcdStore
from troupe.errors import DiscoveryError, DiscoveryUnavailable
from troupe.messages import (
    SERVICES_PREFIX,
    InstanceRecord,
    decode_record,
    encode_record,
    new_instance_id,
)
from troupe.testing import EtcdServer
from troupe.testing._wait import eventually

ROOT_PASSWORD = "root-pw-3141"
WORKER_PASSWORD = "worker-pw-2718"
FRONTEND_PASSWORD = "frontend-pw-1618"


@pytest.fixture
def etcd(fresh_etcd_server: EtcdServer) -> EtcdServer:
    """etcd with auth on: root, and a worker and a frontend user scoped to ``/services/``."""
    server = fresh_etcd_server
    server.enable_auth(ROOT_PASSWORD)
    server.add_role("troupe-worker", "/services/", permission="readwrite")
    server.add_role("troupe-reader", "/services/", permission="read")
    server.add_user("worker", WORKER_PASSWORD, roles=["troupe-worker"])
    server.add_user("frontend", FRONTEND_PASSWORD, roles=["troupe-reader"])
    return server


def env_of(server: EtcdServer, user: str, password: str) -> dict[str, str]:
    return {
        "DYN_DISCOVERY_BACKEND": "etcd",
        "ETCD_ENDPOINTS": server.url,
        "ETCD_AUTH_USERNAME": user,
        "ETCD_AUTH_PASSWORD": password,
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_LEASE_TTL": "2",
        "DYN_LOG": "warning",
    }


@pytest.fixture
def worker_env(etcd: EtcdServer) -> dict[str, str]:
    return env_of(etcd, "worker", WORKER_PASSWORD)


@pytest.fixture
def frontend_env(etcd: EtcdServer) -> dict[str, str]:
    return env_of(etcd, "frontend", FRONTEND_PASSWORD)


@pytest.fixture
def worker(worker_env: dict[str, str]) -> Iterator[Runtime]:
    with Runtime(Config.from_env(worker_env), handle_signals=False) as rt:
        yield rt


@pytest.fixture
def frontend(frontend_env: dict[str, str]) -> Iterator[Runtime]:
    with Runtime(Config.from_env(frontend_env), handle_signals=False) as rt:
        yield rt


def troupe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "troupe", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ) | env,  # os.environ is scrubbed of troupe variables (conftest)
        timeout=30,
        check=False,
    )


async def echo(request: Any, ctx: Any) -> Any:
    yield request


def _decode(key: str, value: bytes) -> tuple[str, InstanceRecord]:
    record = decode_record(value, key=key)
    return record.instance_id, record


async def test_leases_need_no_key_permission(etcd: EtcdServer) -> None:
    config = EtcdConfig(endpoints=(etcd.url,), username="worker", password=WORKER_PASSWORD)
    async with EtcdStore(config) as store:
        lease = await store.grant_lease(2.0)
        await store.put("/services/ns/comp/ep/00000000000000aa", b"{}", lease=lease)
        await store.keep_alive(lease)
        await store.revoke_lease(lease)  # needs write access to the lease's keys: granted
        items, _ = await store.list(SERVICES_PREFIX)
        assert items == []
        with pytest.raises(DiscoveryError) as denied:
            await store.put("/elsewhere", b"no")
        assert "permission denied" in str(denied.value)
        assert not isinstance(denied.value, DiscoveryUnavailable)


def test_worker_frontend_and_troupe_instances_need_only_the_services_prefix(
    etcd: EtcdServer, worker: Runtime, frontend: Runtime, frontend_env: dict[str, str]
) -> None:
    serving = worker.serve("ns.comp.ep", echo)
    (registered,) = worker.io.run(worker.store.list("/services/ns/comp/ep"), timeout=5)[0]
    record = decode_record(registered.value, key=registered.key)

    # The frontend side: a router on the endpoint, and a watch of all of /services as the
    # frontend's model table keeps.
    router = frontend.router("ns.comp.ep")
    assert router.wait_for_instances_sync(timeout=10) == [record.instance_id]
    assert list(router.generate_sync({"hello": "world"})) == [{"hello": "world"}]
    store = frontend.store
    everything = frontend.spawn(lambda: WatcherActor(store, SERVICES_PREFIX, _decode))
    eventually(lambda: list(everything.ask(Instances())) == [record.key], what="watched")
    items, _ = frontend.io.run(store.list(SERVICES_PREFIX), timeout=5)
    assert [kv.key for kv in items] == [record.key]
    with pytest.raises(DiscoveryError) as denied:  # read-only: it cannot register anything
        frontend.io.run(store.put("/services/ns/comp/ep/00000000000000bb", b"{}"), timeout=5)
    assert "permission denied" in str(denied.value)

    # An operator with the root role writes a record by hand, without a lease.
    forged = InstanceRecord.create(
        "ns", "comp", "ep", instance_id=new_instance_id(), transport=record.transport
    )
    root = EtcdConfig(endpoints=(etcd.url,), username="root", password=ROOT_PASSWORD)

    async def forge() -> None:
        async with EtcdStore(root) as admin:
            await admin.put(forged.key, encode_record(forged))

    frontend.io.run(forge(), timeout=10)

    for args in (("instances",), ("instances", "ns.comp"), ("instances", "/services/")):
        listed = troupe(frontend_env, *args)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert len(lines) == 2, listed.stdout  # the header and the worker
        assert lines[1].split()[:4] == [record.instance_id, "ns", "comp", "ep"]
        assert f"troupe: ignoring {forged.key}: bound to no lease" in listed.stderr
    assert router.instance_ids() == [record.instance_id]

    # A clean stop revokes the lease (the worker may write its keys): the frontend sees it go.
    serving.stop()
    eventually(lambda: router.instance_ids() == [], what="the worker left")


def test_a_refused_password_is_one_line_that_does_not_echo_it(
    frontend_env: dict[str, str],
) -> None:
    result = troupe(frontend_env | {"ETCD_AUTH_PASSWORD": "wrong-pw-5772"}, "instances")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "authentication failed" in result.stderr
    assert "'frontend'" in result.stderr
    assert "wrong-pw-5772" not in result.stderr
