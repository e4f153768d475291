"""Records bound to no lease (written by hand) get no traffic, on every key-value backend.

A worker's registration is bound to its runtime's lease, so it vanishes when the worker dies. A
record written without one (``etcdctl put``, a file copied into the file store, ``nats kv put``)
would stay forever: routers ignore it, with one warning per key, and the watcher lets a known
instance go (``Left(reason="unleased")``) when its key is rewritten without a lease.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from troupe import Config, Runtime
from troupe.actors._watcher import Ignored, Instances, WatcherActor
from troupe.config import (
    DiscoveryConfig,
    EtcdConfig,
    FileKvConfig,
    NatsConfig,
    RequestPlaneConfig,
    TcpConfig,
)
from troupe.messages import (
    InstanceRecord,
    decode_record,
    encode_record,
    endpoint_prefix,
    new_instance_id,
    services_prefix,
)
from troupe.testing import EtcdServer, NatsServer
from troupe.testing._wait import eventually

from .conftest import KV_BACKENDS


@pytest.fixture(params=KV_BACKENDS)
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    plane = RequestPlaneConfig(tcp=TcpConfig(host="127.0.0.1"))
    nats = NatsConfig()
    backend = str(request.param)
    if backend == "etcd":
        etcd: EtcdServer = request.getfixturevalue("etcd_server")
        discovery = DiscoveryConfig(kv_store="etcd", etcd=EtcdConfig(endpoints=(etcd.url,)))
    elif backend == "nats":
        server: NatsServer = request.getfixturevalue("nats_server")
        nats = NatsConfig(server=server.url)
        discovery = DiscoveryConfig(kv_store="nats")
    else:
        discovery = DiscoveryConfig(kv_store=backend, file=FileKvConfig(path=str(tmp_path / "kv")))
    return Config(discovery=discovery, request_plane=plane, nats=nats)


@pytest.fixture
def rt(config: Config) -> Iterator[Runtime]:
    with Runtime(config, handle_signals=False) as runtime:
        yield runtime


def _decode(key: str, value: bytes) -> tuple[str, InstanceRecord]:
    record = decode_record(value, key=key)
    return record.instance_id, record


async def echo(request: Any, ctx: Any) -> Any:
    yield request


def test_a_record_bound_to_no_lease_gets_no_traffic(
    rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    ns = f"t{uuid.uuid4().hex[:10]}"  # the etcd and NATS servers are shared by the session
    path = f"{ns}.comp.ep"
    store = rt.store
    rt.serve(path, echo)
    (worker,) = rt.io.run(store.list(services_prefix(ns)), timeout=5)[0]
    real = decode_record(worker.value, key=worker.key)
    assert worker.lease is not None

    def put(record: InstanceRecord, *, lease: int | None = None) -> None:
        rt.io.run(store.put(record.key, encode_record(record), lease=lease), timeout=5)

    def another() -> InstanceRecord:
        return InstanceRecord.create(
            ns, "comp", "ep", instance_id=new_instance_id(), transport=real.transport
        )

    # Another instance id at the worker's address, written twice, as by `etcdctl put`.
    forged, marker = another(), another()
    with caplog.at_level(logging.WARNING, logger="troupe.actors.watcher"):
        put(forged)
        put(msgspec.structs.replace(forged, metadata={"again": True}))
        watcher = rt.spawn(lambda: WatcherActor(store, services_prefix(ns), _decode))
        router = rt.router(path)
        # A leased record written after the forged ones: once the router knows it, it has
        # seen (and ignored) both writes of the forged one. (Its lease outlives the test.)
        put(marker, lease=rt.io.run(store.grant_lease(60.0), timeout=5))
        eventually(
            lambda: router.instance_ids() == sorted([real.instance_id, marker.instance_id]),
            what="the router sees the worker and the marker, not the forged record",
        )
        # The watcher is its own actor: it may see the marker after the router does.
        eventually(
            lambda: sorted(watcher.ask(Instances())) == sorted([real.key, marker.key]),
            what="the watcher sees the worker and the marker",
        )
        assert watcher.ask(Ignored()) == [forged.key]

        warnings = [r.getMessage() for r in caplog.records if "no lease" in r.getMessage()]
        assert len(warnings) == 2, warnings  # once per key and watcher, not once per write
        assert all(forged.key in w for w in warnings)
        assert sum(repr(endpoint_prefix(ns, "comp", "ep")) in w for w in warnings) == 1

        # A known instance whose key is rewritten without a lease leaves the router.
        put(marker)
        eventually(lambda: router.instance_ids() == [real.instance_id], what="marker gone")
        eventually(lambda: watcher.ask(Ignored()) == sorted([forged.key, marker.key]))
        for _ in range(4):
            assert list(router.generate_sync({"n": 1})) == [{"n": 1}]

        # Deleting the forged key forgets it: written again, it is warned about again.
        rt.io.run(store.delete(forged.key), timeout=5)
        eventually(lambda: watcher.ask(Ignored()) == [marker.key], what="forgotten")
        assert router.instance_ids() == [real.instance_id]
