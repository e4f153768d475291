"""The KV routing benchmark's client: streamed completions over plain HTTP/1.1, timed.

A deliberately thin client, so that the benchmark process spends little of the machine's CPU:
one keep-alive connection per request slot (asyncio streams), the request written in one go,
the chunked answer read as it comes and cut into Server-Sent Events by :class:`SseDecoder`
(bytes in, payloads out, no I/O). TTFT is the time from writing the request to the first
``data:`` event.

- :func:`run_chat`: the multi-turn workload, closed loop: ``concurrency`` users at a time, each
  sending its next turn (previous prompt + the answer just received + a new message) as soon as
  the previous one ended; the next user starts when one finishes.
- :func:`run_fixed`: a list of prompts with ``in_flight`` requests outstanding at all times,
  the first ones a warm-up left out of the figures.

Both stop starting requests at ``deadline`` (monotonic seconds) and return a :class:`Run`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from benchmarks._kv_workload import Conversation

__all__ = ["Exchange", "Run", "SseDecoder", "StreamClient", "run_chat", "run_fixed"]

_MAX_LINE = 64 * 1024


class SseDecoder:
    """Server-Sent Events from a byte stream: feed bytes, get each event's ``data`` payload."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The ``data`` payloads of the events completed by ``data`` (other fields ignored)."""
        # Normalised after joining: a CRLF may arrive cut in two.
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        payloads = []
        for event in events:
            lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line[:5] == b"data:"]
            if lines:
                payloads.append(b"\n".join(lines))
        return payloads


@dataclass
class Exchange:
    """One request as the client saw it (seconds on the monotonic clock)."""

    sent: float
    first: float | None = None
    ended: float | None = None
    text: str = ""
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent


@dataclass
class Run:
    """Every exchange of one run, and its span (first request sent to last answer ended)."""

    exchanges: list[Exchange] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    @property
    def completed(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.error is None and e.first is not None]

    @property
    def errors(self) -> list[str]:
        return [e.error for e in self.exchanges if e.error is not None]

    @property
    def rate(self) -> float:
        """Completed requests per second over the run's span."""
        span = self.ended - self.started
        return len(self.completed) / span if span > 0 else float("nan")


_chunk = msgspec.json.Decoder(dict[str, Any])


def _chunk_text(payload: bytes) -> str:
    """A completion chunk's text.

    Raises:
        ValueError: the event is an error (the stream failed after it started), or not JSON.
    """
    try:
        chunk = _chunk.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a JSON event: {payload[:80]!r}") from exc
    if "error" in chunk:
        raise ValueError(f"error event: {payload[:200].decode(errors='replace')}")
    choices = chunk.get("choices") or ()
    return "".join(c.get("text") or "" for c in choices if isinstance(c, dict))


class StreamClient:
    """One keep-alive HTTP/1.1 connection to the frontend, one streamed completion at a time."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._encode = msgspec.json.Encoder().encode

    async def complete(self, body: dict[str, Any]) -> Exchange:
        """Send ``body`` to ``/v1/completions`` and read the streamed answer."""
        payload = self._encode(body)
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self._host, self._port, limit=_MAX_LINE
            )
        exchange = Exchange(time.monotonic())
        try:
            self._writer.write(head + payload)
            await self._read(exchange)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            exchange.error = f"{type(exc).__name__}: {exc}"
            await self.close()
        exchange.ended = time.monotonic()
        return exchange

    async def _read(self, exchange: Exchange) -> None:
        reader = self._reader
        assert reader is not None
        status = (await reader.readuntil(b"\r\n")).split(b" ", 2)
        headers: dict[bytes, bytes] = {}
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get(b"transfer-encoding") != b"chunked":
            body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
            exchange.error = f"HTTP {status[1].decode()}: {body[:200].decode(errors='replace')}"
            if headers.get(b"connection") == b"close":
                await self.close()
            return
        sse = SseDecoder()
        parts: list[str] = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
            data = await reader.readexactly(size + 2)
            for event in sse.feed(data[:-2]):
                if event == b"[DONE]":
                    continue
                if exchange.first is None:
                    exchange.first = time.monotonic()
                parts.append(_chunk_text(event))
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
        exchange.text = "".join(parts)
        if status[1] != b"200":
            exchange.error = f"HTTP {status[1].decode()}"

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


def _body(model: str, prompt: str, max_tokens: int, ext: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ext": ext}


async def run_chat(
    url: tuple[str, int],
    model: str,
    conversations: Sequence[Conversation],
    concurrency: int,
    ext: dict[str, Any],
    deadline: float,
) -> Run:
    """The conversations, ``concurrency`` users at a time, closed loop (see the module doc)."""
    run = Run(started=time.monotonic())
    todo = list(reversed(conversations))

    async def user_slot() -> None:
        client = StreamClient(*url)
        try:
            while todo and time.monotonic() < deadline:
                conversation = todo.pop()
                prompt = answer = ""
                for turn in range(conversation.turns):
                    if time.monotonic() >= deadline:
                        return
                    prompt = conversation.prompt(turn, prompt, answer)
                    exchange = await client.complete(
                        _body(model, prompt, conversation.max_tokens[turn], ext)
                    )
                    run.exchanges.append(exchange)
                    if exchange.error is not None:
                        break  # this conversation cannot go on without its answer
                    answer = exchange.text
        finally:
            await client.close()

    async with asyncio.TaskGroup() as group:
        for slot in range(concurrency):
            group.create_task(user_slot(), name=f"kv-bench-user-{slot}")
    run.ended = max((e.ended or run.started for e in run.exchanges), default=run.started)
    return run


async def run_fixed(
    url: tuple[str, int],
    model: str,
    prompts: Sequence[str],
    in_flight: int,
    max_tokens: int,
    ext: dict[str, Any],
    deadline: float,
    *,
    warmup: int = 0,
    warmed: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> Run:
    """Every prompt once, ``in_flight`` requests outstanding at a time (closed loop).

    The first ``warmup`` prompts sent warm the caches: they are left out of the :class:`Run`
    (which starts when the first measured request is sent), and ``warmed()`` runs as soon as
    the last of them has ended, while the loop goes on. The loop never drains between the two:
    a pause there would send the first measured requests all at once, a burst the workload
    does not have.
    """
    run = Run(started=time.monotonic())
    todo = list(reversed(prompts))
    sent = 0
    warming = warmup
    marks: list[asyncio.Task[None]] = []

    async def slot() -> None:
        nonlocal sent, warming
        client = StreamClient(*url)
        try:
            while todo and time.monotonic() < deadline:
                prompt, index = todo.pop(), sent
                sent += 1
                exchange = await client.complete(_body(model, prompt, max_tokens, ext))
                if index >= warmup:
                    run.exchanges.append(exchange)
                    continue
                warming -= 1
                if not warming and warmed is not None:
                    marks.append(asyncio.create_task(warmed(), name="kv-bench-warmed"))
        finally:
            await client.close()

    if warmed is not None and warmup == 0:
        await warmed()
    async with asyncio.TaskGroup() as group:
        for index in range(in_flight):
            group.create_task(slot(), name=f"kv-bench-slot-{index}")
    for mark in marks:
        await mark
    if warmed is not None and warming > 0:  # the deadline came first: nothing was measured
        await warmed()
    run.started = min((e.sent for e in run.exchanges), default=run.started)
    run.ended = max((e.ended or run.started for e in run.exchanges), default=run.started)
    return run
