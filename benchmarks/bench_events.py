"""The event-plane suite: KV events per second through each mode, against each library's floor.

Modes: ``memory`` (one process: the plane's own cost without I/O, the reference), ``nats`` (core
subjects), ``nats durable`` (JetStream: each publish acknowledged once stored) and ``zmq``
(brokerless, its channels in an in-memory discovery store). Two planes per mode, one publishing
and one subscribing, as a worker and a router would have (two NATS connections; two stores on one
discovery server); both in this process, on one event loop (uvloop). The floors run the same way:
nats-py publish/subscribe on the same nats-server, nats-py JetStream publish into a stream of its
own, pyzmq's asyncio XPUB/SUB on loopback with the zmq plane's high-water marks.

The payload is a realistic KV ``Stored`` event (:class:`troupe.kv.KvCacheEvent`) of 4-16 blocks.
troupe encodes each event as it publishes it; the floors send the same wire bytes (the envelopes
troupe sends), encoded beforehand. Every subscriber, troupe's and the floors', decodes each event
in full (envelope, then payload) and counts it.

Figures per mode: **published** (events per second through the publisher's loop, the subscriber
working beside it on the same loop), **applied** (events received and decoded per second, from
the first publish to the last event applied), **delivered** (applied / sent over every run: a
subscriber that loses events shows it here) and, durable mode only, **replayed** (a new
subscription reading the run's events back from the stream). A publisher yields to the loop
every 64 events. Before each run it sends probe events until the subscriber has one: a
nats-server can drop a new subscription's first messages for a moment, even after a flush. Each
troupe run sits between two floor runs; the reference is the median of the floor runs. CPU µs per
event counts this process (all threads) and nats-server.

The runs themselves (payload, timing, interleaving) are :mod:`benchmarks._event_runs`; this module
has the sides that move the events (troupe's planes, the floors) and the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from benchmarks._event_runs import (
    PUBLISHER,
    TOPIC,
    ModeResult,
    Publish,
    Run,
    Side,
    Tally,
    decode_wire,
    kv_events,
    measure_mode,
    payload_note,
    stop_task,
    wire_bytes,
)
from benchmarks._harness import BenchContext, Row, median
from troupe.events import EventScope
from troupe.kv import KvCacheEvent

__all__ = ["MODES", "SUITE", "mode_rows", "run"]

SUITE = "events"

MODES = ("memory", "nats", "nats durable", "zmq")
_HWM = 10_000  # the zmq plane's send and receive high-water marks, given to the floor too
_FLOOR = {"nats": "nats-py floor", "nats durable": "nats-py JetStream floor", "zmq": "pyzmq floor"}
_FLOOR_STREAM = "floor-events"


# --- troupe's side ----------------------------------------------------------------------------


async def _apply_all(subscription: Any, tally: Tally) -> None:
    from troupe.events import decode_payload_as  # noqa: PLC0415

    async for envelope in subscription:
        decode_payload_as(envelope.payload, KvCacheEvent)
        tally.hit()


class _TroupeSide:
    """troupe's two planes of a mode: a publisher on one, a subscription on the other."""

    def __init__(self, pub: Any, sub: Any, events: list[KvCacheEvent]) -> None:
        self.pub, self.sub, self.events = pub, sub, events

    @contextlib.asynccontextmanager
    async def _reading(self, k: int, tally: Tally, *, from_start: bool) -> AsyncIterator[None]:
        subscription = await self.sub.subscribe(
            EventScope("bench", f"t{k}"), TOPIC, from_start=from_start
        )
        reader = asyncio.create_task(_apply_all(subscription, tally), name=f"bench-events-{k}")
        try:
            yield
        finally:
            await subscription.close()
            await stop_task(reader)

    @contextlib.asynccontextmanager
    async def live(self, k: int, tally: Tally) -> AsyncIterator[Publish]:
        async with self._reading(k, tally, from_start=False):
            publisher = await self.pub.publisher(EventScope("bench", f"t{k}"), TOPIC, PUBLISHER)
            try:
                events, publish_one = self.events, publisher.publish

                async def publish(i: int) -> object:
                    return await publish_one(events[i % len(events)])

                yield publish
            finally:
                await publisher.close()

    def replay(self, k: int, tally: Tally) -> AbstractAsyncContextManager[None]:
        return self._reading(k, tally, from_start=True)


@contextlib.asynccontextmanager
async def _troupe(mode: str, nats_url: str, events: list[KvCacheEvent]) -> AsyncIterator[Side]:
    """troupe's publishing and subscribing planes of ``mode``, closed after."""
    from troupe.config import NatsConfig  # noqa: PLC0415
    from troupe.discovery import MemoryKvServer, MemoryStore  # noqa: PLC0415
    from troupe.events import MemoryEventPlane, NatsEventPlane, ZmqEventPlane  # noqa: PLC0415

    async with contextlib.AsyncExitStack() as stack:
        pub: Any
        sub: Any
        if mode == "memory":
            hub = MemoryEventPlane.Hub()
            pub, sub = MemoryEventPlane(hub), MemoryEventPlane(hub)
        elif mode == "zmq":
            server = MemoryKvServer()
            pub_store = await stack.enter_async_context(MemoryStore(server))
            sub_store = await stack.enter_async_context(MemoryStore(server))
            lease = await pub_store.grant_lease(60.0)
            pub = ZmqEventPlane(pub_store, lease, host="127.0.0.1")
            sub = ZmqEventPlane(sub_store, None)
        else:
            config, durable = NatsConfig(server=nats_url), mode == "nats durable"
            pub = NatsEventPlane(config, durable=durable, name="bench-publisher")
            sub = NatsEventPlane(config, durable=durable, name="bench-subscriber")
        await stack.enter_async_context(pub)
        await stack.enter_async_context(sub)
        yield _TroupeSide(pub, sub, events)


# --- the floors -------------------------------------------------------------------------------


class _NatsFloor:
    """nats-py on two connections; durable: JetStream publish and an ordered-consumer replay."""

    def __init__(self, nc_pub: Any, nc_sub: Any, wire: list[bytes], durable: bool) -> None:
        self.nc_pub, self.nc_sub, self.wire, self.durable = nc_pub, nc_sub, wire, durable

    @staticmethod
    def _subject(k: int) -> str:
        return f"namespace.floor.component.f{k}.{TOPIC}"  # as long as troupe's subject

    @staticmethod
    def _on_msg(tally: Tally) -> Callable[[Any], Awaitable[None]]:
        async def on_msg(msg: Any) -> None:
            decode_wire(msg.data)
            tally.hit()

        return on_msg

    @contextlib.asynccontextmanager
    async def live(self, k: int, tally: Tally) -> AsyncIterator[Publish]:
        subject, wire = self._subject(k), self.wire
        sub = await self.nc_sub.subscribe(subject, cb=self._on_msg(tally))
        await self.nc_sub.flush()
        if self.durable:
            js = self.nc_pub.jetstream()

            async def publish(i: int) -> object:
                return await js.publish(subject, wire[i % len(wire)], stream=_FLOOR_STREAM)

        else:
            nc = self.nc_pub

            async def publish(i: int) -> object:
                return await nc.publish(subject, wire[i % len(wire)])

        try:
            yield publish
        finally:
            await sub.unsubscribe()

    @contextlib.asynccontextmanager
    async def replay(self, k: int, tally: Tally) -> AsyncIterator[None]:
        from nats.js import api  # noqa: PLC0415

        sub = await self.nc_sub.jetstream().subscribe(
            self._subject(k),
            stream=_FLOOR_STREAM,
            cb=self._on_msg(tally),
            ordered_consumer=True,
            idle_heartbeat=1.0,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
        )
        try:
            yield
        finally:
            await sub.unsubscribe()


class _ZmqFloor:
    """pyzmq's asyncio sockets: an XPUB (as troupe's publisher) bound on loopback, a SUB
    connected to it."""

    def __init__(self, ctx: Any, wire: list[bytes]) -> None:
        self.ctx, self.wire = ctx, wire

    @staticmethod
    async def _read(sock: Any, tally: Tally) -> None:
        topic = TOPIC.encode()
        while True:
            frames = await sock.recv_multipart()
            if len(frames) == 2 and frames[0] == topic:
                decode_wire(frames[1])
                tally.hit()

    @contextlib.asynccontextmanager
    async def live(self, k: int, tally: Tally) -> AsyncIterator[Publish]:
        import zmq  # noqa: PLC0415

        xpub, sub = self.ctx.socket(zmq.XPUB), self.ctx.socket(zmq.SUB)
        try:
            for sock, option in ((xpub, zmq.SNDHWM), (sub, zmq.RCVHWM)):
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(option, _HWM)
            port = xpub.bind_to_random_port("tcp://127.0.0.1")
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(f"tcp://127.0.0.1:{port}")
            reader = asyncio.create_task(self._read(sub, tally), name=f"bench-zmq-floor-{k}")
            topic, wire, send = TOPIC.encode(), self.wire, xpub.send_multipart

            async def publish(i: int) -> object:
                return await send((topic, wire[i % len(wire)]))

            try:
                yield publish
            finally:
                await stop_task(reader)
        finally:
            xpub.close(linger=0)
            sub.close(linger=0)

    def replay(self, k: int, tally: Tally) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError("ZeroMQ keeps no stream")


@contextlib.asynccontextmanager
async def _floor(mode: str, nats_url: str, wire: list[bytes]) -> AsyncIterator[Side | None]:
    """The floor of ``mode`` (None for memory), its connections closed after."""
    if mode == "memory":
        yield None
    elif mode == "zmq":
        import zmq.asyncio  # noqa: PLC0415

        ctx = zmq.asyncio.Context()
        try:
            yield _ZmqFloor(ctx, wire)
        finally:
            ctx.term()
    else:
        import nats  # noqa: PLC0415
        from nats.js import api  # noqa: PLC0415

        nc_pub = await nats.connect(nats_url, name="floor-publisher")
        nc_sub = await nats.connect(nats_url, name="floor-subscriber")
        try:
            durable = mode == "nats durable"
            if durable:  # the limits and storage of troupe's stream (its defaults)
                await nc_pub.jetstream().add_stream(
                    name=_FLOOR_STREAM,
                    subjects=["namespace.floor.component.*.*"],
                    storage=api.StorageType.FILE,
                    discard=api.DiscardPolicy.OLD,
                    max_age=3600.0,
                    max_msgs=1_000_000,
                )
            yield _NatsFloor(nc_pub, nc_sub, wire, durable)
        finally:
            await nc_pub.close()
            await nc_sub.close()


# --- rows -------------------------------------------------------------------------------------


def _delivered(runs: Sequence[Run]) -> tuple[int, int]:
    return sum(r.delivered for r in runs), sum(r.sent for r in runs)


def _percent(runs: Sequence[Run]) -> float:
    got, sent = _delivered(runs)
    return 100.0 * got / sent if sent else float("nan")


def _runs(runs: Sequence[Run]) -> str:
    return f"{len(runs)} run{'' if len(runs) == 1 else 's'}"


def _count_note(what: str, troupe: Sequence[Run], floor: Sequence[Run], of: str = "sent") -> str:
    got, sent = _delivered(troupe)
    note = f"{what} {got:,} of {sent:,} {of} over {_runs(troupe)}"
    if got < sent:
        note += f" (LOST {sent - got:,})"
    if floor:
        f_got, f_sent = _delivered(floor)
        note += f"; floor: {f_got:,} of {f_sent:,} over {_runs(floor)}"
        if f_got < f_sent:
            note += f" (lost {f_sent - f_got:,})"
    return note


def _rate_row(
    group: str,
    name: str,
    troupe: Sequence[Run],
    floor: Sequence[Run],
    ref: str | None,
    rate: Callable[[Run], float],
    note: str = "",
    *,
    cpu: bool = True,
) -> Row:
    values = [rate(r) for r in troupe]
    return Row(
        group=group,
        name=name,
        value=median(values),
        unit="events/s",
        cpu_us=median([r.cpu_us for r in troupe]) if cpu else None,
        reference=ref,
        reference_value=median([rate(r) for r in floor]) if floor else None,
        note=note,
        samples=values,
    )


def mode_rows(mode: str, result: ModeResult, note: str = "") -> list[Row]:
    """One mode's rows: published, applied, delivered (and replayed, durable mode)."""
    group = f"events: {mode}"
    troupe, floor = result.troupe, result.floor
    ref = _FLOOR.get(mode) if floor else None
    floor_cpu = f"; floor CPU {median([r.cpu_us for r in floor]):.1f} µs/event" if floor else ""
    rows = [
        _rate_row(group, "published", troupe, floor, ref, lambda r: r.published, note, cpu=False),
        _rate_row(
            group,
            "applied",
            troupe,
            floor,
            ref,
            lambda r: r.applied,
            "received and decoded, first publish → last applied" + floor_cpu,
        ),
        Row(
            group=group,
            name="delivered",
            value=_percent(troupe),
            unit="%",
            reference=ref,
            reference_value=_percent(floor) if floor else None,
            note=_count_note("applied", troupe, floor),
        ),
    ]
    if result.troupe_replay:
        rows.append(
            _rate_row(
                group,
                "replayed from the stream",
                result.troupe_replay,
                result.floor_replay,
                ref,
                lambda r: r.applied,
                _count_note(
                    "replayed",
                    result.troupe_replay,
                    result.floor_replay,
                    "stored (the probes included)",
                )
                + "; a new subscription (from_start), subscribe call → last event applied",
            )
        )
    return rows


# --- the suite --------------------------------------------------------------------------------


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _run_modes(ctx: BenchContext, nats_url: str, nats_pid: int | None) -> list[Row]:
    events = kv_events()
    wire = wire_bytes(events)
    note = payload_note(events)
    rows: list[Row] = []
    for mode in MODES:
        pids = [nats_pid] if nats_pid is not None and mode.startswith("nats") else []
        try:
            async with (
                _troupe(mode, nats_url, events) as troupe,
                _floor(mode, nats_url, wire) as floor,
            ):
                result = await measure_mode(
                    ctx, mode, troupe, floor, pids, durable=mode == "nats durable"
                )
        except Exception as exc:  # noqa: BLE001 - one failing mode must not hide the others
            ctx.log(f"events {mode}: FAILED: {exc!r}")
            rows.append(Row(f"events: {mode}", "FAILED", float("nan"), "", note=repr(exc)))
            continue
        rows.extend(mode_rows(mode, result, note if not rows else ""))
    return rows


def run(ctx: BenchContext) -> list[Row]:
    """Every mode against its floor, on a nats-server (JetStream on) started for the run."""
    from troupe.testing import NatsServer  # noqa: PLC0415

    with NatsServer(jetstream=True) as nats:
        loop = _new_loop()
        try:
            return loop.run_until_complete(_run_modes(ctx, nats.url, nats.pid))
        finally:
            loop.close()
