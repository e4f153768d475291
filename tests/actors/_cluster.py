"""The router tests' cluster (``test_router*.py``): a frontend runtime plus workers registered
under ``ns/comp/ep``, sharing one MemoryKvServer, each with its own instance id and lease:
in-process servers (on the frontend's I/O loop, the in-process transport needs one loop) or real
TCP servers on 127.0.0.1 (``Runtime.serve``)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from troupe import Config, RequestContext, Runtime
from troupe.actors.routing import (
    Router,
    spawn_router,
)
from troupe.config import DiscoveryConfig, RequestPlaneConfig, TcpConfig
from troupe.discovery import MemoryKvServer
from troupe.messages import decode_payload, encode_payload
from troupe.testing._wait import eventually
from troupe.transports import InprocRegistry, InprocServer, NetworkManager, resumable

NS, COMP, NAME = "ns", "comp", "ep"
EP = f"{NS}.{COMP}.{NAME}"
PLANE = RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1", connect_timeout=0.5))
CONFIG = Config(discovery=DiscoveryConfig(kv_store="memory"), request_plane=PLANE)

UserHandler = Callable[[Any, RequestContext], AsyncIterator[Any]]


def adapt(handler: UserHandler) -> Callable[[bytes, RequestContext], AsyncIterator[bytes]]:
    """A transport-level handler (bytes in, bytes out) from an object-level one."""

    async def serve(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        async for item in handler(decode_payload(payload), ctx):
            yield encode_payload(item)

    return serve


@dataclass
class Worker:
    rt: Runtime
    server: Any
    io: Any
    seen: list[tuple[str, int]] = field(default_factory=list)  # (request kind, ctx.attempt)
    received: list[int] = field(default_factory=list)  # ctx.received of each request
    stopped: threading.Event = field(default_factory=threading.Event)
    stop_reason: list[str | None] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.rt.instance_id

    def kill(self) -> None:
        """Close the worker's server abruptly; its registration stays (as after a hang)."""
        self.io.run(self.server.close(), timeout=10)


def behaviour(worker_box: list[Worker]) -> UserHandler:
    """What every test worker does, by request kind.

    ``"who"``: yields the worker's id. ``"count"``: yields 0..n-1. ``"hang"``: yields its id, then
    waits until stopped. ``"resume"``: on attempt 0 yields its id and hangs; later attempts yield
    ``("rest", id, attempt)``. ``"stream"``: yields ``skip + ctx.received .. n-1`` (``skip`` from
    the request), and on attempt 0 hangs after yielding ``hang_at`` (``None``: before any).
    """

    async def handler(request: dict[str, Any], ctx: RequestContext) -> AsyncIterator[Any]:
        worker = worker_box[0]
        kind = request["kind"]
        worker.seen.append((kind, ctx.attempt))
        worker.received.append(ctx.received)
        if kind == "stream":
            hang_at = request.get("hang_at") if ctx.attempt == 0 else -1
            if hang_at is None:
                await ctx.wait_stopped()
                return
            for i in range(request.get("skip", 0) + ctx.received, request["n"]):
                yield i
                if i == hang_at:
                    await ctx.wait_stopped()
                    return
        elif kind == "who":
            yield worker.id
        elif kind == "count":
            for i in range(request["n"]):
                yield i
        elif kind == "hang" or (kind == "resume" and ctx.attempt == 0):
            yield worker.id
            try:
                await ctx.wait_stopped()
            finally:
                worker.stop_reason.append(ctx.stop_reason)
                worker.stopped.set()
        else:
            yield ("rest", worker.id, ctx.attempt)

    return handler


class Cluster:
    """A frontend runtime plus workers registered under ``ns/comp/ep``."""

    def __init__(self) -> None:
        self.kv = MemoryKvServer()
        self.rt = Runtime(CONFIG, handle_signals=False, memory_server=self.kv).start()
        self.registry = InprocRegistry()
        self.net = NetworkManager(PLANE, inproc=self.registry)
        self.workers: list[Worker] = []
        self.routers: list[Router] = []

    def _runtime(self) -> Runtime:
        return Runtime(CONFIG, handle_signals=False, memory_server=self.kv).start()

    def inproc_worker(self) -> Worker:
        wrt = self._runtime()
        box: list[Worker] = []
        server = InprocServer(self.registry)

        async def start() -> None:
            server.add_endpoint(EP, adapt(behaviour(box)))
            await server.start()

        self.rt.io.run(start(), timeout=5)
        box.append(Worker(wrt, server, self.rt.io))
        self.workers.append(box[0])
        wrt.register(NS, COMP, NAME, {"inproc": server.address})
        return box[0]

    def tcp_worker(self, *, can_resume: bool = True, max_inflight: int | None = None) -> Worker:
        wrt = self._runtime()
        box: list[Worker] = []
        handler = behaviour(box)

        async def serve(request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
            async for item in handler(request, ctx):
                yield item

        box.append(Worker(wrt, None, wrt.io))
        self.workers.append(box[0])
        wrt.serve(
            EP, resumable(serve) if can_resume else serve, grace=0.0, max_inflight=max_inflight
        )
        box[0].server = wrt.server()
        return box[0]

    def router(self, *, expect: int, **kwargs: Any) -> Router:
        router = spawn_router(self.rt.system, self.rt.store, self.net, self.rt.io, EP, **kwargs)
        self.routers.append(router)
        eventually(lambda: len(router.instance_ids()) == expect, what=f"{expect} instances")
        return router

    def close(self) -> None:
        for router in self.routers:
            router.close()
        for worker in self.workers:
            worker.rt.close()
        for worker in self.workers:
            if isinstance(worker.server, InprocServer):
                self.rt.io.run(worker.server.close(), timeout=5)
        self.rt.io.run(self.net.close(), timeout=5)
        self.rt.close()


def call(router: Router, kind: str = "who", **kw: Any) -> list[Any]:
    instance_id = kw.pop("instance_id", None)
    return list(router.generate_sync({"kind": kind, **kw}, instance_id=instance_id))
