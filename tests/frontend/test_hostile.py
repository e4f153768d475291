"""Hostile input at the frontend: JSON nested 100,000 deep, huge numbers, invalid UTF-8, wrong
types deep inside. Each is a 400 in OpenAI's error shape naming the problem, nothing is logged
as an error (no traceback), and the frontend keeps serving. Keep-alive connections a client
closes are let go at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from troupe.errors import InvalidRequest
from troupe.frontend import Frontend
from troupe.frontend._openai import MAX_EXT_DEPTH, decode_chat, decode_completion
from troupe.testing import eventually_async

from .conftest import Workers, wait_for_model
from .test_http import CHAT, FAST, HELLO

DEEP = 100_000
COMPLETIONS = "/v1/completions"
CHAT_HEAD = b'"model": "mock", "messages": [{"role": "user", "content": "hi"}]'
COMPLETION_HEAD = b'"model": "mock", "prompt": "hi"'
NESTED = b"nests JSON arrays or objects too deeply"


def arrays(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def objects(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


def ext(depth: int) -> bytes:
    """An ``ext`` object nested ``depth`` deep, itself included (``{"a": 1}`` is 1 deep)."""
    return objects(depth)


# (route, body, a piece of the message, param)
CASES: list[tuple[str, bytes, bytes, str | None]] = [
    (CHAT, arrays(DEEP), b"must be a JSON object", None),
    (CHAT, objects(DEEP), NESTED, None),
    (COMPLETIONS, objects(DEEP), NESTED, None),
    (CHAT, b'{"model": "mock", "messages": ' + arrays(DEEP) + b"}", b"Expected `object`", None),
    (CHAT, b'{"model": "mock", "messages": [' + objects(DEEP) + b"]}", NESTED, None),
    (CHAT, b"{" + CHAT_HEAD + b', "ext": ' + objects(DEEP) + b"}", NESTED, None),
    (CHAT, b"{" + CHAT_HEAD + b', "unknown": ' + arrays(DEEP) + b"}", NESTED, None),
    (COMPLETIONS, b'{"model": "mock", "prompt": ' + arrays(DEEP) + b"}", b"Expected", None),
    (COMPLETIONS, b"{" + COMPLETION_HEAD + b', "ext": ' + objects(DEEP) + b"}", NESTED, None),
    (CHAT, b"{" + CHAT_HEAD + b', "ext": ' + ext(MAX_EXT_DEPTH + 1) + b"}", b"ext nests", "ext"),
    (CHAT, b"{" + CHAT_HEAD + b', "max_tokens": ' + b"9" * 100_000 + b"}", b"", "max_tokens"),
    (CHAT, b"{" + CHAT_HEAD + b', "temperature": 1e99999999}', b"", "temperature"),
    (CHAT, b"{" + CHAT_HEAD + b', "seed": -' + b"9" * 5_000 + b"}", b"", "seed"),
    (COMPLETIONS, b"{" + COMPLETION_HEAD + b', "ext": {"n": ' + b"1" * 5_000 + b"}}", b"", None),
    (CHAT, b'{"model": "mo\xff\xfe", "messages": []}', b"Invalid UTF-8", None),
    (CHAT, b'{"model": "\xc0\xafmock", "messages": []}', b"Invalid UTF-8", None),
    (CHAT, b'{"model": "\\ud800", "messages": [{"role": "user"}]}', b"not valid JSON", None),
    (
        CHAT,
        b'{"model": "mock", "messages": [{"role": "user", "content": [{"type": "text", '
        b'"text": {"x": [1]}}]}]}',
        b"Expected `str | null`",
        "messages[0].content[0].text",
    ),
    (
        CHAT,
        b"{" + CHAT_HEAD + b', "stream": true, "stream_options": {"include_usage": [[]]}}',
        b"Expected `bool`",
        "stream_options.include_usage",
    ),
]


class Records(logging.Handler):
    """Keeps the records of troupe's loggers at WARNING and above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("troupe")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
async def mock(frontend: Frontend, workers: Workers) -> None:
    await workers.serve("demo.mocker.generate", FAST, model="mock")
    await wait_for_model(frontend, "mock")


@pytest.mark.usefixtures("mock")
async def test_hostile_json_is_a_400_naming_the_problem_and_nothing_breaks(
    http: httpx.AsyncClient, records: Records
) -> None:
    headers = {"content-type": "application/json"}
    for route, body, fragment, param in CASES:
        response = await http.post(route, content=body, headers=headers)
        what = f"{route} {body[:60]!r}"
        assert response.status_code == 400, f"{what}: {response.text[:200]}"
        assert response.headers["content-type"].startswith("application/json")
        error: dict[str, Any] = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, what
        assert error["type"] == "invalid_request_error", what
        assert fragment.decode() in error["message"], f"{what}: {error['message']}"
        assert "Traceback" not in error["message"]
        if param is not None:
            assert error["param"] == param, what
    assert [r.getMessage() for r in records.records] == []
    served = await http.post(CHAT, json={"model": "mock", "messages": HELLO, "max_tokens": 2})
    assert served.status_code == 200, served.text


@pytest.mark.usefixtures("mock")
async def test_ext_as_deep_as_allowed_is_served(http: httpx.AsyncClient) -> None:
    body = b"{" + CHAT_HEAD + b', "max_tokens": 2, "ext": ' + ext(MAX_EXT_DEPTH) + b"}"
    response = await http.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("decode", [decode_chat, decode_completion])
def test_decoding_refuses_deep_nesting_with_an_invalid_request(decode: Any) -> None:
    with pytest.raises(InvalidRequest, match="too deeply") as info:
        decode(objects(DEEP))
    assert isinstance(info.value.__cause__, RecursionError)


async def test_keep_alive_connections_a_client_closes_are_let_go_at_once(
    frontend: Frontend,
) -> None:
    """hypercorn 0.18 kept them in CLOSE_WAIT until its keep-alive timeout (5 s here)."""
    served = frontend._served
    assert served is not None
    peers = []
    for _ in range(50):
        reader, writer = await asyncio.open_connection("127.0.0.1", frontend.port)
        writer.write(b"GET /live HTTP/1.1\r\nhost: t\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        await asyncio.wait_for(reader.readexactly(length), 5)
        peers.append(writer)
    await eventually_async(lambda: served.connections == 50, what="50 connections open")
    for writer in peers:
        writer.close()
    await eventually_async(lambda: served.connections == 0, timeout=2, what="connections gone")
