"""RouterActor and Router: policies, snapshots, set-aside, migration, and the loop bridges.

Workers are separate Runtimes sharing one MemoryKvServer with the frontend, so each has its own
instance id and lease: in-process servers (on the frontend's I/O loop, the in-process transport
needs one loop) or real TCP servers on 127.0.0.1 (``Runtime.serve``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from troupe import Config, Runtime
from troupe._support._clock import VirtualClock
from troupe.actors import Actor, ActorSystem, Joined, Left, Subscribe
from troupe.actors.routing import (
    Retries,
    RoutedInstance,
    Router,
    RouterActor,
    SetAside,
    SnapshotHolder,
    choose_address,
    spawn_router,
)
from troupe.config import DiscoveryConfig, RequestPlaneConfig, TcpConfig
from troupe.discovery import MemoryKvServer
from troupe.errors import (
    ConfigError,
    IncompatibleInstances,
    InstanceNotFound,
    NoInstances,
    Overloaded,
    StreamBroken,
    StreamNotResumable,
    TroupeError,
)
from troupe.messages import WIRE_VERSION, InstanceRecord, decode_record, encode_record
from troupe.messages._payload import decode_payload, encode_payload
from troupe.testing._wait import eventually
from troupe.transports import (
    InprocRegistry,
    InprocServer,
    NetworkManager,
    RequestContext,
    resumable,
)

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


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


def call(router: Router, kind: str = "who", **kw: Any) -> list[Any]:
    instance_id = kw.pop("instance_id", None)
    return list(router.generate_sync({"kind": kind, **kw}, instance_id=instance_id))


# --- policies ------------------------------------------------------------------------------------


def test_round_robin_visits_each_of_three_once_per_three_calls(cluster: Cluster) -> None:
    ids = {cluster.inproc_worker().id for _ in range(3)}
    router = cluster.router(expect=3, policy="round_robin")
    served = [call(router)[0] for _ in range(9)]
    for start in (0, 3, 6):
        assert set(served[start : start + 3]) == ids
    assert served[0:3] == served[3:6] == served[6:9]


def test_direct_routing_and_unknown_instance_fails_at_once(cluster: Cluster) -> None:
    a, b = cluster.inproc_worker(), cluster.inproc_worker()
    router = cluster.router(expect=2)
    assert call(router, instance_id=b.id) == [b.id]
    assert call(router, instance_id=a.id) == [a.id]
    with pytest.raises(InstanceNotFound) as info:
        call(router, instance_id="0123456789abcdef")
    assert info.value.instance_id == "0123456789abcdef"
    assert a.seen == [("who", 0)]  # nothing was sent for the unknown id


def test_least_loaded_prefers_the_idle_instance(cluster: Cluster) -> None:
    a, b = cluster.inproc_worker(), cluster.inproc_worker()
    router = cluster.router(expect=2, policy="least_loaded")
    hanging = router.generate_sync({"kind": "hang"})
    busy = next(hanging)
    idle = b.id if busy == a.id else a.id
    assert [call(router)[0] for _ in range(10)] == [idle] * 10
    hanging.close()  # cancels the request
    busy_worker = a if busy == a.id else b
    assert busy_worker.stopped.wait(5)
    assert busy_worker.stop_reason == ["cancelled"]


def test_random_policy_reaches_every_instance(cluster: Cluster) -> None:
    ids = {cluster.inproc_worker().id for _ in range(2)}
    router = cluster.router(expect=2, policy="random")
    served: set[str] = set()
    eventually(lambda: served.add(call(router)[0]) or served == ids)


def test_unknown_policy_is_a_config_error(cluster: Cluster) -> None:
    with pytest.raises(ConfigError) as info:
        spawn_router(
            cluster.rt.system, cluster.rt.store, cluster.net, cluster.rt.io, EP, policy="x"
        )
    assert "round_robin" in str(info.value)
    with pytest.raises(ConfigError):
        spawn_router(
            cluster.rt.system, cluster.rt.store, cluster.net, cluster.rt.io, EP, migration_limit=-1
        )


# --- membership ----------------------------------------------------------------------------------


def test_no_instances_fails_at_once_then_wait_for_instances_succeeds(cluster: Cluster) -> None:
    router = cluster.router(expect=0)
    with pytest.raises(NoInstances) as info:
        call(router)
    assert info.value.endpoint == EP
    with pytest.raises(NoInstances):
        router.wait_for_instances_sync(timeout=0.05)
    waiting = cluster.rt.io.submit(router.wait_for_instances(timeout=5))
    waiting_sync: list[list[str]] = []
    thread = threading.Thread(
        target=lambda: waiting_sync.append(router.wait_for_instances_sync(5)), name="waiter"
    )
    thread.start()
    worker = cluster.inproc_worker()
    assert waiting.result(5) == [worker.id]
    thread.join(5)
    assert waiting_sync == [[worker.id]]
    assert call(router) == [worker.id]


def test_wait_for_snapshot_returns_the_first_matching_snapshot(cluster: Cluster) -> None:
    router = cluster.router(expect=0)
    first = cluster.inproc_worker()
    two = cluster.rt.io.submit(router.wait_for_snapshot(lambda s: len(s.instances) == 2, timeout=5))
    assert (
        cluster.rt.io.run(router.wait_for_snapshot(lambda s: len(s.instances) == 3, timeout=0.05))
        is None
    )  # timed out: None, not an exception
    second = cluster.inproc_worker()
    snapshot = two.result(5)
    assert snapshot is not None
    assert {i.instance_id for i in snapshot.instances} == {first.id, second.id}


def test_left_removes_the_instance_at_once(cluster: Cluster) -> None:
    a, b = cluster.inproc_worker(), cluster.inproc_worker()
    router = cluster.router(expect=2)
    a.rt.close()  # the clean stop revokes its lease: Left
    eventually(lambda: router.instance_ids() == [b.id])
    assert [call(router)[0] for _ in range(4)] == [b.id] * 4
    assert a.seen == []


# --- failures ------------------------------------------------------------------------------------


def test_killed_worker_gives_a_typed_error_and_is_set_aside(cluster: Cluster) -> None:
    a, b = cluster.tcp_worker(), cluster.tcp_worker()
    router = cluster.router(expect=2, set_aside_for=30.0)
    stream = router.generate_sync({"kind": "hang"})
    victim_id = next(stream)
    victim, survivor = (a, b) if victim_id == a.id else (b, a)
    victim.kill()
    with pytest.raises(StreamBroken):
        next(stream)
    eventually(lambda: victim.id in router.snapshot.set_aside)
    assert router.instance_ids() == sorted([a.id, b.id])  # still registered, only set aside
    assert [call(router)[0] for _ in range(4)] == [survivor.id] * 4


def test_migration_completes_a_broken_stream_on_another_instance(cluster: Cluster) -> None:
    a, b = cluster.tcp_worker(), cluster.tcp_worker()
    router = cluster.router(expect=2, migration_limit=2)
    stream = router.generate_sync({"kind": "resume"})
    first = next(stream)
    victim, survivor = (a, b) if first == a.id else (b, a)
    victim.kill()
    assert list(stream) == [["rest", survivor.id, 1]]  # msgpack turns tuples into lists
    assert survivor.seen == [("resume", 1)]
    assert survivor.received == [1]  # told what its caller already had
    assert victim.seen == [("resume", 0)]
    eventually(lambda: victim.id in router.snapshot.set_aside)


def _victim(cluster: Cluster, served_by: str) -> tuple[Worker, Worker]:
    a, b = cluster.workers[-2:]
    return (a, b) if served_by == a.id else (b, a)


def _who_has(cluster: Cluster, count: int) -> Worker:
    """The worker that has received ``count`` requests (waited for)."""
    eventually(lambda: any(len(w.seen) == count for w in cluster.workers), what="the request")
    return next(w for w in cluster.workers if len(w.seen) == count)


def test_a_migrated_stream_continues_where_it_broke_never_repeating(cluster: Cluster) -> None:
    cluster.tcp_worker()
    cluster.tcp_worker()
    router = cluster.router(expect=2, migration_limit=1)
    stream = router.generate_sync({"kind": "stream", "n": 8, "hang_at": 2})
    got = [next(stream), next(stream), next(stream)]
    victim = _who_has(cluster, 1)
    survivor = next(w for w in cluster.workers if w is not victim)
    victim.kill()
    got += list(stream)
    assert got == list(range(8))  # every chunk once, in order
    assert survivor.seen == [("stream", 1)]
    assert survivor.received == [3]


def test_a_handler_that_cannot_resume_is_not_migrated_past_its_first_chunk(
    cluster: Cluster,
) -> None:
    cluster.tcp_worker(can_resume=False)
    cluster.tcp_worker(can_resume=False)
    router = cluster.router(expect=2, migration_limit=2)
    stream = router.generate_sync({"kind": "stream", "n": 8, "hang_at": 1})
    assert [next(stream), next(stream)] == [0, 1]
    victim = _who_has(cluster, 1)
    survivor = next(w for w in cluster.workers if w is not victim)
    victim.kill()
    with pytest.raises(StreamNotResumable) as info:
        next(stream)
    assert info.value.received == 2
    assert "resumable" in str(info.value)
    assert "resume hook" in str(info.value)
    assert survivor.seen == []  # not re-sent: it would have repeated chunks 0 and 1


def test_a_request_that_breaks_before_its_first_chunk_moves_without_resuming(
    cluster: Cluster,
) -> None:
    cluster.tcp_worker(can_resume=False)
    cluster.tcp_worker(can_resume=False)
    router = cluster.router(expect=2, migration_limit=1)
    stream = router.generate_sync({"kind": "stream", "n": 3, "hang_at": None})
    box: list[list[Any]] = []
    reader = threading.Thread(target=lambda: box.append(list(stream)))
    reader.start()
    victim = _who_has(cluster, 1)
    survivor = next(w for w in cluster.workers if w is not victim)
    victim.kill()
    reader.join(10)
    assert box == [[0, 1, 2]]
    assert survivor.seen == [("stream", 1)]
    assert survivor.received == [0]


def test_a_resume_hook_rewrites_the_request_for_the_next_instance(cluster: Cluster) -> None:
    cluster.tcp_worker(can_resume=False)
    cluster.tcp_worker(can_resume=False)
    calls: list[tuple[Any, list[Any]]] = []

    def resume(request: Any, received: list[Any]) -> Any:
        calls.append((request, received))
        return {**request, "skip": len(received)}

    router = cluster.router(expect=2, migration_limit=1, resume=resume)
    request = {"kind": "stream", "n": 6, "hang_at": 1}
    stream = router.generate_sync(request)
    got = [next(stream), next(stream)]
    victim = _who_has(cluster, 1)
    survivor = next(w for w in cluster.workers if w is not victim)
    victim.kill()
    got += list(stream)
    assert got == list(range(6))
    assert calls == [(request, [0, 1])]
    assert survivor.received == [0]  # the rewritten request starts afresh


def test_an_overloaded_instance_is_skipped_for_the_next(cluster: Cluster) -> None:
    busy = cluster.tcp_worker(max_inflight=1)
    free = cluster.tcp_worker(max_inflight=1)
    router = cluster.router(expect=2)
    hold = router.generate_sync({"kind": "hang"}, instance_id=busy.id)
    assert next(hold) == busy.id
    # Round robin sends every other request to the busy one: each is refused there (Overloaded
    # before any chunk) and served by the other instead of failing.
    assert [call(router)[0] for _ in range(6)] == [free.id] * 6
    held = router.generate_sync({"kind": "hang"}, instance_id=free.id)
    assert next(held) == free.id
    with pytest.raises(Overloaded):
        call(router)  # both full: the typed error, not a hang
    with pytest.raises(Overloaded):
        call(router, instance_id=busy.id)  # direct requests are not moved
    hold.close()
    held.close()


class Told:
    """A RouteObserver that counts what it is told."""

    def __init__(self) -> None:
        self.counts = {"retried": 0, "migrated": 0}

    def retried(self, endpoint: str) -> None:
        assert endpoint == EP
        self.counts["retried"] += 1

    def migrated(self, endpoint: str) -> None:
        assert endpoint == EP
        self.counts["migrated"] += 1


def refusals(worker: Worker) -> float:
    labels = {"namespace": NS, "component": COMP, "endpoint": NAME, "kind": "overloaded"}
    return worker.rt.metrics.registry.get_sample_value("troupe_errors_total", labels) or 0


def test_overloaded_tries_go_round_again_after_a_pause_up_to_the_limit(cluster: Cluster) -> None:
    busy = cluster.tcp_worker(max_inflight=1)
    told = Told()
    retries = Retries(overload_tries=3, overload_pause=0.001)
    router = cluster.router(expect=1, retries=retries, observer=told)
    once = cluster.router(expect=1)  # the default: each instance once
    hold = once.generate_sync({"kind": "hang"})
    assert next(hold) == busy.id
    with pytest.raises(Overloaded):
        call(once)
    assert refusals(busy) == 1
    with pytest.raises(Overloaded):
        call(router)  # the only instance refused: asked again after a pause, 3 times in all
    assert refusals(busy) == 4
    assert told.counts == {"retried": 2, "migrated": 0}
    hold.close()


def test_overload_retry_settings_are_validated() -> None:
    for bad in ({"overload_tries": 0}, {"overload_pause": -1}, {"replacement_wait": -1}):
        with pytest.raises(ConfigError):
            Retries(**bad)  # type: ignore[arg-type]
    rng = random.Random(1)
    assert 0.005 <= Retries(overload_pause=0.01).pause(1, rng) < 0.015
    assert 0.02 <= Retries(overload_pause=0.01).pause(3, rng) < 0.06


def test_a_migration_waits_for_a_replacement_when_every_instance_was_tried(
    cluster: Cluster,
) -> None:
    only = cluster.tcp_worker()
    told = Told()
    router = cluster.router(
        expect=1, migration_limit=1, retries=Retries(replacement_wait=10), observer=told
    )
    stream = router.generate_sync({"kind": "resume"})
    assert next(stream) == only.id
    only.kill()
    eventually(lambda: only.id in router.snapshot.set_aside, what="the failure seen")
    replacement = cluster.tcp_worker()
    assert list(stream) == [["rest", replacement.id, 1]]
    assert told.counts == {"retried": 0, "migrated": 1}


class Recording:
    """A Policy that takes the first candidate and records what it was shown."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[str], dict[str, int], Any, Any]] = []

    def choose(
        self,
        candidates: tuple[RoutedInstance, ...],
        load: Mapping[str, int],
        request: Any,
        headers: Mapping[str, str] | None,
    ) -> RoutedInstance:
        self.seen.append(([i.instance_id for i in candidates], dict(load), request, headers))
        return candidates[0]


def test_a_policy_sees_the_request_its_headers_and_every_callers_load(cluster: Cluster) -> None:
    a, b = cluster.tcp_worker(), cluster.tcp_worker()
    policy = Recording()
    router = cluster.router(expect=2, policy=policy)
    assert router.policy == "Recording"
    held = router.generate_sync({"kind": "hang"}, instance_id=b.id)  # direct: no policy step
    assert next(held) == b.id
    assert router.load == {b.id: 1}
    request = {"kind": "who", "prompt": [1, 2, 3]}
    first = min(a.id, b.id)
    assert list(router.generate_sync(request, headers={"session": "s1"})) == [first]
    assert policy.seen == [(sorted([a.id, b.id]), {b.id: 1}, request, {"session": "s1"})]
    held.close()


def test_migration_gives_up_when_no_other_instance_is_left(cluster: Cluster) -> None:
    only = cluster.tcp_worker()
    router = cluster.router(expect=1, migration_limit=2)
    stream = router.generate_sync({"kind": "resume"})
    assert next(stream) == only.id
    only.kill()
    with pytest.raises(StreamBroken):
        next(stream)


# --- the bridges ---------------------------------------------------------------------------------


async def test_generate_from_a_foreign_loop_streams_and_cancels(cluster: Cluster) -> None:
    worker = await asyncio.to_thread(cluster.inproc_worker)
    router = await asyncio.to_thread(cluster.router, expect=1)
    assert asyncio.get_running_loop() is not cluster.rt.io.loop
    assert [c async for c in router.generate({"kind": "who"})] == [worker.id]
    # Many more chunks than the bridge's window: flow control must not lose or reorder any.
    assert [c async for c in router.generate({"kind": "count", "n": 300})] == list(range(300))

    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in router.generate({"kind": "hang"}):
            got_first.set()

    task = asyncio.create_task(consume(), name="router-consumer")
    await asyncio.wait_for(got_first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(worker.stopped.wait, 5)
    assert worker.stop_reason == ["cancelled"]

    with pytest.raises(InstanceNotFound):
        await anext(router.generate({"kind": "who"}, instance_id="0123456789abcdef"))
    with pytest.raises(TroupeError, match="generate_sync"):
        router.generate_sync({"kind": "who"})
    assert await router.wait_for_instances(timeout=1) == [worker.id]


def test_generate_on_the_io_loop_itself(cluster: Cluster) -> None:
    worker = cluster.inproc_worker()
    router = cluster.router(expect=1)

    async def go() -> list[Any]:
        return [c async for c in router.generate({"kind": "count", "n": 3})]

    assert cluster.rt.io.run(go(), timeout=5) == [0, 1, 2]
    assert worker.seen == [("count", 0)]


def test_generate_on_the_io_loop_fails_at_the_first_iteration(cluster: Cluster) -> None:
    router = cluster.router(expect=0)

    async def go() -> tuple[type[BaseException], type[BaseException]]:
        chunks = router.generate({"kind": "count", "n": 1})  # nothing sent, nothing raised yet
        unknown = router.generate({}, instance_id="nope")
        errors = []
        for gen in (chunks, unknown):
            try:
                await anext(gen)
            except TroupeError as exc:
                errors.append(type(exc))
        return errors[0], errors[1]

    assert cluster.rt.io.run(go(), timeout=5) == (NoInstances, InstanceNotFound)


def test_generate_sync_from_threads(cluster: Cluster) -> None:
    cluster.inproc_worker()
    router = cluster.router(expect=1)
    results: dict[int, list[Any]] = {}

    def run(n: int) -> None:
        results[n] = list(router.generate_sync({"kind": "count", "n": n}))

    threads = [threading.Thread(target=run, args=(n,), name=f"caller-{n}") for n in (5, 100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {5: list(range(5)), 100: list(range(100))}


# --- the actor on its own, with a virtual clock ---------------------------------------------------


class FakeWatcher(Actor[Subscribe]):
    def __init__(self, subscribed: threading.Event) -> None:
        super().__init__()
        self.subscribed = subscribed

    def receive(self, message: Subscribe) -> int:
        self.subscribed.set()
        return 0


def record(instance_id: str, transport: dict[str, str]) -> InstanceRecord:
    return InstanceRecord.create(
        NS, COMP, NAME, instance_id=instance_id, transport=transport, started_at=0.0
    )


def test_address_preference_is_tcp_http_nats_inproc() -> None:
    both = record("00000000000000aa", {"inproc": "inproc://w", "http": "http://h:1", "nats": "n"})
    assert choose_address(both) == "http://h:1"
    assert choose_address(record("00000000000000aa", {"tcp": "tcp://a:1", "http": "x"})) == (
        "tcp://a:1"
    )
    assert choose_address(record("00000000000000aa", {"other": "x"})) is None


def test_set_aside_excludes_for_the_window_then_re_includes() -> None:
    clock = VirtualClock()
    system = ActorSystem("router-test", clock=clock)
    holder = SnapshotHolder()
    subscribed = threading.Event()
    try:
        watcher = system.spawn(lambda: FakeWatcher(subscribed))
        actor = system.spawn(lambda: RouterActor(watcher, holder, set_aside_for=5.0))
        assert subscribed.wait(5)
        a, b = "00000000000000aa", "00000000000000bb"
        actor.tell(Joined(f"/k/{a}", a, record(a, {"tcp": "tcp://127.0.0.1:1"})))
        actor.tell(Joined(f"/k/{b}", b, record(b, {"inproc": "inproc://b"})))
        snap = holder.wait_sync(lambda s: len(s.instances) == 2, 5)
        assert snap is not None
        assert [(i.instance_id, i.address) for i in snap.available] == [
            (a, "tcp://127.0.0.1:1"),
            (b, "inproc://b"),
        ]

        actor.tell(SetAside(a))
        snap = holder.wait_sync(lambda s: a in s.set_aside, 5)
        assert snap is not None
        assert snap.set_aside[a] == 5.0
        assert [i.instance_id for i in snap.available] == [b]
        version = snap.version

        assert clock.pending() == [5.0]
        clock.advance(4.9)
        actor.ask(SetAside("00000000000000cc"))  # a barrier (unknown ids are ignored)
        assert holder.current.version == version  # still aside
        clock.advance(0.2)
        snap = holder.wait_sync(lambda s: a not in s.set_aside, 5)
        assert snap is not None
        assert [i.instance_id for i in snap.available] == [a, b]

        actor.tell(SetAside(b))
        actor.tell(Left(f"/k/{b}", b, "expired"))
        snap = holder.wait_sync(lambda s: b not in s.by_id, 5)
        assert snap is not None
        assert dict(snap.set_aside) == {}
        assert clock.pending() == []  # Left cancelled the re-inclusion timer
        version = snap.version
        clock.advance(10)
        actor.ask(SetAside("00000000000000cc"))  # barrier
        assert holder.current.version == version
        assert [i.instance_id for i in holder.current.instances] == [a]
    finally:
        system.shutdown(timeout=5)


# --- wire versions -------------------------------------------------------------------------------


def downgrade(cluster: Cluster, worker: Worker, wire: int = 0) -> None:
    """Re-write ``worker``'s registration as an older troupe (one of ``wire``) would have."""
    key = f"/services/{NS}/{COMP}/{NAME}/{worker.id}"
    stored = cluster.rt.io.run(cluster.rt.store.get(key), timeout=5)
    assert stored is not None
    current = decode_record(stored.value, key=key)
    assert current.wire == WIRE_VERSION  # what every registration writes
    old = msgspec.structs.replace(current, wire=wire)
    put = cluster.rt.store.put(key, encode_record(old), lease=stored.lease)  # still leased
    cluster.rt.io.run(put, timeout=5)


def test_only_instances_of_this_wire_version_get_requests(cluster: Cluster) -> None:
    current, old = cluster.inproc_worker(), cluster.inproc_worker()
    downgrade(cluster, old)
    router = cluster.router(expect=1)
    eventually(lambda: dict(router.snapshot.incompatible) == {old.id: 0}, what="old listed")
    assert router.instance_ids() == [current.id]
    assert [call(router)[0] for _ in range(6)] == [current.id] * 6
    with pytest.raises(IncompatibleInstances) as info:
        call(router, instance_id=old.id)  # direct routing does not reach it either
    assert info.value.versions == {old.id: 0}
    assert old.seen == []
    assert len(current.seen) == 6


def test_only_incompatible_instances_fail_at_once_naming_the_versions(cluster: Cluster) -> None:
    olds = [cluster.inproc_worker(), cluster.inproc_worker()]
    for worker in olds:
        downgrade(cluster, worker)
    router = cluster.router(expect=0)
    eventually(lambda: len(router.snapshot.incompatible) == 2, what="both old ones listed")
    with pytest.raises(IncompatibleInstances) as info:
        call(router)
    error = info.value
    assert isinstance(error, NoInstances)  # the frontend's 503
    assert error.endpoint == EP
    assert error.versions == {w.id: 0 for w in olds}
    assert error.wire == WIRE_VERSION
    assert str(error) == (
        f"2 instances of {EP} speak wire version 0, this troupe speaks 1: upgrade them together"
    )

    async def on_the_io_loop() -> None:
        async for _ in router.generate({"kind": "who"}):
            pass

    with pytest.raises(IncompatibleInstances):
        cluster.rt.io.run(on_the_io_loop(), timeout=5)
    with pytest.raises(IncompatibleInstances):
        router.wait_for_instances_sync(timeout=0.05)
    assert all(w.seen == [] for w in olds)

    fresh = cluster.inproc_worker()  # a current instance makes the endpoint routable again
    eventually(lambda: router.instance_ids() == [fresh.id], what="the current one")
    assert call(router) == [fresh.id]


def test_the_router_actor_checks_the_wire_version_when_records_arrive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    system = ActorSystem("router-wire-test", clock=VirtualClock())
    holder = SnapshotHolder()
    subscribed = threading.Event()
    a, b, c = "00000000000000aa", "00000000000000bb", "00000000000000cc"

    def rec(instance_id: str, wire: int, model: str = "m") -> InstanceRecord:
        return InstanceRecord.create(
            NS,
            COMP,
            NAME,
            instance_id=instance_id,
            transport={"inproc": f"inproc://{instance_id}"},
            metadata={"model": model},
            wire=wire,
        )

    def accept(record: InstanceRecord) -> bool:
        return bool(record.metadata["model"] == "m")

    try:
        watcher = system.spawn(lambda: FakeWatcher(subscribed))
        actor = system.spawn(lambda: RouterActor(watcher, holder, instance_filter=accept))
        assert subscribed.wait(5)
        with caplog.at_level(logging.WARNING, logger="troupe.actors.router"):
            actor.tell(Joined(f"/k/{a}", a, rec(a, 0)))
            actor.tell(Joined(f"/k/{b}", b, rec(b, WIRE_VERSION)))
            actor.tell(Joined(f"/k/{c}", c, rec(c, 0, model="other")))  # filtered: not counted
            snap = holder.wait_sync(lambda s: len(s.instances) == 1 and bool(s.incompatible), 5)
            assert snap is not None
            assert dict(snap.incompatible) == {a: 0}
            assert [i.instance_id for i in snap.instances] == [b]
            version = snap.version
            actor.tell(Joined(f"/k/{a}", a, rec(a, 0)))  # the same again: no news, no warning
            actor.ask(SetAside("00000000000000dd"))  # a barrier (unknown ids are ignored)
            assert holder.current.version == version
        warnings = [r for r in caplog.records if "wire version" in r.getMessage()]
        assert len(warnings) == 1
        assert "'instance_wire': 0" in warnings[0].getMessage()
        assert f"'wire': {WIRE_VERSION}" in warnings[0].getMessage()

        actor.tell(Joined(f"/k/{a}", a, rec(a, WIRE_VERSION)))  # upgraded in place
        snap = holder.wait_sync(lambda s: len(s.instances) == 2, 5)
        assert snap is not None
        assert dict(snap.incompatible) == {}
        actor.tell(Joined(f"/k/{a}", a, rec(a, 2)))  # a newer one is no more routable
        snap = holder.wait_sync(lambda s: bool(s.incompatible), 5)
        assert snap is not None
        assert dict(snap.incompatible) == {a: 2}
        assert [i.instance_id for i in snap.instances] == [b]
        actor.tell(Left(f"/k/{a}", a, "expired"))
        snap = holder.wait_sync(lambda s: not s.incompatible, 5)
        assert snap is not None
        assert [i.instance_id for i in snap.instances] == [b]
    finally:
        system.shutdown(timeout=5)


def test_a_failed_instance_is_excluded_at_once_before_the_actor_catches_up(
    cluster: Cluster,
) -> None:
    a, b = cluster.inproc_worker(), cluster.inproc_worker()
    router = cluster.router(expect=2, policy="round_robin", set_aside_for=30.0)
    router._actor.stop()  # its snapshot will never say "set aside": only the handle knows

    async def picks() -> list[str]:
        router._set_aside(a.id)  # what a failed request does, on the I/O loop
        return [router._pick(None, None).instance_id for _ in range(6)]

    assert cluster.rt.io.run(picks(), timeout=5) == [b.id] * 6
    assert a.id not in router.snapshot.set_aside
