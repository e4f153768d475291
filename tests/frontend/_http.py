"""Helpers of the frontend tests over HTTP: paths, bodies, engines, and reading SSE bodies,
OpenAI errors and metric samples."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from troupe import RequestContext
from troupe.demo.mocker import make_generate
from troupe.frontend import Frontend

FAST = make_generate(tokens_per_second=5000, time_to_first_token=0.0, output_tokens=8)
"""The mock engine, fast: eight tokens at once."""
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


def assert_openai_error(
    response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """Check an OpenAI-style JSON error reply; return its ``error`` object."""
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


def sample(frontend: Frontend, name: str, **labels: str) -> float:
    """One sample of the frontend's metrics (0 when absent)."""
    value = frontend.rt.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def answers(text: str) -> Any:
    """An engine that answers ``text`` to every request."""

    async def handler(request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        yield {"text": text, "prompt_tokens": 1}

    return handler


async def completion_text(http: httpx.AsyncClient, model: str) -> str:
    """The text of a non-streamed completion from ``model``."""
    response = await http.post("/v1/completions", json={"model": model, "prompt": "x"})
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["text"]
    return text
