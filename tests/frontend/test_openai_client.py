"""The official ``openai`` client against the frontend: chat and completions, streamed or not."""

from __future__ import annotations

import time

import openai
import pytest

from troupe.demo.mocker import VOCABULARY, make_generate
from troupe.frontend import Frontend

from .conftest import Workers, wait_for_model

FAST = make_generate(tokens_per_second=2000, time_to_first_token=0.0, output_tokens=8)
EXPECTED = " ".join(VOCABULARY[:8])


@pytest.fixture
async def client(frontend: Frontend, workers: Workers) -> openai.AsyncOpenAI:
    await workers.serve("demo.mocker.generate", FAST, model="mock")
    await wait_for_model(frontend, "mock")
    return openai.AsyncOpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0)


async def test_chat_completion_streams(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="mock",
        messages=[{"role": "user", "content": "hello there"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finish, usage, roles = [], [], None, []
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                texts.append(choice.delta.content)
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert "".join(texts) == EXPECTED
    assert len(texts) == 8  # one chunk per token
    assert roles == ["assistant"]
    assert finish == ["stop"]
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 8, 11)


async def test_chat_completion_non_streaming(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="mock",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "say something"}]},
        ],
        max_tokens=5,
    )
    assert reply.object == "chat.completion"
    assert reply.model == "mock"
    assert reply.id.startswith("chatcmpl-")
    [choice] = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == " ".join(VOCABULARY[:5])
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    # "system: be brief\nuser: say something" is 6 words
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (6, 5)
    assert reply.system_fingerprint is not None
    assert reply.system_fingerprint.startswith("mocker-")


async def test_completion_streams(client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(
        model="mock", prompt="one two three four", max_tokens=3, stream=True
    )
    texts, finish = [], []
    async for chunk in stream:
        for choice in chunk.choices:
            texts.append(choice.text)
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert "".join(texts) == " ".join(VOCABULARY[:3])
    assert finish == ["length"]


async def test_completion_non_streaming(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(model="mock", prompt="one two three four")
    assert reply.object == "text_completion"
    [choice] = reply.choices
    assert choice.text == EXPECTED  # 8 tokens < the default max_tokens of 16
    assert choice.finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 8)


async def test_models_list_and_unknown_model(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["mock"]
    assert models.data[0].owned_by == "troupe"
    assert (await client.models.retrieve("mock")).id == "mock"
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.status_code == 404
    assert err.value.code == "model_not_found"


async def test_models_follow_workers_joining_and_leaving(
    frontend: Frontend, workers: Workers, client: openai.AsyncOpenAI
) -> None:
    started = time.monotonic()
    second = await workers.serve("other.engine.generate", FAST, model="second")
    serving = time.monotonic()
    deadline = serving + 1.0
    while "second" not in [m.id for m in (await client.models.list()).data]:
        assert time.monotonic() < deadline, "second model not listed within 1 s of its worker"
    reply = await client.completions.create(model="second", prompt="hi", max_tokens=2)
    assert reply.choices[0].text == " ".join(VOCABULARY[:2])
    await workers.stop(second)  # clean stop: unregisters at once
    deadline = time.monotonic() + 1.0
    while "second" in [m.id for m in (await client.models.list()).data]:
        assert time.monotonic() < deadline, "second model still listed 1 s after a clean stop"
    assert [m.id for m in (await client.models.list()).data] == ["mock"]
    assert started <= serving
