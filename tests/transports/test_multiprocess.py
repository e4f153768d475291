"""Workers in their own processes, one per plane; this process calls all of them at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from troupe.config import NatsConfig, RequestPlaneConfig, TcpConfig
from troupe.transports import NetworkManager

from .conftest import PLANES, REMOTE_PLANES, Plane, WorkerProcess

pytestmark = pytest.mark.slow


async def test_one_caller_holds_workers_on_every_plane(
    request: pytest.FixtureRequest, spawn_worker: Callable[[Plane], WorkerProcess]
) -> None:
    planes = [PLANES[name](request) for name in REMOTE_PLANES]
    workers = [spawn_worker(plane) for plane in planes]
    addresses = await asyncio.gather(*(worker.ready() for worker in workers))
    assert [address.split(":", 1)[0] for address in addresses] == [p.name for p in planes]

    # One manager, configured for tcp serving, reaches every plane by the address's scheme.
    nats = next((p.settings.nats for p in planes if p.name == "nats"), NatsConfig())
    manager = NetworkManager(RequestPlaneConfig(plane="tcp", tcp=TcpConfig()), nats)
    try:

        async def call(address: str, endpoint: str, payload: bytes) -> list[bytes]:
            stream = await manager.client_for(address).request(address, endpoint, payload)
            return await asyncio.wait_for(stream.collect(), 20)

        calls = [call(address, "echo", address.encode()) for address in addresses]
        calls += [call(address, "count", b"5") for address in addresses for _ in range(10)]
        results = await asyncio.gather(*calls)
        assert results[: len(addresses)] == [[address.encode()] for address in addresses]
        assert all(
            result == [str(i).encode() for i in range(5)] for result in results[len(addresses) :]
        )
        assert len({id(manager.client_for(address)) for address in addresses}) == len(addresses)
    finally:
        await manager.close()
