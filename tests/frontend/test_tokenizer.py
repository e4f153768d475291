"""Prompts become token ids: the built-in tokenizer is the same in every process, the frontend
sends the ids with each request, a plugged-in tokenizer replaces it, the mocker uses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from troupe.demo.mocker import make_generate
from troupe.discovery import MemoryKvServer
from troupe.errors import ConfigError, InvalidRequest
from troupe.frontend import FrontendSettings, Tokenizer, WordTokenizer
from troupe.frontend._tokenizer import VOCAB_SIZE, prompt_text
from troupe.transports import RequestContext

from .conftest import Workers, running_frontend, wait_for_model

TEXT = "Hello world!  The KV cache: naïve café 日本語 \U0001f600 hello Hello"


def test_one_token_per_word_with_stable_ids() -> None:
    ids = WordTokenizer().encode(TEXT)
    assert len(ids) == len(TEXT.split())
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert ids[0] == ids[-1] != ids[-2]  # a word is a token, case and all
    assert WordTokenizer().encode(" \n".join(TEXT.split())) == ids  # whitespace is not a token
    assert WordTokenizer().encode("") == []
    assert WordTokenizer().encode("lone \ud800 surrogate")[1] >= 0  # JSON may carry one
    assert max(WordTokenizer(vocab_size=7).encode(TEXT)) < 7
    assert isinstance(WordTokenizer(), Tokenizer)
    with pytest.raises(ValueError, match="vocab_size"):
        WordTokenizer(vocab_size=0)


def test_the_same_text_gives_the_same_ids_in_every_process() -> None:
    script = (
        "import json, sys; from troupe.frontend import WordTokenizer; "
        "print(json.dumps(WordTokenizer().encode(sys.argv[1])))"
    )
    outputs = set()
    for hash_seed in ("1", "2", "random"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        result = subprocess.run(
            [sys.executable, "-c", script, TEXT],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=True,
        )
        outputs.add(result.stdout)
    assert len(outputs) == 1
    assert json.loads(outputs.pop()) == WordTokenizer().encode(TEXT)


def test_prompt_text_renders_chat_as_role_lines() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert prompt_text({"messages": messages}) == "system: be brief\nuser: hi"
    assert prompt_text({"prompt": "once upon", "messages": messages}) == "once upon"
    for bad in ({}, {"prompt": 3}, {"messages": [{"role": "user"}]}, {"messages": "hi"}):
        with pytest.raises(InvalidRequest):
            prompt_text(bad)


def test_a_tokenizer_setting_without_encode_is_refused() -> None:
    with pytest.raises(ConfigError, match="tokenizer"):
        FrontendSettings(tokenizer=object())  # type: ignore[arg-type]


class Recorder:
    """A handler that keeps the requests it receives."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        self.requests.append(request)
        yield {"text": "ok", "prompt_tokens": len(request["token_ids"])}


class Letters:
    """A plugged-in tokenizer: one id per character."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


@pytest.mark.parametrize("tokenizer", [None, Letters()])
async def test_the_frontend_sends_the_prompt_token_ids(
    kv: MemoryKvServer,
    settings: FrontendSettings,
    workers: Workers,
    tokenizer: Tokenizer | None,
) -> None:
    recorder = Recorder()
    await workers.serve("demo.recorder.generate", recorder, model="rec")
    encode = (tokenizer or WordTokenizer()).encode
    async with running_frontend(kv, settings, tokenizer=tokenizer) as fe:
        await wait_for_model(fe, "rec")
        async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
            chat = await http.post("/v1/chat/completions", json={"model": "rec", "messages": CHAT})
            completion = await http.post(
                "/v1/completions", json={"model": "rec", "prompt": "once upon a time"}
            )
    assert chat.status_code == completion.status_code == 200, chat.text + completion.text
    chat_request, completion_request = recorder.requests
    assert chat_request["token_ids"] == encode("system: be brief\nuser: hi there")
    assert chat_request["messages"] == CHAT  # the text still travels
    assert completion_request["token_ids"] == encode("once upon a time")
    assert completion.json()["usage"]["prompt_tokens"] == len(encode("once upon a time"))


async def test_the_mocker_counts_the_frontend_token_ids(
    kv: MemoryKvServer, settings: FrontendSettings, workers: Workers
) -> None:
    mocker = make_generate(tokens_per_second=5000, time_to_first_token=0.0, output_tokens=2)
    await workers.serve("demo.mocker.generate", mocker, model="mock")
    async with running_frontend(kv, settings, tokenizer=Letters()) as fe:
        await wait_for_model(fe, "mock")
        async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
            reply = await http.post("/v1/completions", json={"model": "mock", "prompt": "a b c"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] == 5  # letters and spaces, not 3 words
