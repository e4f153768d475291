"""The frontend over raw HTTP (httpx): SSE framing and every error status.

Health, metrics, cancellation and load are in ``test_http_serving.py``; the body limit, binding
and start/close races in ``test_http_server.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from troupe import RequestContext
from troupe.demo.mocker import VOCABULARY, make_generate
from troupe.errors import (
    ConfigError,
    MessageTooLarge,
    NoInstances,
    Overloaded,
    RemoteError,
    StreamBroken,
)
from troupe.frontend import Frontend, FrontendSettings
from troupe.frontend import _app as frontend_app
from troupe.frontend._app import error_reply, error_status
from troupe.frontend._openai import decode_chat, decode_completion, engine_request
from troupe.messages import encode_payload
from troupe.testing import eventually_async

from ._http import CHAT, FAST, HELLO, assert_openai_error, events
from .conftest import Workers, wait_for_model

# --- the SSE format ------------------------------------------------------------------------------


@pytest.mark.usefixtures("mock")
async def test_chat_stream_is_server_sent_events(http: httpx.AsyncClient) -> None:
    body = {"model": "mock", "messages": HELLO, "stream": True, "max_tokens": 3}
    response = await http.post(CHAT, json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = events(response.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:]]
    assert "".join(contents) == " ".join(VOCABULARY[:3])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "usage" not in chunks[-1]  # only with stream_options.include_usage


@pytest.mark.usefixtures("mock")
async def test_completion_stream_with_usage(http: httpx.AsyncClient) -> None:
    body = {
        "model": "mock",
        "prompt": "a b c",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await http.post("/v1/completions", json=body)
    data = events(response.text)
    assert data[-1] == "[DONE]"
    last = json.loads(data[-2])
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    texts = [json.loads(d)["choices"][0]["text"] for d in data[:-2]]
    assert "".join(texts) == " ".join(VOCABULARY[:8])


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("mock")
@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'{"messages": []}', "model"),
        (b'{"model": "mock"}', "messages"),
        (b'{"model": "mock", "messages": "hi"}', "messages"),
        (b'{"model": "mock", "messages": []}', "messages"),
        (b'{"model": "mock", "messages": [{"content": "hi"}]}', "messages[0].role"),
        (b'{"model": "mock", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (
            b'{"model": "mock", "messages": [{"role": "wizard", "content": "x"}]}',
            "messages[0].role",
        ),
        (b'{"model": "mock", "messages": [{"role": "user"}], "max_tokens": 0}', "max_tokens"),
        (b'{"model": "mock", "messages": [{"role": "user"}], "max_tokens": 1.5}', "max_tokens"),
        (b'{"model": "mock", "messages": [{"role": "user"}], "stream": "yes"}', "stream"),
        (b'{"model": "mock", "messages": [{"role": "user"}], "temperature": 3}', "temperature"),
        (b'{"model": "mock", "messages": [{"role": "user"}], "n": 2}', "n"),
        (b'{"model": 7, "messages": [{"role": "user"}]}', "model"),
        # integers the engine protocol (msgpack) could not carry
        (
            b'{"model": "mock", "messages": [{"role": "user"}], "max_tokens": 1' + b"0" * 30 + b"}",
            "max_tokens",
        ),
        (
            b'{"model": "mock", "messages": [{"role": "user"}], "max_completion_tokens": '
            b"9223372036854775808}",
            "max_completion_tokens",
        ),
        (
            b'{"model": "mock", "messages": [{"role": "user"}], "seed": 18446744073709551616}',
            "seed",
        ),
        (
            b'{"model": "mock", "messages": [{"role": "user"}], '
            b'"stream_options": {"include_usage": true}}',
            "stream_options",
        ),
    ],
)
async def test_malformed_chat_requests_are_400_naming_the_field(
    http: httpx.AsyncClient, body: bytes, param: str | None
) -> None:
    response = await http.post(CHAT, content=body, headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.usefixtures("mock")
@pytest.mark.parametrize("value", [10**30, -(2**64)])
async def test_ext_the_engine_protocol_cannot_carry_is_400(
    http: httpx.AsyncClient, value: int
) -> None:
    body = {"model": "mock", "messages": HELLO, "ext": {"deep": [{"x": value}]}}
    response = await http.post(CHAT, json=body)
    assert_openai_error(response, 400, param="ext")


@pytest.mark.usefixtures("mock")
async def test_the_handler_checks_ext_only_and_leaves_the_prompt_to_the_router(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[Any] = []

    def spy(obj: Any) -> bytes:
        checked.append(obj)
        return encode_payload(obj)

    monkeypatch.setattr(frontend_app, "encode_payload", spy)
    ext = {"mocker": {"output_tokens": 2}}
    body = {"model": "mock", "prompt": "word " * 10_000, "max_tokens": 2, "ext": ext}
    response = await http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert checked == [ext]  # the 50 kB prompt was not encoded on the frontend's loop


@pytest.mark.usefixtures("mock")
@pytest.mark.parametrize("stream", [False, True])
async def test_engine_refusing_the_request_is_400_naming_the_field(
    http: httpx.AsyncClient, stream: bool
) -> None:
    # the mocker validates ext.mocker and raises InvalidRequest: a RemoteError on our side
    body = {"model": "mock", "prompt": "x", "stream": stream}
    body["ext"] = {"mocker": {"tokens_per_second": 0}}
    response = await http.post("/v1/completions", json=body)
    error = assert_openai_error(
        response, 400, param="ext.mocker.tokens_per_second", code="invalid_request"
    )
    assert error["type"] == "invalid_request_error"
    assert error["message"] == "tokens_per_second must be a finite number > 0"


@pytest.mark.usefixtures("mock")
async def test_malformed_completion_request(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/completions", json={"model": "mock", "prompt": ["a", "b"]})
    assert_openai_error(response, 400, param="prompt")
    response = await http.post("/v1/completions", json={"model": "mock", "prompt": 12})
    assert_openai_error(response, 400, param="prompt")


@pytest.mark.usefixtures("mock")
@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model_is_404(http: httpx.AsyncClient, stream: bool) -> None:
    body = {"model": "nope", "messages": HELLO, "stream": stream}
    response = await http.post(CHAT, json=body)
    error = assert_openai_error(response, 404, param="model", code="model_not_found")
    assert "nope" in error["message"]


async def test_unknown_route_and_method_are_json(http: httpx.AsyncClient) -> None:
    assert (await http.get("/v2/nothing")).status_code == 404
    assert (await http.get("/v2/nothing")).json()["error"]["message"]
    assert (await http.get(CHAT)).status_code == 405


async def test_model_without_reachable_instances_is_503(
    frontend: Frontend, workers: Workers, http: httpx.AsyncClient
) -> None:
    # A record that declares a model but has no address any client can use: the registry
    # lists the model, the router never gets an instance.
    rt = await workers.serve("demo.mocker.generate", FAST, model="mock")
    await asyncio.to_thread(
        rt.register, "ghost", "engine", "generate", {"carrier-pigeon": "coo"}, {"model": "ghost"}
    )
    await wait_for_model(frontend, "ghost")
    for stream in (False, True):
        body = {"model": "ghost", "messages": HELLO, "stream": stream}
        response = await http.post(CHAT, json=body)
        assert_openai_error(response, 503, code="no_instances")


async def test_overloaded_worker_is_503(
    frontend: Frontend, workers: Workers, http: httpx.AsyncClient
) -> None:
    slow = make_generate(tokens_per_second=20, time_to_first_token=0.0, output_tokens=100)
    rt = await workers.serve("demo.mocker.generate", slow, model="mock", max_inflight=1)
    await wait_for_model(frontend, "mock")
    body = {"model": "mock", "messages": HELLO, "stream": True}
    async with http.stream("POST", CHAT, json=body) as first:
        lines = first.aiter_lines()
        assert (await anext(lines)).startswith("data: ")  # the first request holds the slot
        response = await http.post(CHAT, json={"model": "mock", "messages": HELLO})
        assert_openai_error(response, 503, code="overloaded")
    # closing the stream cancelled the first request on the worker
    labels = {"namespace": "demo", "component": "mocker", "endpoint": "generate"}
    await eventually_async(
        lambda: rt.metrics.registry.get_sample_value("troupe_inflight_requests", labels) == 0
    )


async def failing(request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
    if request["prompt"].endswith("late"):
        yield {"text": "one", "prompt_tokens": 1}
    raise ValueError("the engine broke")


async def bad_chunks(request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
    yield ["not", "a", "chunk"]


async def test_worker_failure_is_502(
    frontend: Frontend, workers: Workers, http: httpx.AsyncClient
) -> None:
    await workers.serve("broken.engine.generate", failing, model="broken")
    await wait_for_model(frontend, "broken")
    response = await http.post("/v1/completions", json={"model": "broken", "prompt": "x"})
    error = assert_openai_error(response, 502, code="worker_error")
    assert error["message"] == "the worker failed to answer"  # the remote detail is only logged
    # before the first chunk, a streaming request still gets the status code
    body = {"model": "broken", "prompt": "x", "stream": True}
    response = await http.post("/v1/completions", json=body)
    assert_openai_error(response, 502, code="worker_error")


async def test_failure_after_the_stream_started_is_a_last_error_event(
    frontend: Frontend, workers: Workers, http: httpx.AsyncClient
) -> None:
    await workers.serve("broken.engine.generate", failing, model="broken")
    await wait_for_model(frontend, "broken")
    body = {"model": "broken", "prompt": "late", "stream": True}
    response = await http.post("/v1/completions", json=body)
    assert response.status_code == 200
    data = events(response.text)
    assert data[-1] == "[DONE]"
    assert json.loads(data[0])["choices"][0]["text"] == "one"
    error = json.loads(data[-2])["error"]
    assert error["code"] == "worker_error"
    assert "the engine broke" not in error["message"]


async def test_unreachable_worker_is_502(
    frontend: Frontend, workers: Workers, http: httpx.AsyncClient
) -> None:
    rt = await workers.serve("demo.mocker.generate", FAST, model="mock")
    # nothing listens there: the connect fails (connect_timeout 0.5 s)
    await asyncio.to_thread(
        rt.register, "dead", "engine", "generate", {"tcp": "tcp://127.0.0.1:9"}, {"model": "dead"}
    )
    await wait_for_model(frontend, "dead")
    response = await http.post("/v1/completions", json={"model": "dead", "prompt": "x"})
    assert_openai_error(response, 502, code="worker_error")


async def test_malformed_engine_chunk_is_502(
    frontend: Frontend, workers: Workers, http: httpx.AsyncClient
) -> None:
    await workers.serve("bad.engine.generate", bad_chunks, model="bad")
    await wait_for_model(frontend, "bad")
    response = await http.post("/v1/completions", json={"model": "bad", "prompt": "x"})
    assert_openai_error(response, 502)


# --- error replies and requests, without a server ------------------------------------------------


def test_error_status_table() -> None:
    assert error_status(Overloaded("x"))[:2] == (503, "service_unavailable_error")
    assert error_status(NoInstances("a.b.c"))[0] == 503
    assert error_status(StreamBroken("gone"))[0] == 502
    assert error_status(RemoteError("ValueError", "boom"))[0] == 502


@pytest.mark.parametrize(
    ("field", "value"),
    [("port", 70000), ("router_mode", "fastest"), ("migration_limit", -1), ("grace", -1.0)],
)
def test_settings_are_validated(field: str, value: Any) -> None:
    with pytest.raises(ConfigError):
        FrontendSettings(**{field: value})


def test_error_replies_are_safe_and_typed() -> None:
    invalid = RemoteError("InvalidRequest", "invalid request: x must be > 0 (field ext.engine.x)")
    reply = error_reply(invalid)
    assert (reply.status, reply.kind, reply.param) == (400, "invalid_request_error", "ext.engine.x")
    assert reply.message == "x must be > 0"
    leaky = RemoteError("KeyError", "'secret' at /srv/engine.py:10", address="tcp://10.1.2.3:5")
    reply = error_reply(leaky)
    assert (reply.status, reply.code) == (502, "worker_error")
    assert "secret" not in reply.message
    assert "10.1.2.3" not in error_reply(StreamBroken("gone", address="tcp://10.1.2.3:5")).message
    too_large = error_reply(MessageTooLarge(40_000_000, 33_554_432, address="tcp://x:1"))
    assert (too_large.status, too_large.code) == (413, "request_too_large")


def test_the_engine_request_carries_the_text_once() -> None:
    chat = engine_request(
        decode_chat(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    )
    assert "prompt" not in chat
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    completion = engine_request(decode_completion(b'{"model": "m", "prompt": "hi"}'))
    assert "messages" not in completion
    assert completion["prompt"] == "hi"
