"""The mock engine on its own: tokens, rates, max_tokens, stop strings, resume, cancellation."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import troupe.frontend
from troupe import RequestContext
from troupe.demo.mocker import VOCABULARY, generate, make_generate
from troupe.errors import ConfigError, InvalidRequest


def request(**fields: Any) -> dict[str, Any]:
    return {"kind": "completion", "model": "m", "prompt": "one two three"} | fields


async def run(handler: Any, req: dict[str, Any]) -> list[dict[str, Any]]:
    ctx = RequestContext(1, "demo.mocker.generate")
    return [chunk async for chunk in handler(req, ctx)]


FAST = make_generate(tokens_per_second=10_000, time_to_first_token=0.0, output_tokens=6)


async def test_streams_words_with_prompt_tokens_and_finish_reason() -> None:
    chunks = await run(FAST, request())
    assert "".join(c["text"] for c in chunks) == " ".join(VOCABULARY[:6])
    assert chunks[0]["prompt_tokens"] == 3
    assert chunks[0]["fingerprint"].startswith("mocker-")
    assert [c.get("finish_reason") for c in chunks] == [None] * 5 + ["stop"]


async def test_max_tokens_cuts_with_length() -> None:
    chunks = await run(FAST, request(max_tokens=2))
    assert [c["text"] for c in chunks] == [VOCABULARY[0], " " + VOCABULARY[1]]
    assert chunks[-1]["finish_reason"] == "length"


async def test_stop_string_ends_without_the_word() -> None:
    chunks = await run(FAST, request(stop=[VOCABULARY[2]]))
    assert "".join(c["text"] for c in chunks) == " ".join(VOCABULARY[:2])
    assert chunks[-1]["finish_reason"] == "stop"


async def test_stop_string_on_the_first_token_still_counts_the_prompt() -> None:
    chunks = await run(FAST, request(stop=[VOCABULARY[0]]))
    assert chunks == [
        {
            "text": "",
            "tokens": 0,
            "finish_reason": "stop",
            "prompt_tokens": 3,
            "fingerprint": chunks[0]["fingerprint"],
        }
    ]


async def test_chat_requests_count_the_messages_as_the_prompt() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = {"kind": "chat", "model": "m", "messages": messages}
    chunks = await run(FAST, chat)
    assert chunks[0]["prompt_tokens"] == 5  # "system: be brief" + "user: hi"


async def test_resume_skips_what_the_client_has() -> None:
    chunks = await run(FAST, request(resume={"tokens": 4, "text": "..."}))
    assert "".join(c["text"] for c in chunks) == " " + " ".join(VOCABULARY[4:6])
    assert chunks[0]["prompt_tokens"] == 3


async def test_rate_and_time_to_first_token_per_request() -> None:
    ext = {"mocker": {"tokens_per_second": 100, "time_to_first_token": 0.05, "output_tokens": 6}}
    started = time.monotonic()
    chunks = await run(generate, request(ext=ext))
    elapsed = time.monotonic() - started
    assert len(chunks) == 6
    assert elapsed >= 0.05 + 5 / 100 - 0.005  # ttft, then 5 gaps of 10 ms


async def test_stops_promptly_when_the_request_is_stopped() -> None:
    slow = make_generate(tokens_per_second=2, time_to_first_token=0.0, output_tokens=100)
    ctx = RequestContext(1, "demo.mocker.generate")
    chunks = []
    first = asyncio.Event()

    async def consume() -> None:
        async for chunk in slow(request(), ctx):
            chunks.append(chunk)
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 1)  # the first token is out; the next is 0.5 s away
    stopped = time.monotonic()
    ctx.stop("cancelled")
    await asyncio.wait_for(task, 1)
    assert time.monotonic() - stopped < 0.1  # not the 0.5 s pause between tokens
    assert len(chunks) == 1


@pytest.mark.parametrize(
    "req",
    [
        {"prompt": 5},
        {"kind": "chat", "messages": [{"role": "user"}]},
        {"kind": "chat", "messages": "hi"},
        "text",
        request(max_tokens=0),
        request(ext={"mocker": {"tokens_per_second": 0}}),
        request(ext={"mocker": {"time_to_first_token": "slow"}}),
        request(ext={"mocker": {"time_to_first_token": float("inf")}}),
        request(ext={"mocker": {"tokens_per_second": float("nan")}}),
    ],
)
async def test_bad_requests_are_refused(req: Any) -> None:
    with pytest.raises(InvalidRequest):
        await run(FAST, req)


def test_bad_factory_settings() -> None:
    with pytest.raises(ConfigError, match="tokens_per_second"):
        make_generate(tokens_per_second=0)


def test_frontend_exports() -> None:
    assert set(troupe.frontend.__all__) == {
        "Frontend",
        "FrontendMetrics",
        "FrontendSettings",
        "FrontendTls",
        "ModelEntry",
        "ModelRegistry",
        "ModelTable",
        "ROUTER_MODES",
        "Tokenizer",
        "WordTokenizer",
    }
