"""The event suite's runs: the payload, one measured run, and a mode's interleaved runs.

A *side* (:class:`Side`) is one way of moving the events, troupe's planes of a mode or a library
floor: it opens a subscriber feeding a :class:`Tally` and a publisher (``live``), and for a
durable mode a new subscriber reading the stream back (``replay``). :func:`measure_mode` runs a
mode's troupe side between runs of its floor; :mod:`benchmarks.bench_events` has the sides and
turns the runs into rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from benchmarks._harness import BenchContext, process_cpu_seconds, self_cpu_seconds
from troupe.events import Envelope, encode_envelope, encode_event
from troupe.kv import KV_EVENTS_TOPIC, KvCacheEvent, Stored, StoredBlock

__all__ = [
    "BATCH",
    "PUBLISHER",
    "TOPIC",
    "ModeResult",
    "Publish",
    "Run",
    "Side",
    "Tally",
    "decode_wire",
    "kv_events",
    "measure_mode",
    "payload_note",
    "stop_task",
    "wire_bytes",
]

BATCH = 64
TOPIC = KV_EVENTS_TOPIC
PUBLISHER = "0123456789abcdef"


@dataclass(frozen=True)
class Sizes:
    """How much one run does, and how long it may take."""

    events: int  # per run, memory, nats and zmq
    durable: int  # per run, nats durable (one acknowledged round trip each)
    cap: float  # seconds a publishing loop may run
    drain: float  # seconds to wait for the last events once publishing is done


def sizes_for(quick: bool) -> Sizes:
    """The quick run's sizes, or the full run's."""
    return Sizes(5_000, 800, 3.0, 2.0) if quick else Sizes(30_000, 3_000, 15.0, 5.0)


# --- the payload ------------------------------------------------------------------------------


def kv_events(count: int = 256, seed: int = 7) -> list[KvCacheEvent]:
    """``count`` realistic ``Stored`` events of 4-16 blocks each (both hashes), deterministic."""
    rng = random.Random(seed)
    events: list[KvCacheEvent] = []
    for event_id in range(1, count + 1):
        blocks = [
            StoredBlock(rng.getrandbits(64), rng.getrandbits(64)) for _ in range(rng.randint(4, 16))
        ]
        events.append(KvCacheEvent(event_id, Stored(rng.getrandbits(64), blocks)))
    return events


def wire_bytes(events: Sequence[KvCacheEvent]) -> list[bytes]:
    """The envelopes troupe sends for ``events``: what the floors send."""
    now = time.time()
    return [
        encode_envelope(Envelope(PUBLISHER, i + 1, now, TOPIC, encode_event(event)))
        for i, event in enumerate(events)
    ]


def payload_note(events: Sequence[KvCacheEvent]) -> str:
    """What is published: blocks per event and bytes per event on the wire."""
    sizes = [len(data) for data in wire_bytes(events)]
    blocks = [len(e.data.blocks) for e in events if isinstance(e.data, Stored)]
    return (
        f"payload: KV Stored events of {min(blocks)}-{max(blocks)} blocks (mean "
        f"{sum(blocks) / len(blocks):.1f}), {min(sizes)}-{max(sizes)} B published per event "
        f"(mean {sum(sizes) / len(sizes):.0f} B: envelope + msgpack payload; the floors send "
        f"the same bytes); publisher and subscriber in one process on one event loop, as for "
        f"the floors; the publisher yields every {BATCH} events; before each run, probe events "
        f"until the subscriber has one"
    )


_envelope = msgspec.msgpack.Decoder(Envelope)
_event = msgspec.msgpack.Decoder(KvCacheEvent)


def decode_wire(data: bytes) -> KvCacheEvent:
    """What a floor subscriber does with each message: decode the envelope, then the event."""
    return _event.decode(_envelope.decode(data).payload)


# --- runs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One run: events sent and applied, the publishing loop's time, first publish → last
    applied (``apply_s``), CPU seconds of this process and nats-server."""

    sent: int
    delivered: int
    publish_s: float
    apply_s: float
    cpu_s: float

    @property
    def published(self) -> float:
        return self.sent / self.publish_s if self.publish_s > 0 else float("nan")

    @property
    def applied(self) -> float:
        return self.delivered / self.apply_s if self.apply_s > 0 else float("nan")

    @property
    def cpu_us(self) -> float:
        return self.cpu_s * 1e6 / max(self.delivered, 1)


class Tally:
    """Counts the events a subscriber applied; ``done`` is set once it holds ``expected``."""

    def __init__(self, expected: int) -> None:
        self.reset(expected)

    def reset(self, expected: int) -> None:
        """Count from zero again, towards ``expected``."""
        self.expected = expected
        self.count = 0
        self.last = 0.0
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        self.last = time.perf_counter()
        if self.count >= self.expected:
            self.done.set()

    def expect(self, sent: int) -> None:
        self.expected = sent
        if self.count >= sent:
            self.done.set()


Publish = Callable[[int], Awaitable[object]]


class Side(Protocol):
    """One way of moving the events: troupe's planes of a mode, or a floor."""

    def live(self, k: int, tally: Tally) -> AbstractAsyncContextManager[Publish]:
        """A subscriber feeding ``tally`` and a publisher, on topic number ``k``."""

    def replay(self, k: int, tally: Tally) -> AbstractAsyncContextManager[None]:
        """A new subscriber reading topic ``k`` back from the stream (durable mode)."""


def _cpu(pids: Sequence[int]) -> float:
    return self_cpu_seconds() + sum(process_cpu_seconds(p) for p in pids)


async def _measure(publish: Publish, tally: Tally, n: int, sizes: Sizes, pids: list[int]) -> Run:
    """Publish ``n`` events (fewer past the cap), then wait for the subscriber to apply them."""
    cpu0 = _cpu(pids)
    t0 = time.perf_counter()
    deadline = t0 + sizes.cap
    sent = 0
    while sent < n:
        for i in range(sent, min(n, sent + BATCH)):
            await publish(i)
        sent = min(n, sent + BATCH)
        await asyncio.sleep(0)  # a publisher between two engine steps: the loop runs the rest
        if time.perf_counter() > deadline:
            break
    t1 = time.perf_counter()
    tally.expect(sent)
    with contextlib.suppress(TimeoutError):  # events were lost: the count says how many
        await asyncio.wait_for(tally.done.wait(), sizes.drain)
    return Run(sent, tally.count, t1 - t0, max(tally.last - t0, 0.0), _cpu(pids) - cpu0)


async def _ready(publish: Publish, tally: Tally, timeout: float = 10.0) -> int:
    """Publish probe events until the subscriber has applied one; how many were published.

    Then the route is up, and whatever is published next is counted. A nats-server can drop the
    first messages for a new subscription for a moment, even after the subscriber's connection
    has flushed (seen in troupe's runs and nats-py's alike); events on one connection arrive in
    order, so once one probe is in, no earlier one is still on its way.
    """
    tally.reset(1)
    deadline = time.monotonic() + timeout
    probes = 0
    while not tally.done.is_set():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no probe event reached the subscriber within {timeout:g} s")
        await publish(probes)
        probes += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.done.wait(), 0.05)
    return probes


async def _replay(side: Side, k: int, n: int, sizes: Sizes, pids: list[int]) -> Run:
    """Topic ``k``'s ``n`` stored events read back: subscribe call → last one applied."""
    tally = Tally(n)
    cpu0 = _cpu(pids)
    t0 = time.perf_counter()
    async with side.replay(k, tally):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.done.wait(), sizes.cap + sizes.drain)
        cpu_s = _cpu(pids) - cpu0
    return Run(n, tally.count, 0.0, max(tally.last - t0, 0.0), cpu_s)


@dataclass
class ModeResult:
    """Every run of one mode: troupe's, the floor's, and the replays (durable mode)."""

    troupe: list[Run] = field(default_factory=list)
    floor: list[Run] = field(default_factory=list)
    troupe_replay: list[Run] = field(default_factory=list)
    floor_replay: list[Run] = field(default_factory=list)


_topics = itertools.count(1)


async def _once(side: Side, n: int, sizes: Sizes, pids: list[int], durable: bool) -> list[Run]:
    """One run of ``side`` on a new topic, once the route is up; with ``durable``, then its
    replay."""
    k = next(_topics)
    tally = Tally(n)
    async with side.live(k, tally) as publish:
        probes = await _ready(publish, tally)
        tally.reset(n)
        live = await _measure(publish, tally, n, sizes, pids)
    if not durable:
        return [live]
    # The stream holds the probes too: the replay reads them all.
    return [live, await _replay(side, k, probes + live.sent, sizes, pids)]


async def measure_mode(
    ctx: BenchContext,
    mode: str,
    troupe: Side,
    floor: Side | None,
    pids: list[int],
    *,
    durable: bool = False,
) -> ModeResult:
    """``ctx.repetitions`` runs of ``troupe``, each between two runs of ``floor`` (if any);
    ``durable``: each run followed by its replay. ``pids``: other processes whose CPU counts."""
    sizes = sizes_for(ctx.quick)
    n = sizes.durable if durable else sizes.events
    result = ModeResult()

    async def floor_run() -> None:
        if floor is not None:
            runs = await _once(floor, n, sizes, pids, durable)
            result.floor.append(runs[0])
            result.floor_replay.extend(runs[1:])

    for rep in range(ctx.repetitions):
        ctx.log(f"events {mode}: floor run {rep + 1}, troupe run {rep + 1}")
        await floor_run()
        runs = await _once(troupe, n, sizes, pids, durable)
        result.troupe.append(runs[0])
        result.troupe_replay.extend(runs[1:])
    await floor_run()
    return result


# --- helpers ---------------------------------------------------------------------------------


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it; raise what it failed with, if it failed."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]  # not None: checked above
