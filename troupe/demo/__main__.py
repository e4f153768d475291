"""``python -m troupe.demo`` (what ``make demo`` runs): an OpenAI-compatible frontend over mock
LLM workers, a worker killed mid-stream, and the stream carrying on.

Embedded defaults, nothing to install: file-backed discovery in a temporary directory, the
TCP request plane on loopback and the brokerless ZeroMQ event plane. Two worker processes serve
the mock engine with a simulated KV cache (``troupe.demo.mocker:kv_worker``, publishing its KV
events) as model ``troupe-mock`` under a supervisor; the frontend runs in this process on
127.0.0.1 (a free port), finds them through discovery and routes with the KV-aware policy
(``--router-mode kv``). The demo then talks plain HTTP to it, as any OpenAI client would:

1. a streamed chat completion, printed token by token as the Server-Sent Events arrive;
2. a non-streaming completion, with its usage;
3. two completions sharing a long prefix: the second goes to the worker that cached it;
4. another streamed chat completion during which the worker producing it is SIGKILLed: the
   frontend resumes the generation on the other worker, the client sees one uninterrupted
   answer, and the supervisor starts a replacement worker.

The demo's frontend runs with a migration limit of 2 (:data:`MIGRATION_LIMIT`). ``troupe
frontend`` defaults to 0, as NVIDIA Dynamo's frontend does (a failed worker's generation fails);
``troupe frontend --migration-limit 2`` behaves as the demo does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from troupe import Config, Runtime
from troupe.actors import WhichChildren
from troupe.actors.routing import KvPolicy, KvRouterSettings
from troupe.config import (
    DiscoveryConfig,
    EventPlaneConfig,
    FileKvConfig,
    LogConfig,
    RequestPlaneConfig,
    TcpConfig,
)
from troupe.frontend import Frontend, FrontendSettings

ENDPOINT = "demo.mocker.generate"
MODEL = "troupe-mock"
WORKERS = 2
MIGRATION_LIMIT = 2
BLOCK_SIZE = 16
"""Tokens per KV block: the mock engine's default (one token per word of the prompt)."""
"""Times a generation may move to another worker (``troupe frontend --migration-limit``, default
0)."""


def _config(kv_dir: str) -> Config:
    return Config(
        discovery=DiscoveryConfig(backend="file", lease_ttl=2.0, file=FileKvConfig(path=kv_dir)),
        request_plane=RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1")),
        events=EventPlaneConfig(plane="zmq"),  # KV events with no server
        log=LogConfig(level="critical"),  # the demo narrates what happens itself
    )


async def _events(
    http: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of one SSE response, until ``data: [DONE]``."""
    async with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return
            yield json.loads(data)


def _pid(event: dict[str, Any]) -> int | None:
    fingerprint = event.get("system_fingerprint") or ""
    return int(fingerprint.rsplit("-", 1)[1]) if fingerprint.startswith("mocker-") else None


async def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


def _worker_pids(frontend: Frontend) -> list[int]:
    entry = frontend.registry.get(MODEL)
    if entry is None:
        return []
    router = frontend.registry.router(entry)
    return sorted(i.record.pid for i in router.snapshot.instances)


async def _chat(http: httpx.AsyncClient, prompt: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
    } | extra
    print(f"\n> POST /v1/chat/completions (stream) {prompt!r}\n  ", end="", flush=True)
    texts: list[str] = []
    usage: dict[str, Any] = {}
    async for event in _events(http, "/v1/chat/completions", body):
        usage = event.get("usage") or usage
        for choice in event["choices"]:
            text = choice["delta"].get("content") or ""
            texts.append(text)
            print(text, end="", flush=True)
    print()
    return "".join(texts), usage


async def _crash_mid_stream(http: httpx.AsyncClient) -> str:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "tell me a longer story"}],
        "stream": True,
        "max_tokens": 24,
        "ext": {"mocker": {"tokens_per_second": 20, "output_tokens": 24}},
    }
    print("\n> POST /v1/chat/completions (stream), a worker is killed midway\n  ", end="")
    texts: list[str] = []
    serving: int | None = None
    killed: int | None = None
    fresh_line = False
    async for event in _events(http, "/v1/chat/completions", body):
        pid = _pid(event)
        if pid is not None and pid != serving:
            if serving is not None:
                print(
                    f"  ! resumed on worker {pid} (migration): nothing lost or repeated\n  ", end=""
                )
                fresh_line = True
            serving = pid
        for choice in event["choices"]:
            text = choice["delta"].get("content") or ""
            if text:
                texts.append(text)
                print(text.lstrip() if fresh_line else text, end="", flush=True)
                fresh_line = False
        if killed is None and serving is not None and len(texts) == 6:
            killed = serving
            print(f"\n  ! kill -9 worker {killed} mid-stream", flush=True)
            os.kill(killed, signal.SIGKILL)
    print()
    if killed is None or serving == killed:
        raise RuntimeError("the stream did not move to another worker")
    return "".join(texts)


async def _complete(http: httpx.AsyncClient, prompt: str) -> int | None:
    """A short completion; the pid of the worker that answered."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    reply = (await http.post("/v1/completions", json=body)).json()
    return _pid(reply)


async def _shared_prefix(http: httpx.AsyncClient, frontend: Frontend) -> None:
    entry = frontend.registry.get(MODEL)
    assert entry is not None
    policy = frontend.registry.router(entry).policy_object
    assert isinstance(policy, KvPolicy)
    system = " ".join(f"rule{i}" for i in range(4 * BLOCK_SIZE))  # 4 blocks of 16 words
    print(f"\n> KV-aware routing: two completions sharing a {4 * BLOCK_SIZE}-word prefix")
    first = await _complete(http, f"{system} first question")
    held = policy.last_sent or ""
    await _wait(lambda: policy.index.block_count(held) >= 4, 10, "the worker's KV events")
    second = await _complete(http, f"{system} second question")
    overlap = policy.last_overlap.get(policy.last_sent or "", 0)
    where = "the same worker" if first == second else "another worker"
    print(f"  1st -> worker {first}; 2nd -> worker {second} ({where}, {overlap} blocks cached)")


async def _run(rt: Runtime, supervisor: Any) -> None:
    settings = FrontendSettings(
        host="127.0.0.1",
        port=0,
        migration_limit=MIGRATION_LIMIT,
        grace=2.0,
        router_mode="kv",
        kv=KvRouterSettings(block_size=BLOCK_SIZE),
    )
    async with (
        Frontend(rt, settings) as frontend,
        httpx.AsyncClient(base_url=frontend.url, timeout=30) as http,
    ):
        print(f"frontend listening on {frontend.listening}")
        print(
            f"migration on: --migration-limit {MIGRATION_LIMIT} (troupe frontend's default is 0: "
            "a generation whose worker dies fails)"
        )
        await _wait(lambda: len(_worker_pids(frontend)) == WORKERS, 30, "the workers")
        models = (await http.get("/v1/models")).json()
        print(f"GET /v1/models -> {[m['id'] for m in models['data']]}")
        print(f"workers (pids): {_worker_pids(frontend)}")

        _, usage = await _chat(http, "hello troupe, how are you today?")
        print(f"  usage: {usage}")

        print("\n> POST /v1/completions (non-streaming) 'once upon a time'")
        reply = (
            await http.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "once upon a time", "max_tokens": 8},
            )
        ).json()
        choice = reply["choices"][0]
        print(f"  {choice['text']!r} (finish_reason={choice['finish_reason']})")
        print(f"  usage: {reply['usage']}")

        await _shared_prefix(http, frontend)

        before = set(_worker_pids(frontend))
        await _crash_mid_stream(http)
        await _wait(
            lambda: (
                len(_worker_pids(frontend)) == WORKERS and set(_worker_pids(frontend)) != before
            ),
            30,
            "the replacement worker",
        )
        restarts = {c.id: c.restarts for c in await supervisor.ask_async(WhichChildren())}
        print(f"\nworkers (pids): {_worker_pids(frontend)}; restarts: {restarts}")
        print("\nstopping: the frontend drains, each worker unregisters and exits")


def main() -> int:
    """Run the demo; returns the exit status."""
    print(f"troupe demo: OpenAI-compatible frontend, {WORKERS} mock LLM worker processes\n")
    with (
        tempfile.TemporaryDirectory(prefix="troupe-demo-") as kv_dir,
        Runtime(_config(kv_dir), handle_signals=False) as rt,
    ):
        logs = Path(kv_dir, "logs")
        logs.mkdir()
        # The workers write to files, so a restarted worker's start-up lines don't land in the
        # middle of a streamed answer; they are shown if the demo fails.
        supervisor = rt.spawn_workers(
            ENDPOINT, "troupe.demo.mocker:kv_worker", processes=WORKERS, model=MODEL, log_dir=logs
        )
        try:
            asyncio.run(_run(rt, supervisor))
        except BaseException:
            for log in sorted(logs.glob("*.log")):
                print(f"\n--- {log.name} (last lines) ---", file=sys.stderr)
                print(
                    "\n".join(log.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr
                )
            raise
    print("done: every process stopped, every thread joined.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
