"""A worker process for the multi-process transport tests.

Usage: ``python _worker.py PLANE [NATS_URL]``. Serves the conformance kit's worker endpoints
(``echo``, ``forever``) and ``count`` on PLANE (loopback only), prints its address on one line,
and runs until stdin closes or it is killed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

from troupe import RequestContext
from troupe.config import HttpConfig, NatsConfig, RequestPlaneConfig, TcpConfig
from troupe.testing.conformance import WORKER_ENDPOINTS
from troupe.transports import NetworkManager


async def count(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    for i in range(int(payload)):
        yield str(i).encode()


async def main(plane: str, nats_url: str | None) -> None:
    config = RequestPlaneConfig(
        plane=plane,
        tcp=TcpConfig(host="127.0.0.1"),
        http=HttpConfig(host="127.0.0.1", port=0),
    )
    nats = NatsConfig(server=nats_url) if nats_url else NatsConfig()
    manager = NetworkManager(config, nats)
    server = manager.create_server()
    for name, handler in WORKER_ENDPOINTS.items():
        server.add_endpoint(name, handler)
    server.add_endpoint("count", count)
    await server.start()
    print(server.address, flush=True)
    # Serve until the parent closes our stdin.
    await asyncio.to_thread(sys.stdin.read)
    await server.close()
    await manager.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
