"""The mock engine's timing model and KV events: prefill charged for uncached tokens only, one
prefill at a time, prefills stalling decodes, admission limits, the sink, the metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from troupe.demo.mocker import KvEventSink, Mocker, MockerConfig
from troupe.errors import ConfigError, InvalidRequest
from troupe.events import EventScope, MemoryEventPlane
from troupe.frontend import WordTokenizer
from troupe.kv import KvPublisher, block_hashes
from troupe.testing import eventually_async
from troupe.transports import RequestContext

BS = 16


class Clock:
    """A manual clock: the engine computes its times from it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RecordingSink:
    """A KV event sink that keeps the events and the state they describe."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.blocks: set[int] = set()

    def stored(self, block_hashes: list[int], parent_hash: int | None) -> None:
        assert parent_hash is None or parent_hash in self.blocks
        self.events.append(("stored", (block_hashes, parent_hash)))
        self.blocks.update(block_hashes)

    def removed(self, block_hashes: list[int]) -> None:
        assert set(block_hashes) <= self.blocks
        self.events.append(("removed", block_hashes))
        self.blocks.difference_update(block_hashes)

    def cleared(self) -> None:
        self.events.append(("cleared", None))
        self.blocks.clear()


def prompt(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def config(**changes: Any) -> MockerConfig:
    base: dict[str, Any] = {
        "prefill_tokens_per_second": 1000.0,
        "tokens_per_second": 100.0,
        "time_to_first_token": 0.0,
        "block_size": BS,
        "num_gpu_blocks": 64,
    }
    return MockerConfig(**(base | changes))


def ctx() -> RequestContext:
    return RequestContext(1, "demo.mocker.generate")


async def run(mocker: Mocker, request: dict[str, Any]) -> list[dict[str, Any]]:
    return [chunk async for chunk in mocker.generate(request, ctx())]


# --- timing, on a manual clock ---------------------------------------------------------------


def test_prefill_is_charged_for_uncached_tokens_only() -> None:
    clock = Clock()
    mocker = Mocker(config(), clock=clock)
    engine = mocker.engine
    cold = engine.try_admit(prompt(512))
    assert cold is not None
    assert cold.prefill_seconds == pytest.approx(0.512)
    engine.release(cold)

    clock.now = 200.0
    warm = engine.try_admit(prompt(512) + prompt(16, start=5000))  # the same prefix + 16 new
    assert warm is not None
    assert warm.admission.cached_tokens == 512
    assert warm.prefill_seconds == pytest.approx(0.016)
    warm_wait = engine.first_token_at(warm, 0.0) - 200.0
    assert warm_wait < (engine.first_token_at(cold, 0.0) - 100.0) / 10


def test_time_to_first_token_is_added_after_the_prefill_and_everything_scales() -> None:
    clock = Clock()
    engine = Mocker(config(speedup_ratio=4.0), clock=clock).engine
    ticket = engine.try_admit(prompt(400))
    assert ticket is not None
    assert ticket.prefill_seconds == pytest.approx(0.1)  # 400 tokens at 1000/s, 4x faster
    assert engine.first_token_at(ticket, 0.2) == pytest.approx(100.0 + 0.1 + 0.05)
    assert engine.next_token_at(200.0, 100.0) == pytest.approx(200.0 + 0.01 / 4)


def test_prefills_run_one_at_a_time_in_admission_order() -> None:
    engine = Mocker(config(), clock=Clock()).engine
    first = engine.try_admit(prompt(100))
    second = engine.try_admit(prompt(300, start=1000))
    assert first is not None
    assert second is not None
    assert second.prefill_start == pytest.approx(first.prefill_end)
    assert second.prefill_end == pytest.approx(100.0 + 0.1 + 0.3)


def test_a_prefill_delays_the_tokens_of_decoding_requests() -> None:
    clock = Clock()
    engine = Mocker(config(), clock=clock).engine
    decoding = engine.try_admit(prompt(16))
    assert decoding is not None
    last = engine.first_token_at(decoding, 0.0)
    assert engine.next_token_at(last, 100.0) == pytest.approx(last + 0.01)  # nothing in the way

    clock.now = last + 0.005
    arriving = engine.try_admit(prompt(50, start=1000))  # prefill of 50 ms starts now
    assert arriving is not None
    assert arriving.prefill_start == pytest.approx(last + 0.005)
    # the decoding request's next token waits out the whole prefill
    assert engine.next_token_at(last, 100.0) == pytest.approx(last + 0.01 + 0.05)
    queued = engine.try_admit(prompt(30, start=2000))  # queued behind it on the prefill lane
    assert queued is not None
    assert queued.prefill_start == pytest.approx(arriving.prefill_end)
    assert engine.next_token_at(last, 100.0) == pytest.approx(last + 0.01 + 0.05 + 0.03)
    # a request whose decode starts after the prefill is not delayed by it
    after = arriving.prefill_end + 1.0
    assert engine.next_token_at(after, 100.0) == pytest.approx(after + 0.01)


def test_max_num_seqs_and_a_full_cache_hold_requests_back() -> None:
    engine = Mocker(config(max_num_seqs=2, num_gpu_blocks=4), clock=Clock()).engine
    a = engine.try_admit(prompt(16))
    b = engine.try_admit(prompt(16, start=100))
    assert a is not None
    assert b is not None
    assert engine.try_admit(prompt(16, start=200)) is None  # two running already
    engine.release(a)
    assert engine.try_admit(prompt(64, start=300)) is None  # b's block is in use: 3 free
    c = engine.try_admit(prompt(48, start=300))
    assert c is not None
    assert engine.stats().running == 2


# --- the handler -----------------------------------------------------------------------------


async def test_a_request_waits_for_admission_and_can_be_stopped_while_waiting() -> None:
    mocker = Mocker(config(max_num_seqs=1, tokens_per_second=1000.0, time_to_first_token=0.0))
    engine = mocker.engine
    holder = engine.try_admit(prompt(16))
    assert holder is not None
    request = {"token_ids": prompt(16, start=100), "max_tokens": 2}

    queued = asyncio.create_task(run(mocker, request))
    await eventually_async(lambda: engine.stats().waiting == 1, what="a request waiting")
    engine.release(holder)  # the line moves: the queued request runs to the end
    chunks = await asyncio.wait_for(queued, 5)
    assert [c["text"] for c in chunks] == ["troupe", " streams"]
    assert engine.stats().running == engine.stats().waiting == 0

    holder = engine.try_admit(prompt(16))
    assert holder is not None
    stopped = ctx()
    gen = mocker.generate(request, stopped)
    waiting = asyncio.create_task(anext_or_none(gen))
    await eventually_async(lambda: engine.stats().waiting == 1, what="a request waiting")
    stopped.stop("cancelled")
    assert await asyncio.wait_for(waiting, 5) is None  # it ends without a token
    assert engine.stats().waiting == 0
    engine.release(holder)
    assert engine.stats().running == 0
    assert engine.cache.active_blocks == 0


async def test_a_cancelled_waiting_request_leaves_nothing_behind() -> None:
    mocker = Mocker(config(max_num_seqs=1))
    engine = mocker.engine
    holder = engine.try_admit(prompt(16))
    assert holder is not None
    task = asyncio.create_task(run(mocker, {"token_ids": prompt(16, start=100)}))
    await eventually_async(lambda: engine.stats().waiting == 1, what="a request waiting")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.stats().waiting == 0
    engine.release(holder)
    assert (engine.stats().running, engine.cache.active_blocks) == (0, 0)


async def test_a_cached_prefix_brings_the_first_token_sooner() -> None:
    # 992 of 1000 tokens cached the second time: a 0.5 s prefill against a 4 ms one
    mocker = Mocker(config(prefill_tokens_per_second=2000.0, tokens_per_second=10_000.0))
    request = {"token_ids": prompt(1000), "max_tokens": 1}

    async def time_to_first_token() -> float:
        started = time.monotonic()
        await run(mocker, request)
        return time.monotonic() - started

    cold = await time_to_first_token()
    warm = await time_to_first_token()
    assert cold >= 0.5 - 0.01  # sleeps do not end early
    assert warm < cold / 2
    stats = mocker.stats()
    assert (stats.prompt_tokens, stats.cached_prompt_tokens) == (2000, 992)


async def test_requests_without_token_ids_are_tokenized_like_the_frontend_does() -> None:
    sink = RecordingSink()
    mocker = Mocker(config(block_size=2), sink=sink)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chunks = await run(mocker, {"kind": "chat", "messages": messages, "max_tokens": 1})
    assert chunks[0]["prompt_tokens"] == 5  # "system: be brief" + "user: hi"
    ids = WordTokenizer().encode("system: be brief\nuser: hi")
    expected = block_hashes(ids, 2)
    assert sink.events == [("stored", (expected, None))]

    # the same prompt as token ids (what the frontend sends) hits every full block
    chunks = await run(mocker, {"token_ids": ids, "prompt": "ignored", "max_tokens": 1})
    assert chunks[0]["prompt_tokens"] == 5
    assert mocker.stats().cached_prompt_tokens == 4


async def test_events_follow_the_cache_and_clearing_it() -> None:
    sink = RecordingSink()
    mocker = Mocker(config(block_size=4, num_gpu_blocks=4), sink=sink)
    for start in (0, 100, 200):  # each prompt takes 3 blocks of 4: the cache turns over
        await run(mocker, {"token_ids": prompt(12, start=start), "max_tokens": 1})
        assert sink.blocks == mocker.engine.cache.cached()
    kinds = [kind for kind, _ in sink.events]
    assert kinds == ["stored", "removed", "stored", "removed", "stored"]
    mocker.clear_cache()
    assert sink.events[-1] == ("cleared", None)
    assert sink.blocks == mocker.engine.cache.cached() == set()


async def test_a_worker_kv_publisher_is_a_sink() -> None:
    publisher = await KvPublisher.open(
        MemoryEventPlane(), EventScope("demo", "mocker"), "0123456789abcdef", block_size=4
    )
    try:
        sink: KvEventSink = publisher
        mocker = Mocker(config(block_size=4, num_gpu_blocks=4), sink=sink)
        for start in (0, 100, 200):
            await run(mocker, {"token_ids": prompt(12, start=start), "max_tokens": 1})
            assert publisher.indexer.blocks() == mocker.engine.cache.cached()
        assert publisher.last_event_id == 5  # stored, removed, stored, removed, stored
        mocker.clear_cache()
        assert publisher.indexer.blocks() == set()
        await publisher.flush(timeout=5)
        assert (publisher.published, publisher.dropped) == (6, 0)
    finally:
        await publisher.close()


async def test_stats_and_metrics_report_usage_and_hit_rate() -> None:
    mocker = Mocker(config(num_gpu_blocks=10))
    registry = CollectorRegistry()
    registry.register(mocker.collector())
    await run(mocker, {"token_ids": prompt(32), "max_tokens": 1})
    await run(mocker, {"token_ids": prompt(32), "max_tokens": 1})
    stats = mocker.stats()
    assert stats.hit_rate == pytest.approx(0.5)
    assert (stats.requests, stats.cached_blocks, stats.active_blocks) == (2, 2, 0)

    def value(name: str) -> float | None:
        return registry.get_sample_value(name)

    assert value("troupe_mocker_kv_cache_hit_rate") == pytest.approx(0.5)
    assert value("troupe_mocker_prompt_tokens_total") == 64
    assert value("troupe_mocker_cached_prompt_tokens_total") == 32
    assert value("troupe_mocker_kv_total_blocks") == 10
    assert value("troupe_mocker_kv_cache_usage") == 0.0

    engine = mocker.engine
    ticket = engine.try_admit(prompt(40))  # 2 cached blocks + 1 partial, held
    assert ticket is not None
    assert value("troupe_mocker_kv_cache_usage") == pytest.approx(0.3)
    assert value("troupe_mocker_running_requests") == 1
    engine.release(ticket)


@pytest.mark.parametrize(
    "request_",
    [
        {"token_ids": "1 2 3"},
        {"token_ids": [1, -2]},
        {"token_ids": [1, 2**32]},
        {"token_ids": [1, True]},
        {"token_ids": [1.5]},
    ],
)
async def test_bad_token_ids_are_refused(request_: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await run(Mocker(config()), request_)
    assert caught.value.param == "token_ids"


async def test_a_prompt_larger_than_the_cache_is_refused() -> None:
    mocker = Mocker(config(block_size=4, num_gpu_blocks=2))
    with pytest.raises(InvalidRequest, match="prompt has 9 tokens; this engine's KV cache holds 8"):
        await run(mocker, {"token_ids": prompt(9)})


@pytest.mark.parametrize(
    "changes",
    [
        {"block_size": 0},
        {"num_gpu_blocks": 1.5},
        {"max_num_seqs": True},
        {"speedup_ratio": 0},
        {"prefill_tokens_per_second": float("inf")},
        {"time_to_first_token": -1},
        {"tokens_per_second": "fast"},
    ],
)
def test_bad_settings_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(changes))):
        MockerConfig(**changes)


# --- helpers ---------------------------------------------------------------------------------


async def anext_or_none(gen: AsyncIterator[dict[str, Any]]) -> dict[str, Any] | None:
    try:
        return await anext(gen)
    except StopAsyncIteration:
        return None
