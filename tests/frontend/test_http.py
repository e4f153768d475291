"""The frontend over raw HTTP (httpx): SSE framing, every error status, health, metrics,
cancellation on disconnect, and many concurrent streams."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest

from troupe import Runtime
from troupe.demo.mocker import VOCABULARY, make_generate
from troupe.discovery import MemoryKvServer
from troupe.errors import (
    ConfigError,
    MessageTooLarge,
    NoInstances,
    Overloaded,
    RemoteError,
    StreamBroken,
    TroupeError,
)
from troupe.frontend import Frontend, FrontendSettings
from troupe.frontend import _app as frontend_app
from troupe.frontend._app import error_reply, error_status
from troupe.frontend._openai import decode_chat, decode_completion, engine_request
from troupe.messages import decode_record, encode_record
from troupe.messages._payload import encode_payload
from troupe.testing import eventually_async
from troupe.transports import RequestContext

from .conftest import CONFIG, Workers, running_frontend, wait_for_model

FAST = make_generate(tokens_per_second=5000, time_to_first_token=0.0, output_tokens=8)
CHAT = "/v1/chat/completions"
CHAT_LABEL = "chat_completions"
HELLO = [{"role": "user", "content": "hello"}]


def events(body: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the framing on the way."""
    assert body.endswith("\n\n")
    out = []
    for block in body.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        out.append(block.removeprefix("data: "))
    return out


@pytest.fixture
async def mock(frontend: Frontend, workers: Workers) -> None:
    await workers.serve("demo.mocker.generate", FAST, model="mock")
    await wait_for_model(frontend, "mock")


def assert_openai_error(
    response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert "Traceback" not in error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


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


# --- health, liveness, draining, metrics ---------------------------------------------------------


@pytest.mark.usefixtures("mock")
async def test_health_live_and_draining(frontend: Frontend, http: httpx.AsyncClient) -> None:
    health = await http.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "healthy", "models": ["mock"]}
    assert (await http.get("/live")).json() == {"status": "live"}
    assert await frontend.drain(0)
    assert (await http.get("/health")).status_code == 503
    assert (await http.get("/live")).status_code == 200
    response = await http.post(CHAT, json={"model": "mock", "messages": HELLO})
    assert_openai_error(response, 503, code="shutting_down")


def sample(frontend: Frontend, name: str, **labels: str) -> float:
    value = frontend.rt.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.mark.usefixtures("mock")
async def test_metrics(frontend: Frontend, http: httpx.AsyncClient) -> None:
    await http.post(CHAT, json={"model": "mock", "messages": HELLO, "stream": True})
    await http.post("/v1/completions", json={"model": "mock", "prompt": "a b"})
    await http.post(CHAT, json={"model": "nope", "messages": HELLO})
    text = (await http.get("/metrics")).text
    assert "troupe_frontend_requests_total" in text
    assert "troupe_frontend_time_to_first_token_seconds_bucket" in text
    m = "troupe_frontend_requests_total"
    assert (
        sample(
            frontend,
            m,
            model="mock",
            endpoint="chat_completions",
            request_type="stream",
            status="success",
        )
        == 1
    )
    assert (
        sample(
            frontend,
            m,
            model="mock",
            endpoint="completions",
            request_type="unary",
            status="success",
        )
        == 1
    )
    assert (
        sample(
            frontend,
            "troupe_frontend_errors_total",
            model="",
            endpoint="chat_completions",
            code="404",
        )
        == 1
    )
    assert sample(frontend, "troupe_frontend_time_to_first_token_seconds_count", model="mock") == 2
    assert sample(frontend, "troupe_frontend_inter_token_latency_seconds_count", model="mock") == 14
    assert sample(frontend, "troupe_frontend_output_sequence_tokens_sum", model="mock") == 16
    assert sample(frontend, "troupe_frontend_input_sequence_tokens_sum", model="mock") == 4
    assert sample(frontend, "troupe_frontend_inflight_requests", model="mock") == 0


# --- cancellation --------------------------------------------------------------------------------


class Recorder:
    """A slow engine that records when it started, and when and whether stopped it ended."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()
        self.ended_at = 0.0
        self.saw_stop = False

    async def __call__(self, request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        try:
            for index in range(1000):
                yield {"text": f" t{index}", "prompt_tokens": 1}
                self.started.set()  # the first chunk is on its way to the frontend
                await asyncio.sleep(0.01)
        finally:
            self.saw_stop = ctx.is_stopped()
            self.ended_at = time.monotonic()
            self.ended.set()


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_stops_the_worker(
    frontend: Frontend, workers: Workers, stream: bool
) -> None:
    recorder = Recorder()

    async def handler(request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        async for chunk in recorder(request, ctx):
            yield chunk

    await workers.serve("slow.engine.generate", handler, model="slow")
    await wait_for_model(frontend, "slow")
    body = {"model": "slow", "messages": HELLO, "stream": stream}
    async with httpx.AsyncClient(base_url=frontend.url, timeout=10) as http:
        if stream:
            async with http.stream("POST", CHAT, json=body) as response:
                lines = response.aiter_lines()
                seen = 0
                while seen < 3:
                    if (await anext(lines)).startswith("data: "):
                        seen += 1
                gone = time.monotonic()
                # leaving the block closes the connection mid-stream
        else:
            task = asyncio.create_task(http.post(CHAT, json=body))
            # the worker is generating (no chunk reaches the client: it is not streamed)
            assert await asyncio.to_thread(recorder.started.wait, 5)
            task.cancel()
            gone = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert await asyncio.to_thread(recorder.ended.wait, 5)
    assert recorder.saw_stop
    assert recorder.ended_at - gone < 0.2, f"worker stopped {recorder.ended_at - gone:.3f} s late"
    await _eventually_counted(frontend, "stream" if stream else "unary")


async def _eventually_counted(frontend: Frontend, request_type: str) -> None:
    labels = {"model": "slow", "endpoint": "chat_completions", "request_type": request_type}
    await eventually_async(
        lambda: sample(frontend, "troupe_frontend_cancellation_total", **labels) == 1,
        what="cancellation counted",
    )


# --- load ----------------------------------------------------------------------------------------


async def test_hundred_concurrent_streams_over_two_workers(
    frontend: Frontend, workers: Workers, http: httpx.AsyncClient
) -> None:
    first = await workers.serve("demo.mocker.generate", FAST, model="mock")
    second = await workers.serve("demo.mocker.generate", FAST, model="mock")
    await wait_for_model(frontend, "mock")
    router = frontend.registry.router(frontend.registry.get("mock"))  # type: ignore[arg-type]
    await eventually_async(lambda: len(router.instance_ids()) == 2)

    async def one(n: int) -> str:
        body = {"model": "mock", "messages": HELLO, "stream": True, "max_tokens": 4}
        response = await http.post(CHAT, json=body)
        assert response.status_code == 200
        data = events(response.text)
        assert data[-1] == "[DONE]"
        return "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1])

    texts = await asyncio.gather(*(one(n) for n in range(100)))
    assert texts == [" ".join(VOCABULARY[:4])] * 100
    served = [
        rt.metrics.registry.get_sample_value(
            "troupe_requests_total",
            {"namespace": "demo", "component": "mocker", "endpoint": "generate"},
        )
        for rt in (first, second)
    ]
    assert served == [50, 50]  # round robin over both workers


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


# --- limits --------------------------------------------------------------------------------------


async def raw_exchange(frontend: Frontend, data: bytes) -> tuple[int, dict[str, Any]]:
    """Send raw bytes (an unfinished upload) and read one HTTP/1.1 response: status and JSON."""
    reader, writer = await asyncio.open_connection("127.0.0.1", frontend.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            status = int(lines[0].split()[1])
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
            body = await reader.readexactly(int(headers["content-length"]))
        return status, json.loads(body)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def upload_head(extra: str) -> bytes:
    return (
        f"POST {CHAT} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n{extra}\r\n"
    ).encode()


async def test_a_body_over_the_limit_is_413_without_reading_it(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    async with running_frontend(kv, settings, max_body_size=1000) as fe:
        # declared too large: answered before a byte of the body is sent
        status, body = await raw_exchange(fe, upload_head("content-length: 100000000\r\n"))
        assert status == 413
        assert body["error"]["code"] == "request_too_large"
        assert "1000 bytes" in body["error"]["message"]
        # chunked, no length: answered once the first 1001 bytes have arrived, the rest unsent
        chunk = b"x" * 2000
        first = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        status, body = await raw_exchange(fe, upload_head("transfer-encoding: chunked\r\n") + first)
        assert status == 413
        assert body["error"]["type"] == "invalid_request_error"
        # within the limit the request is read and answered as usual
        async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
            response = await http.post(CHAT, json={"model": "nope", "messages": HELLO})
            assert_openai_error(response, 404, param="model")
        assert (
            sample(fe, "troupe_frontend_errors_total", model="", endpoint=CHAT_LABEL, code="413")
            == 2
        )


async def unsized(part: bytes, count: int) -> AsyncIterator[bytes]:
    """A body with no declared length."""
    for _ in range(count):
        yield part


class Gated:
    """A handler that yields one chunk, then waits for ``gate`` before finishing."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    async def __call__(self, request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        yield {"text": "one", "prompt_tokens": 1}
        await asyncio.to_thread(self.gate.wait, 10)
        yield {"text": " two", "finish_reason": "stop"}


async def test_a_body_over_the_limit_on_http2_leaves_the_other_streams_alone(
    kv: MemoryKvServer, settings: FrontendSettings, workers: Workers
) -> None:
    gated = Gated()
    await workers.serve("demo.mocker.generate", gated, model="mock")
    limits = httpx.Limits(max_connections=1)
    try:
        async with (
            running_frontend(kv, settings, max_body_size=1000) as fe,
            httpx.AsyncClient(
                base_url=fe.url, http1=False, http2=True, limits=limits, timeout=10
            ) as http,
        ):
            await wait_for_model(fe, "mock")
            body = {"model": "mock", "messages": HELLO, "stream": True}
            async with http.stream("POST", CHAT, json=body) as stream:
                assert stream.http_version == "HTTP/2"
                lines = stream.aiter_lines()
                assert (await anext(lines)).startswith("data: ")  # the stream is open
                # on the same connection: oversized, declared and not (a generator has no length)
                for content in (b"x" * 200_000, None):
                    response = await http.post(
                        CHAT,
                        content=content if content is not None else unsized(b"x" * 50_000, 4),
                        headers={"content-type": "application/json"},
                    )
                    assert response.http_version == "HTTP/2"
                    assert_openai_error(response, 413, code="request_too_large")
                    assert "connection" not in response.headers
                gated.gate.set()
                rest = [line async for line in lines]
            assert stream.status_code == 200
            assert events("\n\n".join(line for line in rest if line) + "\n\n")[-1] == "[DONE]"
            assert "two" in "".join(rest)
            assert (await http.get("/health")).status_code == 200  # the connection still works
    finally:
        gated.gate.set()


def test_the_default_body_limit_is_the_request_planes_message_size(frontend: Frontend) -> None:
    assert frontend.settings.max_body_size is None
    assert frontend.state.max_body_size == CONFIG.request_plane.tcp.max_message_size


async def test_draining_counts_unknown_models_under_one_label(
    frontend: Frontend, http: httpx.AsyncClient
) -> None:
    assert await frontend.drain(0)
    response = await http.post(CHAT, json={"model": "client-chosen-name", "messages": HELLO})
    assert_openai_error(response, 503, code="shutting_down")
    labels = {"endpoint": CHAT_LABEL, "code": "503"}
    assert sample(frontend, "troupe_frontend_errors_total", model="", **labels) == 1
    assert "client-chosen-name" not in (await http.get("/metrics")).text


async def test_a_failed_bind_leaves_no_actor_behind(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rt = Runtime(CONFIG, handle_signals=False, memory_server=kv).start()
        try:
            before = {ref.name for ref in rt.system.actors()}
            frontend = Frontend(rt, dataclasses.replace(settings, port=port))
            with pytest.raises(ConfigError, match="in use"):
                await frontend.start()
            assert {ref.name for ref in rt.system.actors()} == before
        finally:
            await asyncio.to_thread(rt.close)


def test_the_engine_request_carries_the_text_once() -> None:
    chat = engine_request(
        decode_chat(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    )
    assert "prompt" not in chat
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    completion = engine_request(decode_completion(b'{"model": "m", "prompt": "hi"}'))
    assert "messages" not in completion
    assert completion["prompt"] == "hi"


async def test_an_instance_on_another_wire_version_gets_no_generation(
    kv: MemoryKvServer, settings: FrontendSettings, workers: Workers
) -> None:
    """The model's router never sends a generation to an instance whose record says another
    wire version (nothing is generated there; every request is served by the other)."""

    def named(name: str) -> Any:
        async def handler(request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
            yield {"text": name, "prompt_tokens": 1}

        return handler

    await workers.serve("demo.mocker.generate", named("current"), model="mock")
    old = await workers.serve("demo.mocker.generate", named("old"), model="mock")
    async with running_frontend(kv, settings) as fe:
        await wait_for_model(fe, "mock")
        router = fe.registry.router(fe.registry.get("mock"))  # type: ignore[arg-type]
        await eventually_async(lambda: len(router.instance_ids()) == 2)
        key = f"/services/demo/mocker/generate/{old.instance_id}"

        async def downgrade() -> None:
            stored = await old.store.get(key)
            assert stored is not None
            record = decode_record(stored.value, key=key)
            old_record = encode_record(msgspec.structs.replace(record, wire=0))
            await old.store.put(key, old_record, lease=stored.lease)  # still leased

        await asyncio.to_thread(old.io.run, downgrade(), 5)
        await eventually_async(lambda: old.instance_id in router.snapshot.incompatible)
        async with httpx.AsyncClient(base_url=fe.url, timeout=10) as http:
            body = {"model": "mock", "prompt": "x"}
            texts = [
                (await http.post("/v1/completions", json=body)).json()["choices"][0]["text"]
                for _ in range(6)
            ]
        assert texts == ["current"] * 6


class GatedFrontend(Frontend):
    """Its lifespan startup waits for :attr:`gate`: start() stays inside hypercorn's start-up."""

    def __init__(self, rt: Runtime, settings: FrontendSettings) -> None:
        super().__init__(rt, settings)
        self.gate = asyncio.Event()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.gate.wait()
        async with super()._lifespan(app):
            yield


async def test_close_during_start_stops_hypercorn_and_start_raises(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    rt = Runtime(CONFIG, handle_signals=False, memory_server=kv).start()
    try:
        before = {ref.name for ref in rt.system.actors()}
        frontend = GatedFrontend(rt, settings)
        start = asyncio.create_task(frontend.start(), name="test-frontend-start")
        await eventually_async(lambda: frontend._task is not None, timeout=5, what="hypercorn")
        task, shutdown = frontend._task, frontend._shutdown
        assert task is not None
        assert shutdown is not None
        close = asyncio.create_task(frontend.close(), name="test-frontend-close")
        await eventually_async(shutdown.is_set, timeout=5, what="shutdown triggered")
        frontend.gate.set()  # the startup completes only now, after close() began
        with pytest.raises(TroupeError, match="closed while starting"):
            await asyncio.wait_for(start, 5)
        await asyncio.wait_for(close, 5)
        assert task.done()
        assert {ref.name for ref in rt.system.actors()} == before
    finally:
        await asyncio.to_thread(rt.close)


async def test_a_cancelled_start_leaves_no_server_behind(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    rt = Runtime(CONFIG, handle_signals=False, memory_server=kv).start()
    try:
        before = {ref.name for ref in rt.system.actors()}
        frontend = GatedFrontend(rt, settings)
        start = asyncio.create_task(frontend.start(), name="test-frontend-start")
        await eventually_async(lambda: frontend._task is not None, timeout=5, what="hypercorn")
        task = frontend._task
        assert task is not None
        port = frontend.port
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(start, 5)
        assert task.done()
        assert frontend._task is None
        assert {ref.name for ref in rt.system.actors()} == before
        with pytest.raises(ConnectionRefusedError):  # the socket is closed
            await asyncio.open_connection("127.0.0.1", port)
        await frontend.close()
    finally:
        await asyncio.to_thread(rt.close)
