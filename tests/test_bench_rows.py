"""The benchmark's row builders: failure-window counting, the NVIDIA Dynamo comparison rows, the
event-plane and KV index rows, the KV suite's workloads, and the KV routing rows (with the
routing benchmark's client against a scripted HTTP server on loopback).

Pure functions over made-up outcomes: no process, no timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from benchmarks import _kv_routing
from benchmarks._event_runs import ModeResult, Publish, Run, Tally, kv_events, measure_mode
from benchmarks._failure_load import Load, Outcome, Request
from benchmarks._failure_rows import rows as failure_rows
from benchmarks._harness import BenchContext, Row
from benchmarks._kv_client import Exchange, SseDecoder, StreamClient, run_fixed
from benchmarks._kv_client import Run as ClientRun
from benchmarks._kv_cluster import ClusterError, Counters, MockerSpec, metric_values
from benchmarks._kv_routing import (
    CHAT_GROUP,
    CHAT_TARGETS,
    PREFIX_GROUP,
    REFERENCE,
    ModeRun,
    mode_run,
    prefix_scenario,
    scenario_rows,
)
from benchmarks._kv_workload import (
    ChatSpec,
    PrefixSpec,
    answer_text,
    chat_prompts,
    distinct_blocks,
    make_conversations,
    make_prefix_prompts,
)
from benchmarks.bench_dynamo import GROUP, VERSUS, versus
from benchmarks.bench_events import mode_rows
from benchmarks.bench_kv import (
    APPLY_GOAL,
    PROMPT_BLOCKS,
    Figure,
    IndexResult,
    Pass,
    make_workload,
    rows_from,
)
from troupe.frontend import WordTokenizer
from troupe.kv import KvIndex, Stored, block_hashes


def _by_name(made: list[Row]) -> dict[str, Row]:
    return {row.name: row for row in made}


def test_failure_rows_count_failures_after_the_kill_moved_latency_and_duplicates() -> None:
    outcome = Outcome("troupe", 10.0, Load(rate=10.0), 3, 4.0, killed_at=1.0, left_at=3.0)
    outcome.requests = [
        Request(start=0.9, latency=0.05, failure="StreamBroken"),  # in flight at the kill
        Request(start=1.2, latency=0.08, failure=None, migrated=True, duplicates=2),
        Request(start=1.5, latency=0.10, failure=None, migrated=True),
        Request(start=2.0, latency=0.01, failure="ConnectionRefused"),  # before the Left
        Request(start=3.5, latency=0.08, failure=None),  # after the Left
    ]
    peer = Outcome("NVIDIA Dynamo", 30.0, Load(rate=10.0), 0, 4.0, killed_at=1.0)
    peer.requests = [Request(start=0.5, latency=0.08, failure="x"), Request(1.5, 0.08, None)]

    made = _by_name(failure_rows(outcome, peer))

    assert made["failed with migration"].value == 2
    assert made["failed with migration"].reference == "NVIDIA Dynamo: 1 of 2"
    after = made["failed, started after the kill with migration"]
    assert after.value == 1
    assert "3 of them started before the dead instance left (2000 ms" in after.note
    assert after.reference == "NVIDIA Dynamo: 0 of 1"
    assert made["kill -9 → instance gone with migration"].value == 2000.0
    assert made["migrated requests: latency p50"].value == 90.0
    assert "max 100 ms" in made["migrated requests: latency p50"].note
    duplicates = made["duplicated chunks per completed stream"]
    assert duplicates.value == 2 / 3
    assert "1 stream(s) held a chunk twice, at most 2 in one" in duplicates.note


def test_failure_rows_without_migration_or_kill() -> None:
    outcome = Outcome("troupe", 2.0, Load(inflight=20), 0, 4.0)
    outcome.requests = [Request(start=0.1, latency=0.08, failure=None)]

    made = _by_name(failure_rows(outcome, None))

    assert set(made) == {
        "failed without migration",
        "failed, started after the kill without migration",
        "kill -9 → instance gone without migration",
    }
    assert math.isnan(made["failed, started after the kill without migration"].value)
    assert math.isnan(made["kill -9 → instance gone without migration"].value)
    assert made["failed without migration"].group.endswith("lease TTL 2 s, 20 in flight")


def test_dynamo_versus_reads_times_better_than_dynamo() -> None:
    measured = [
        Row(group=GROUP, name="tcp: round trip p50", value=1200.0, unit="µs"),
        Row(group=GROUP, name="troupe tcp: round trip p50", value=300.0, unit="µs"),
        Row(group=GROUP, name="tcp: throughput @64", value=2000.0, unit="req/s"),
        Row(group=GROUP, name="troupe tcp: throughput @64", value=14000.0, unit="req/s"),
        Row(group=GROUP, name="nats: did not run", value=math.nan, unit=""),
    ]

    made = _by_name(versus(measured))

    assert set(made) == {"tcp round trip p50", "tcp throughput @64"}
    assert all(row.group == VERSUS for row in made.values())
    assert made["tcp round trip p50"].ratio == 4.0
    assert made["tcp throughput @64"].ratio == 7.0


def test_event_rows_compare_with_the_floor_and_show_lost_events() -> None:
    troupe = [Run(1000, 1000, 0.1, 0.125, 0.02), Run(1000, 936, 0.1, 0.125, 0.0468)]
    floor = [Run(1000, 1000, 0.05, 0.0625, 0.01)] * 3

    made = _by_name(mode_rows("nats", ModeResult(troupe, floor)))

    assert set(made) == {"published", "applied", "delivered"}
    assert all(row.group == "events: nats" for row in made.values())
    assert all(row.reference == "nats-py floor" for row in made.values())
    assert made["published"].value == 10_000.0
    assert made["published"].ratio == 0.5
    assert made["applied"].value == (8_000.0 + 7_488.0) / 2
    assert made["applied"].reference_value == 16_000.0
    assert made["applied"].cpu_us == pytest.approx(35.0)  # 20 and 50 µs per event applied
    assert "floor CPU 10.0 µs/event" in made["applied"].note
    delivered = made["delivered"]
    assert delivered.value == 96.8
    assert delivered.ratio == 0.968
    assert "applied 1,936 of 2,000 sent over 2 runs (LOST 64)" in delivered.note
    assert "floor: 3,000 of 3,000 over 3 runs" in delivered.note


def test_event_rows_of_the_durable_mode_add_the_replay_and_memory_has_no_floor() -> None:
    live = [Run(500, 500, 0.25, 0.25, 0.1)]
    replay = [Run(503, 503, 0.0, 0.05, 0.01)]
    durable = _by_name(mode_rows("nats durable", ModeResult(live, live * 2, replay, replay * 2)))
    memory = _by_name(mode_rows("memory", ModeResult(live, []), note="payload"))

    replayed = durable["replayed from the stream"]
    assert replayed.value == 503 / 0.05
    assert replayed.reference == "nats-py JetStream floor"
    assert "replayed 503 of 503 stored (the probes included) over 1 run;" in replayed.note
    assert set(memory) == {"published", "applied", "delivered"}
    assert all(row.reference is None and row.ratio is None for row in memory.values())
    assert memory["published"].note == "payload"
    assert memory["delivered"].value == 100.0


class _DroppingSide:
    """A side whose subscriber misses the first ``drop`` events (a new NATS subscription can)."""

    def __init__(self, drop: int) -> None:
        self.drop = drop
        self.published = 0

    @contextlib.asynccontextmanager
    async def live(self, k: int, tally: Tally) -> AsyncIterator[Publish]:
        async def publish(i: int) -> object:
            self.published += 1
            if self.published > self.drop:
                tally.hit()
            return None

        yield publish

    def replay(self, k: int, tally: Tally) -> contextlib.AbstractAsyncContextManager[None]:
        raise NotImplementedError


async def test_event_runs_probe_until_the_route_is_up_then_count_every_event(tmp_path) -> None:
    ctx = BenchContext(quick=True, repetitions=2, scratch=tmp_path)
    troupe, floor = _DroppingSide(drop=3), _DroppingSide(drop=0)

    result = await measure_mode(ctx, "nats", troupe, floor, [])

    assert [(r.sent, r.delivered) for r in result.troupe] == [(5_000, 5_000)] * 2
    assert [(r.sent, r.delivered) for r in result.floor] == [(5_000, 5_000)] * 3
    assert troupe.published == 4 + 5_000 + 1 + 5_000  # 3 probes lost, then one got in
    assert result.troupe_replay == result.floor_replay == []


def test_kv_events_are_stored_events_of_4_to_16_blocks() -> None:
    events = kv_events(64)

    assert events == kv_events(64)
    blocks = [len(e.data.blocks) for e in events if isinstance(e.data, Stored)]
    assert len(blocks) == 64
    assert min(blocks) >= 4
    assert max(blocks) <= 16


def test_kv_workload_trees_share_prefixes_as_prompts_expect() -> None:
    workload = make_workload(workers=8, blocks_per_worker=512, prompts=300)

    assert workload == make_workload(workers=8, blocks_per_worker=512, prompts=300)
    assert all(len(prompt) == PROMPT_BLOCKS for prompt in workload.prompts)
    sizes = [len(e.data.blocks) for _, e in workload.events if isinstance(e.data, Stored)]
    assert len(sizes) == len(workload.events)
    assert min(sizes) >= 4
    assert max(sizes) <= 16
    index = KvIndex()
    for worker, event in workload.events:
        assert isinstance(event.data, Stored)
        index.store(worker, [b.block_hash for b in event.data.blocks])
    assert all(index.block_count(w) >= 512 for w in workload.workers)
    best = {
        kind: [
            max(index.find_matches(p).values(), default=0)
            for p, k in zip(workload.prompts, workload.kinds, strict=True)
            if k == kind
        ]
        for kind in ("continuation", "new conversation", "unseen")
    }
    assert all(depth >= 32 for depth in best["continuation"])  # system prompt + branch
    # A new conversation matches its system prompt, wherever a worker holds that prompt.
    new = best["new conversation"]
    assert all(depth == 0 or 16 <= depth <= 64 for depth in new)
    assert sum(1 for depth in new if depth) > len(new) / 2
    assert best["unseen"]
    assert not any(best["unseen"])
    assert len(best["continuation"]) > len(workload.prompts) / 2  # most prompts share a prefix
    shared = [
        len(index.find_matches(p)) for p, k in zip(workload.prompts, workload.kinds, strict=True)
    ]
    assert max(shared) > 1  # system prompts are held by several workers


def _lookup(p50: float, floor_p50: float) -> Figure:
    return Figure(
        troupe=[Pass(lat_us=[p50] * 99 + [3 * p50], cpu_us=p50)] * 3,
        floor=[Pass(lat_us=[floor_p50] * 100)] * 4,
    )


def test_kv_index_rows_compare_with_the_dict_floor_and_the_goals() -> None:
    result = IndexResult(
        apply=Figure(troupe=[Pass(rate=1e6, cpu_us=1.0)] * 3, floor=[Pass(rate=4e6)] * 4),
        decode_apply=Figure(
            troupe=[Pass(rate=4e5), Pass(rate=6e5), Pass(rate=4.5e5)],
            floor=[Pass(rate=1e6)] * 4,
        ),
        lookups={8: _lookup(20.0, 10.0), 64: _lookup(45.0, 15.0)},
        lookup_notes={8: "eight"},
    )

    made = _by_name(rows_from(result))

    assert made["apply Stored events"].ratio == 0.25
    assert made["apply Stored events"].reference == "dict floor"
    assert made["decode + apply Stored events"].value == 4.5e5
    goal = made["decode + apply Stored events: goal"]
    assert goal.reference_value == APPLY_GOAL
    assert goal.met is False
    lookup = made["find_matches 256 blocks, 8 workers"]
    assert lookup.value == 20.0
    assert lookup.ratio == 2.0
    assert lookup.note == "eight"
    assert not lookup.higher_is_better
    assert made["find_matches p50, 8 workers: goal"].met is True
    assert made["find_matches p50, 64 workers: goal"].met is False
    assert made["find_matches p50, 64 workers: goal"].ratio == 1.5


# --- KV routing end to end ---------------------------------------------------------------------


def test_chat_conversations_grow_by_the_answer_and_a_message_and_share_system_prompts() -> None:
    spec = ChatSpec(users=12, system_prompts=3, system_words=200, turns=(2, 3))

    conversations = make_conversations(spec)

    assert conversations == make_conversations(spec)
    assert len({c.system for c in conversations}) == 3
    assert all(len(c.system.split()) == 200 for c in conversations)
    for conversation in conversations:
        assert 2 <= conversation.turns <= 3
        assert all(50 <= len(m.split()) <= 150 for m in conversation.messages)
        assert all(8 <= n <= 16 for n in conversation.max_tokens)
        prompts = chat_prompts(conversation)
        for turn in range(1, len(prompts)):
            answer = answer_text(conversation.max_tokens[turn - 1])
            assert prompts[turn] == f"{prompts[turn - 1]} {answer} {conversation.messages[turn]}"
            before = WordTokenizer().encode(prompts[turn - 1])
            assert WordTokenizer().encode(prompts[turn])[: len(before)] == before
    prompts = [p for c in conversations for p in chat_prompts(c)]
    distinct = distinct_blocks(prompts, 16)
    # Each system prompt's 12 full blocks count once, however many users open with it.
    assert distinct < sum(len(block_hashes(WordTokenizer().encode(p), 16)) for p in prompts)
    assert distinct > 3 * 12


def test_prefix_prompts_are_a_shared_prefix_and_a_unique_tail() -> None:
    prompts = make_prefix_prompts(PrefixSpec(prefixes=3, prefix_words=64, requests=30))

    assert prompts == make_prefix_prompts(PrefixSpec(prefixes=3, prefix_words=64, requests=30))
    assert all(len(p.split()) == 64 + 100 for p in prompts)
    assert len({" ".join(p.split()[:64]) for p in prompts}) == 3
    assert len({" ".join(p.split()[64:]) for p in prompts}) == 30
    assert distinct_blocks(prompts, 16) == 3 * 4 + 30 * 6  # 100 unique words: 6 full blocks


def test_sse_decoder_cuts_events_across_any_split_and_reads_only_data() -> None:
    stream = (
        b'data: {"a": 1}\r\n\r\n: comment\n\nevent: x\ndata: two\ndata: lines\n\ndata: [DONE]\n\n'
    )
    for cut in range(len(stream) + 1):
        sse = SseDecoder()
        events = sse.feed(stream[:cut]) + sse.feed(stream[cut:])
        assert events == [b'{"a": 1}', b"two\nlines", b"[DONE]"]
    assert SseDecoder().feed(b"data: no end yet\n") == []


def test_metric_values_sum_label_sets_and_skip_comments() -> None:
    text = (
        "# HELP x_total help\n# TYPE x_total counter\nx_total 3.0\n"
        'y{endpoint="a"} 1\ny{endpoint="b"} 2.5\nbroken line\n'
    )

    assert metric_values(text) == {"x_total": 3.0, "y": 3.5}


async def _scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Two requests on one connection: a chunked SSE answer cut mid-event, then a 400."""
    for answer in range(2):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        if answer == 0:
            body = (
                b'data: {"choices": [{"text": "one"}]}\n\n'
                b'data: {"choices": [{"text": " two"}]}\n\ndata: [DONE]\n\n'
            )
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for piece in (body[:20], body[20:]):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        else:
            error = b'{"error": {"message": "bad"}}'
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: %d\r\n\r\n" % len(error))
            writer.write(error)
        await writer.drain()
    writer.close()


async def test_stream_client_reads_chunked_events_and_http_errors_on_one_connection() -> None:
    server = await asyncio.start_server(_scripted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = StreamClient("127.0.0.1", port)
    try:
        answered = await client.complete({"prompt": "hi"})
        refused = await client.complete({"prompt": "again"})
    finally:
        await client.close()
        server.close()
        await server.wait_closed()

    assert answered.error is None
    assert answered.text == "one two"
    assert answered.ttft is not None
    assert answered.sent <= answered.first <= answered.ended  # type: ignore[operator]
    assert refused.error is not None
    assert refused.error.startswith("HTTP 400: {")
    assert refused.first is None


async def test_run_fixed_leaves_the_warm_up_out_and_never_drains_in_between() -> None:
    """The first warm-up request is answered only once a measured one has arrived: a loop that
    waited for the warm-up to drain would never send it (and time out here)."""
    measured_arrived = asyncio.Event()
    warmed_at: list[int] = []
    answered: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):  # the client's connection closed
            await answer(reader, writer)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            prompt = json.loads(await reader.readexactly(length))["prompt"]
            if prompt.startswith("m"):
                measured_arrived.set()
            if prompt == "w0":
                await measured_arrived.wait()
            body = b'data: {"choices": [{"text": "ok"}]}\n\n'
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            await writer.drain()
            answered.append(prompt)

    async def warmed() -> None:
        warmed_at.append(len(answered))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = ("127.0.0.1", server.sockets[0].getsockname()[1])
    prompts = ["w0", "w1", "m0", "m1", "m2"]
    try:
        run = await asyncio.wait_for(
            run_fixed(url, "m", prompts, 2, 1, {}, time.monotonic() + 10, warmup=2, warmed=warmed),
            timeout=10,
        )
    finally:
        server.close()
        await server.wait_closed()
    assert len(run.exchanges) == 3  # m0, m1, m2: the warm-up is left out
    assert all(e.error is None and e.text == "ok" for e in run.exchanges)
    assert len(warmed_at) == 1
    assert "w0" in answered[: warmed_at[0]]  # called once the last warm-up request ended
    assert run.started == min(e.sent for e in run.exchanges)


def _mode(ttft_ms: list[float], rate: float, hit: float, **extra: object) -> ModeRun:
    fields: dict[str, Any] = {
        "ttft_ms": ttft_ms,
        "rate": rate,
        "hit_rate": hit,
        "cpu_us": 1000.0,
        "lane_busy": 0.5,
        "requests": len(ttft_ms),
        "tokens_per_worker": [300.0, 100.0],
    }
    return ModeRun(**(fields | extra))


def test_kv_routing_rows_compare_every_mode_with_round_robin_and_the_goals() -> None:
    slow = [100.0] * 98 + [400.0] * 2
    results = {
        REFERENCE: [_mode(slow, 10.0, 0.2), _mode(slow, 12.0, 0.3)],
        "kv": [
            _mode([30.0] * 100, 15.0, 0.8, events={"troupe_kv_events_gaps_total": 1.0}),
            _mode([30.0] * 100, 16.0, 0.8, errors=["HTTP 503"]),
        ],
        "approximate": [_mode([70.0] * 100, 11.0, 0.6)] * 2,
        "random": [_mode(slow, 9.0, 0.1)] * 2,
    }

    made = _by_name(scenario_rows(CHAT_GROUP, results, CHAT_TARGETS, "the workload"))

    assert len(made) == 4 * 4
    assert all(row.group == CHAT_GROUP for row in made.values())
    rr = made["round robin: TTFT p50"]
    assert (rr.value, rr.p99, rr.unit) == (100.0, 400.0, "ms")
    assert rr.reference is None
    assert rr.target is None
    assert rr.note.startswith("the workload. 200 requests in 2 run(s), 0 failed; prefill lanes")
    assert made["round robin: requests/s"].value == 11.0
    assert made["round robin: cache hit rate"].value == 25.0
    goal = made["kv: TTFT p50"]
    assert (goal.reference, goal.reference_value, goal.ratio) == (REFERENCE, 100.0, 0.3)
    assert goal.target == pytest.approx(1 / 3)
    assert goal.met is True
    assert "1 failed (first: HTTP 503)" in goal.note
    assert "prompt tokens per worker 75%/25%" in goal.note
    assert "KV events applied 0, gaps 1 (0 recovered)" in goal.note
    assert made["kv: requests/s"].ratio == 15.5 / 11.0
    assert made["kv: requests/s"].cpu_us == 1000.0
    assert made["kv: cache hit rate"].ratio == pytest.approx(80 / 25)
    assert made["approximate: TTFT p50"].met is False  # 0.7 > 2/3
    assert made["random: TTFT p50"].target is None
    assert made["random: TTFT p99"].ratio == 1.0
    assert not made["random: TTFT p99"].higher_is_better


def test_shared_prefix_rows_meet_dynamo_ratios_only_where_troupe_does_as_well() -> None:
    targets = {("kv", "TTFT p50"): 0.56, ("kv", "TTFT p99"): 0.27, ("kv", "requests/s"): 1.24}
    results = {
        REFERENCE: [_mode([100.0] * 100, 10.0, 0.5)],
        "kv": [_mode([50.0] * 99 + [1000.0], 12.0, 0.9)],
    }

    made = _by_name(scenario_rows(PREFIX_GROUP, results, targets))

    assert made["kv: TTFT p50"].met is True  # 0.5 <= 0.56
    assert made["kv: TTFT p99"].met is False  # ~9x worse than round robin's p99
    assert made["kv: requests/s"].met is False  # 1.2 < 1.24
    assert made["kv: cache hit rate"].target is None


def test_mode_run_reads_hit_rate_prefill_busy_and_cpu_per_request() -> None:
    run = ClientRun(
        exchanges=[
            Exchange(sent=0.0, first=0.05, ended=0.5, text="a"),
            Exchange(sent=0.1, first=0.3, ended=1.0, text="b"),
            Exchange(sent=1.0, ended=1.1, error="HTTP 500"),
        ],
        started=0.0,
        ended=2.0,
    )
    counters = Counters([4_000.0, 2_000.0], [3_000.0, 0.0], {"troupe_kv_events_gaps_total": 0.0}, 9)
    engine = MockerSpec(
        16, 100, prefill_tokens_per_second=1_000.0, tokens_per_second=10, output_tokens=4
    )

    made = mode_run(run, counters, cpu_seconds=0.5, engine=engine)

    assert made.ttft_ms == pytest.approx([50.0, 200.0])
    assert made.rate == 1.0  # 2 completed over 2 s
    assert made.hit_rate == 0.5
    assert made.cpu_us == 250_000.0
    assert made.lane_busy == pytest.approx((0.5 + 1.0) / 2)  # 1 s and 2 s of prefill over 2 s
    assert (made.requests, made.errors) == (3, ["HTTP 500"])
    assert made.events == {"troupe_kv_events_gaps_total": 0.0}


def test_a_repetition_whose_processes_do_not_start_is_dropped_whole(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def measure_once(scenario: object, cluster: object, previous: list[object]) -> ModeRun:
        calls.append(cluster.mode.name)  # type: ignore[attr-defined]
        if len(calls) == 4:  # the second repetition's second mode
            raise ClusterError("frontend: a process exited (...): NameError: boom")
        return _mode([10.0], 1.0, 0.5)

    monkeypatch.setattr(_kv_routing, "_measure_once", measure_once)
    ctx = BenchContext(quick=True, repetitions=3, scratch=tmp_path)

    results, failure = _kv_routing._measure(ctx, prefix_scenario(quick=True), reps=3)

    assert calls == [REFERENCE, "kv", REFERENCE, "kv"]
    assert {mode: len(runs) for mode, runs in results.items()} == {REFERENCE: 1, "kv": 1}
    assert (
        failure == "run 2 of 3 did not run (kv: frontend: a process exited (...): NameError: boom)"
    )
