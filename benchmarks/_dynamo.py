"""The NVIDIA Dynamo peer's processes: a worker and a client on Dynamo's runtime, no troupe code.

Run by :mod:`benchmarks._dynamo_peer` with ``ai-dynamo-runtime`` installed (the ``bench`` extra),
each in its own process; the environment chooses discovery (``DYN_DISCOVERY_BACKEND``,
``ETCD_ENDPOINTS``), the request plane (``DYN_REQUEST_PLANE``, ``NATS_SERVER``) and the loopback
hosts (``DYN_TCP_RPC_HOST`` for the worker's request server, ``DYN_TCP_RESPONSE_STREAM_HOST`` for
the caller's response-stream listener: Dynamo's answers come back on a worker → caller TCP
connection).

- ``python -m benchmarks._dynamo worker PATH --handler echo|words``: serves ``PATH``
  (``namespace.component.endpoint``). ``echo`` answers a request with itself, or ``{"stream": n}``
  with n chunks of 64 characters (the planes suite's exchange); ``words`` streams the words of
  ``{"text": ..., "delay": s}``, ``delay`` seconds apart, each chunk ``{"index", "word", "pid"}``
  (the failure suite's ``troupe.demo:words``). Prints ``READY``, serves until SIGTERM.
- ``python -m benchmarks._dynamo client PATH --instances N``: prints ``READY`` once it sees N
  instances, then answers one JSON command per line on stdin, as the floor clients do
  (:mod:`benchmarks._floors`: ``rtt``, ``tp``, ``stream``), plus ``failure``: the failure
  window's load (see :func:`_failure`), answered with every request's outcome.

Dynamo carries JSON-like values: the 1 KiB request is a 1,024-character string (troupe's is
1,024 bytes), a streamed chunk 64 characters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from benchmarks._floors import (
    CHUNK_SIZE,
    STREAM_CHUNKS,
    _async_handler,
    _new_loop,
    _pipelined_calls,
    _ready,
    _timed_calls,
)

_PAYLOAD = "x" * 1024
_CHUNK = "c" * CHUNK_SIZE
_REQUEST_TIMEOUT = 10.0  # seconds: a failure-window request still open after this is "hung"


def _runtime(loop: asyncio.AbstractEventLoop) -> Any:
    from dynamo.runtime import DistributedRuntime  # noqa: PLC0415 - only in these processes

    return DistributedRuntime(
        loop, os.environ["DYN_DISCOVERY_BACKEND"], os.environ["DYN_REQUEST_PLANE"]
    )


# --- the worker -------------------------------------------------------------------------------


async def echo(request: Any, context: Any) -> AsyncIterator[Any]:
    """The planes suite's handler: ``{"stream": n}`` streams n chunks; anything else is echoed."""
    if isinstance(request, dict) and "stream" in request:
        for _ in range(int(request["stream"])):
            yield _CHUNK
    else:
        yield request


async def words(request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
    """``troupe.demo:words`` on Dynamo: one chunk per word, ``delay`` seconds between them."""
    delay = float(request.get("delay", 0))
    pid = os.getpid()
    for index, word in enumerate(str(request["text"]).split()):
        if index and delay:
            await asyncio.sleep(delay)
        yield {"index": index, "word": word, "pid": pid}


_HANDLERS: dict[str, Callable[..., AsyncIterator[Any]]] = {"echo": echo, "words": words}


async def _serve(path: str, handler: str) -> None:
    runtime = _runtime(asyncio.get_running_loop())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, runtime.shutdown)
    endpoint = runtime.endpoint(path)
    _ready()  # the client waits for the registration itself
    await endpoint.serve_endpoint(_HANDLERS[handler], graceful_shutdown=False)


# --- the client -------------------------------------------------------------------------------


async def _connect(path: str, instances: int) -> tuple[Any, Any]:
    runtime = _runtime(asyncio.get_running_loop())
    client = await runtime.endpoint(path).client()
    deadline = time.monotonic() + 30.0
    while len(client.instance_ids()) < instances:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(client.instance_ids())} of {instances} instances of {path}")
        await asyncio.sleep(0.02)  # Dynamo's client offers no "wait for N" call
    return runtime, client


def _planes_handler(
    loop: asyncio.AbstractEventLoop, client: Any
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    async def call() -> object:
        return [chunk async for chunk in await client.round_robin(_PAYLOAD, annotated=False)]

    async def rtt(n: int, cap: float) -> list[float]:
        return await _timed_calls(call, n, cap)

    async def tp(n: int, cap: float) -> int:
        return await _pipelined_calls(call, n, cap)

    async def stream(n: int, cap: float) -> int:
        deadline = time.perf_counter() + cap
        chunks = 0
        request = {"stream": STREAM_CHUNKS}
        for _ in range(n):
            got = 0
            async for _chunk in await client.round_robin(request, annotated=False):
                got += 1
            if got != STREAM_CHUNKS:
                raise RuntimeError(f"Dynamo stream ended after {got} chunks")
            chunks += got
            if time.perf_counter() > deadline:
                break
        return chunks

    return _async_handler(loop, rtt, tp, stream)


async def _failure(client: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    """The failure window on Dynamo: load, SIGKILL of ``victim`` mid-stream, every outcome.

    ``rate`` > 0: open loop, one request every 1/rate s whatever the completions; else
    ``inflight`` callers, each sending its next request when the last one ends. The first chunk
    from ``victim`` after ``kill_at`` s triggers its ``kill -9``. Each request is bounded by
    ``_REQUEST_TIMEOUT``. Times are seconds from the start of the load.
    """
    rate, inflight = float(cmd["rate"]), int(cmd["inflight"])
    duration, kill_at, victim = float(cmd["duration"]), float(cmd["kill_at"]), int(cmd["victim"])
    request = {"text": cmd["text"], "delay": cmd["delay"]}
    expected = len(str(cmd["text"]).split())
    start = time.monotonic()
    killed: list[float] = []
    gone: list[float] = []
    records: list[dict[str, Any]] = []

    async def one() -> None:
        t0 = time.monotonic()
        seen: set[int] = set()
        failure: str | None = None
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                async for chunk in await client.round_robin(request, annotated=False):
                    now = time.monotonic() - start
                    if not killed and now >= kill_at and chunk.get("pid") == victim:
                        os.kill(victim, signal.SIGKILL)  # mid-stream; the parent reaps it
                        killed.append(now)
                    seen.add(int(chunk["index"]))
        except TimeoutError:
            failure = "hung"
        except Exception as exc:  # noqa: BLE001 - every error Dynamo raises is one failed request
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
        if failure is None and len(seen) != expected:
            failure = "incomplete"
        records.append({"start": t0 - start, "latency": time.monotonic() - t0, "failure": failure})

    async def watch(initial: int) -> None:
        while True:  # when the client stops listing the dead instance
            if killed and len(client.instance_ids()) < initial:
                gone.append(time.monotonic() - start)
                return
            await asyncio.sleep(0.01)

    async def caller() -> None:
        while time.monotonic() - start < duration:
            await one()

    watcher = asyncio.create_task(watch(len(client.instance_ids())), name="dynamo-watch")
    try:
        if rate > 0:
            tasks: list[asyncio.Task[None]] = []
            for n in range(int(duration * rate)):
                await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
                tasks.append(asyncio.create_task(one(), name=f"dynamo-request-{n}"))
            await asyncio.gather(*tasks)
        else:
            await asyncio.gather(*(caller() for _ in range(inflight)))
    finally:  # the dead instance may outlive the run (its lease): then gone_at is None
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    return {
        "records": records,
        "killed_at": killed[0] if killed else None,
        "gone_at": gone[0] if gone else None,
        "instances_after": len(client.instance_ids()),
    }


def _client_main(path: str, instances: int) -> None:
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    runtime, client = loop.run_until_complete(_connect(path, instances))
    handle = _planes_handler(loop, client)
    _ready()
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            if cmd["op"] == "failure":
                answer = loop.run_until_complete(_failure(client, cmd))
            else:
                answer = handle(cmd)
            print(json.dumps(answer), flush=True)
    finally:
        runtime.shutdown()


def main(argv: list[str] | None = None) -> None:
    """``worker PATH`` or ``client PATH`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks._dynamo")
    parser.add_argument("role", choices=("worker", "client"))
    parser.add_argument("path", help="namespace.component.endpoint")
    parser.add_argument("--handler", choices=sorted(_HANDLERS), default="echo")
    parser.add_argument("--instances", type=int, default=1)
    args = parser.parse_args(argv)
    if args.role == "client":
        _client_main(args.path, args.instances)
        return
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(_serve(args.path, args.handler))


if __name__ == "__main__":
    main()
