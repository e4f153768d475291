"""The KV suite: what the KV router's index costs (:class:`troupe.kv.KvIndex`), on one core, and
what KV-aware routing gains end to end (:func:`benchmarks._kv_routing.routing_rows`).

Index figures (:func:`index_rows`), on realistic trees made by :func:`make_workload`: a few
shared system prompts, conversations branching off them (later turns extend a conversation), each
worker holding the conversations routed to it (some also partly on a second worker, as after a
move), every worker's blocks arriving as ``Stored`` events of 4-16 blocks, the workers' streams
interleaved as a router receives them.

- **apply**: ``Stored`` events into a new index, ``KvIndex.store(worker, hashes)`` per event
  (hashes already decoded), and **decode + apply**: the same from each event's msgpack payload
  (``decode_payload_as`` then ``store``), what a router does per event received. Blocks per
  second; the floor inserts the same hashes, event by event, into a plain dict
  (``d[h] = worker_bit``; decoded with the same msgspec decoder for the second figure). Goal:
  at least 500,000 blocks a second, decoded.
- **lookup**: ``find_matches`` of a 256-block prompt against 8 and against 64 workers, timed one
  call at a time; p50 and p99. Prompts: 60 % a later turn of a held conversation, 30 % a new
  conversation on a known system prompt, 10 % unseen. The floor looks the same 256 hashes up in
  a plain dict of the same hashes (``list(map(d.get, prompt))``: what a lookup that probes every
  block costs; ``find_matches`` gallops and binary-searches over the prompt instead, so it
  probes a few blocks per change of owners and can beat the floor). Goal: p50 under 30 µs.

Every figure interleaves its floor: a floor pass before and after each troupe pass, the
reference being the median of the floor passes. ``run`` returns the index rows, then the
end-to-end rows: TTFT through ``troupe frontend`` and ``troupe mocker`` workers per router mode
(kv, approximate, round robin, random) on a multi-turn workload and on NVIDIA Dynamo's
shared-prefix workload (see ``benchmarks/_kv_routing.py``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from benchmarks._harness import BenchContext, Row, median, percentile
from benchmarks._kv_routing import routing_rows
from troupe.kv import KvCacheEvent, KvIndex, Stored, StoredBlock, sequence_hashes

__all__ = [
    "APPLY_GOAL",
    "LOOKUP_GOAL_US",
    "PROMPT_BLOCKS",
    "SUITE",
    "Figure",
    "IndexResult",
    "Pass",
    "Workload",
    "index_rows",
    "make_workload",
    "rows_from",
    "run",
]

SUITE = "kv"

PROMPT_BLOCKS = 256
APPLY_GOAL = 500_000.0  # blocks applied per second, decoded
LOOKUP_GOAL_US = 30.0  # find_matches p50
SYSTEM_PROMPTS = 8
_KINDS = ("continuation", "new conversation", "unseen")
_GROUP = "kv index"


# --- the workload -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Stored events in arrival order and the prompts to look up, with each prompt's kind."""

    workers: list[str]
    events: list[tuple[str, KvCacheEvent]]
    prompts: list[list[int]]
    kinds: list[str]

    @property
    def blocks(self) -> int:
        return sum(len(_hashes(event)) for _, event in self.events)


def _hashes(event: KvCacheEvent) -> list[int]:
    data = event.data
    return [b.block_hash for b in data.blocks] if isinstance(data, Stored) else []


def make_workload(workers: int, blocks_per_worker: int, prompts: int, seed: int = 11) -> Workload:
    """Deterministic trees for ``workers`` workers of about ``blocks_per_worker`` blocks each."""
    rng = random.Random(seed)

    def fresh(n: int, parent: int | None = None) -> list[int]:
        return sequence_hashes([rng.getrandbits(64) for _ in range(n)], parent)

    systems = [fresh(rng.randint(16, 64)) for _ in range(SYSTEM_PROMPTS)]
    popularity = [1.0 / (i + 1) for i in range(SYSTEM_PROMPTS)]  # a few prompts dominate
    names = [f"{rng.getrandbits(64):016x}" for _ in range(workers)]
    streams: dict[str, list[KvCacheEvent]] = {name: [] for name in names}
    held_systems: dict[str, set[int]] = {name: set() for name in names}
    held = dict.fromkeys(names, 0)
    conversations: list[tuple[int, list[int]]] = []

    def store(worker: str, system: int, branch: list[int]) -> None:
        prefix = [] if system in held_systems[worker] else systems[system]
        held_systems[worker].add(system)
        chain = prefix + branch
        parent = None if prefix else systems[system][-1]
        stream = streams[worker]
        start = 0
        while start < len(chain):
            left = len(chain) - start  # pieces of 4-16 blocks, the last one too
            size = left if left <= 16 else rng.randint(4, min(16, left - 4))
            piece = chain[start : start + size]
            blocks = [StoredBlock(h, rng.getrandbits(64)) for h in piece]
            stream.append(KvCacheEvent(len(stream) + 1, Stored(parent, blocks)))
            parent, start = piece[-1], start + size
        held[worker] += len(chain)

    for worker in names:
        while held[worker] < blocks_per_worker:
            system = rng.choices(range(SYSTEM_PROMPTS), popularity)[0]
            room = PROMPT_BLOCKS - len(systems[system]) - 16
            branch = fresh(rng.randint(16, room), systems[system][-1])
            store(worker, system, branch)
            conversations.append((system, branch))
            if workers > 1 and rng.random() < 0.2:  # moved: its first half on another worker
                other = rng.choice([name for name in names if name != worker])
                store(other, system, branch[: len(branch) // 2])
    # Arrival order: the workers' streams interleaved, one event from each in turn.
    longest = max(len(stream) for stream in streams.values())
    events = [
        (name, streams[name][i]) for i in range(longest) for name in names if i < len(streams[name])
    ]
    lookups: list[list[int]] = []
    kinds: list[str] = []
    for _ in range(prompts):
        draw = rng.random()
        if draw < 0.6:
            system, branch = rng.choice(conversations)
            prefix, kind = systems[system] + branch, _KINDS[0]
        elif draw < 0.9:
            prefix, kind = systems[rng.choices(range(SYSTEM_PROMPTS), popularity)[0]], _KINDS[1]
        else:
            prefix, kind = [], _KINDS[2]
        tail = fresh(PROMPT_BLOCKS - len(prefix), prefix[-1] if prefix else None)
        lookups.append(prefix + tail)
        kinds.append(kind)
    return Workload(names, events, lookups, kinds)


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Pass:
    """One pass of a figure: blocks/s (apply) or per-call latencies in µs (lookup), and CPU."""

    rate: float = float("nan")
    lat_us: list[float] = field(default_factory=list)
    cpu_us: float = float("nan")


def _timed(work: Callable[[], int]) -> tuple[float, float, int]:
    """(wall s, CPU s of this thread, count) of ``work()``."""
    c0, t0 = time.thread_time(), time.perf_counter()
    count = work()
    return time.perf_counter() - t0, time.thread_time() - c0, count


def _rate_pass(work: Callable[[], int]) -> Pass:
    seconds, cpu, count = _timed(work)
    return Pass(rate=count / seconds, cpu_us=cpu * 1e6 / max(count, 1))


def _apply(pairs: Sequence[tuple[str, list[int]]]) -> int:
    store = KvIndex().store
    for worker, hashes in pairs:
        store(worker, hashes)
    return sum(len(hashes) for _, hashes in pairs)


def _apply_floor(
    pairs: Sequence[tuple[str, list[int]]], bits: dict[str, int], owners: dict[int, int]
) -> int:
    blocks = 0
    for worker, hashes in pairs:
        bit = bits[worker]
        for block in hashes:
            owners[block] = bit
        blocks += len(hashes)
    return blocks


def _decode_apply(payloads: Sequence[tuple[str, bytes]]) -> int:
    from troupe.events import decode_payload_as  # noqa: PLC0415

    store = KvIndex().store
    blocks = 0
    for worker, payload in payloads:
        data = decode_payload_as(payload, KvCacheEvent).data
        if isinstance(data, Stored):
            hashes = [b.block_hash for b in data.blocks]
            store(worker, hashes)
            blocks += len(hashes)
    return blocks


def _decode_apply_floor(payloads: Sequence[tuple[str, bytes]], bits: dict[str, int]) -> int:
    decode = msgspec.msgpack.Decoder(KvCacheEvent).decode
    owners: dict[int, int] = {}
    blocks = 0
    for worker, payload in payloads:
        data = decode(payload).data
        if isinstance(data, Stored):
            bit = bits[worker]
            for b in data.blocks:
                owners[b.block_hash] = bit
            blocks += len(data.blocks)
    return blocks


def _lookup_pass(lookup: Callable[[list[int]], object], prompts: list[list[int]]) -> Pass:
    clock = time.perf_counter_ns
    lat: list[float] = []
    c0 = time.thread_time()
    for prompt in prompts:
        t0 = clock()
        lookup(prompt)
        lat.append((clock() - t0) / 1000)
    cpu = time.thread_time() - c0
    return Pass(lat_us=lat, cpu_us=cpu * 1e6 / max(len(prompts), 1))


@dataclass
class Figure:
    """One figure's passes: troupe's and the floor's (one more, around them)."""

    troupe: list[Pass] = field(default_factory=list)
    floor: list[Pass] = field(default_factory=list)


def _interleaved(reps: int, troupe: Callable[[], Pass], floor: Callable[[], Pass]) -> Figure:
    figure = Figure()
    for _ in range(reps):
        figure.floor.append(floor())
        figure.troupe.append(troupe())
    figure.floor.append(floor())
    return figure


@dataclass
class IndexResult:
    """Every pass of the index figures, and facts about the workloads for the notes."""

    apply: Figure = field(default_factory=Figure)
    decode_apply: Figure = field(default_factory=Figure)
    lookups: dict[int, Figure] = field(default_factory=dict)  # by number of workers
    apply_note: str = ""
    lookup_notes: dict[int, str] = field(default_factory=dict)


def _lookup_note(workload: Workload, index: KvIndex, passes: list[Pass]) -> str:
    """p50 per prompt kind, and how much of the prompts the workers hold."""
    best = [max(index.find_matches(p).values(), default=0) for p in workload.prompts]
    matched = sum(1 for b in best if b) / len(best)
    per_kind = []
    for kind in _KINDS:
        lat = [p.lat_us[i] for p in passes for i, k in enumerate(workload.kinds) if k == kind]
        if lat:
            per_kind.append(f"{kind} {percentile(lat, 50):.1f}")
    blocks = workload.blocks
    return (
        f"{len(workload.workers)} workers, {blocks:,} blocks held ({len(index):,} distinct); "
        f"{matched:.0%} of prompts share a prefix with a worker, longest match mean "
        f"{sum(best) / len(best):.0f} of {PROMPT_BLOCKS} blocks; p50 µs by prompt kind: "
        + ", ".join(per_kind)
    )


def _measure_apply(reps: int, workload: Workload, result: IndexResult) -> None:
    """The apply figures: every Stored event of ``workload`` into a new index, per pass."""
    pairs = [(worker, _hashes(event)) for worker, event in workload.events]
    payloads = [(worker, msgspec.msgpack.encode(event)) for worker, event in workload.events]
    bits = {name: 1 << i for i, name in enumerate(workload.workers)}
    result.apply = _interleaved(
        reps,
        lambda: _rate_pass(lambda: _apply(pairs)),
        lambda: _rate_pass(lambda: _apply_floor(pairs, bits, {})),
    )
    result.decode_apply = _interleaved(
        reps,
        lambda: _rate_pass(lambda: _decode_apply(payloads)),
        lambda: _rate_pass(lambda: _decode_apply_floor(payloads, bits)),
    )
    mean_bytes = sum(len(payload) for _, payload in payloads) / len(payloads)
    result.apply_note = (
        f"{len(pairs):,} Stored events of 4-16 blocks ({workload.blocks:,} blocks, "
        f"{mean_bytes:.0f} B of msgpack per event on average) from "
        f"{len(workload.workers)} workers into a new index"
    )


def _measure_lookups(reps: int, workload: Workload, result: IndexResult) -> None:
    """The lookup figure for ``workload``'s workers: every prompt, one call at a time, per pass."""
    index = KvIndex()
    plain: dict[int, int] = {}
    bits = {name: 1 << i for i, name in enumerate(workload.workers)}
    pairs = [(worker, _hashes(event)) for worker, event in workload.events]
    for worker, hashes in pairs:
        index.store(worker, hashes)
    _apply_floor(pairs, bits, plain)
    get, prompts = plain.get, workload.prompts
    figure = _interleaved(
        reps,
        lambda: _lookup_pass(index.find_matches, prompts),
        lambda: _lookup_pass(lambda prompt: list(map(get, prompt)), prompts),
    )
    workers = len(workload.workers)
    result.lookups[workers] = figure
    result.lookup_notes[workers] = _lookup_note(workload, index, figure.troupe)


def _measure(ctx: BenchContext, sizes: tuple[int, int]) -> IndexResult:
    blocks_per_worker, prompts = sizes
    result = IndexResult()
    for workers in (8, 64):
        ctx.log(f"kv index: {workers} workers: making the trees")
        workload = make_workload(workers, blocks_per_worker, prompts)
        if workers == 64:  # the apply figures on the larger index
            ctx.log(f"kv index: {workers} workers: apply")
            _measure_apply(ctx.repetitions, workload, result)
        ctx.log(f"kv index: {workers} workers: find_matches")
        _measure_lookups(ctx.repetitions, workload, result)
    return result


# --- rows -------------------------------------------------------------------------------------


def _rate_row(name: str, figure: Figure, reference: str, note: str = "") -> Row:
    values = [p.rate for p in figure.troupe]
    return Row(
        group=_GROUP,
        name=name,
        value=median(values),
        unit="blocks/s",
        cpu_us=median([p.cpu_us for p in figure.troupe]),
        reference=reference,
        reference_value=median([p.rate for p in figure.floor]),
        note=note,
        samples=values,
    )


def _goal_row(name: str, row: Row, goal: float, higher_is_better: bool) -> Row:
    return Row(
        group=_GROUP,
        name=f"{name}: goal",
        value=row.value,
        unit=row.unit,
        p99=row.p99,
        reference="goal",
        reference_value=goal,
        higher_is_better=higher_is_better,
        target=1.0,
        samples=row.samples,
    )


def rows_from(result: IndexResult) -> list[Row]:
    """The index rows: apply, decode + apply (and its goal), find_matches at 8 and 64 workers
    (each with its goal)."""
    decoded = _rate_row(
        "decode + apply Stored events",
        result.decode_apply,
        "msgspec + dict floor",
        "msgpack payload → KvCacheEvent → KvIndex.store, one event at a time",
    )
    rows = [
        _rate_row("apply Stored events", result.apply, "dict floor", result.apply_note),
        decoded,
        _goal_row(decoded.name, decoded, APPLY_GOAL, True),
    ]
    for workers, figure in sorted(result.lookups.items()):
        p50s = [percentile(p.lat_us, 50) for p in figure.troupe]
        lookup = Row(
            group=_GROUP,
            name=f"find_matches {PROMPT_BLOCKS} blocks, {workers} workers",
            value=median(p50s),
            unit="µs",
            p99=median([percentile(p.lat_us, 99) for p in figure.troupe]),
            cpu_us=median([p.cpu_us for p in figure.troupe]),
            reference=f"dict floor ({PROMPT_BLOCKS} lookups)",
            reference_value=median([percentile(p.lat_us, 50) for p in figure.floor]),
            higher_is_better=False,
            note=result.lookup_notes.get(workers, ""),
            samples=p50s,
        )
        rows += [
            lookup,
            _goal_row(f"find_matches p50, {workers} workers", lookup, LOOKUP_GOAL_US, False),
        ]
    return rows


def _sizes(quick: bool) -> tuple[int, int]:
    """(blocks per worker, prompts per pass)."""
    return (2_048, 2_000) if quick else (4_096, 20_000)


def index_rows(ctx: BenchContext) -> list[Row]:
    """The KV index figures (see the module docstring) as rows."""
    return rows_from(_measure(ctx, _sizes(ctx.quick)))


def run(ctx: BenchContext) -> list[Row]:
    """The suite: the index rows, then routing end to end (``benchmarks/_kv_routing.py``)."""
    return index_rows(ctx) + routing_rows(ctx)
