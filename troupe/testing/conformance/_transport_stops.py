"""Transport checks, part two: how calls stop — the caller's cancellation, deadlines and
request timeouts mid-stream, a dropped stream, closing clients and servers, ports, and a worker
process killed mid-stream."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from troupe.errors import (
    ConfigError,
    DeadlineExceeded,
    RequestTimeout,
    StreamBroken,
    TransportClosed,
    TransportError,
)
from troupe.testing.conformance._check import raises
from troupe.testing.conformance._transport import (
    Blocker,
    TransportSession,
    collect,
    echo,
    transport_check,
)
from troupe.transports import RequestContext

__all__ = ["CANCEL_LATENCY", "STOP_CHECKS"]

CANCEL_LATENCY = 0.1
"""How long the caller's cancellation may take to reach the handler, in seconds."""

CALLER_GONE = ("cancelled", "disconnected")
"""The stop reasons a handler may see when its caller went away without a word."""


@transport_check()
async def aclose_cancels_the_handler_promptly(t: TransportSession) -> None:
    """Closing a stream stops its handler (reason ``cancelled``) within CANCEL_LATENCY."""
    blocker = Blocker()
    server = await t.server(block=blocker)
    stream = await t.client().request(server.address, "block", b"")
    assert await anext(stream) == b"first"
    assert server.inflight == 1, server.inflight
    closed_at = asyncio.get_running_loop().time()
    await stream.aclose()
    await asyncio.wait_for(blocker.cancelled.wait(), 5)
    assert blocker.stopped_seen, "the context was not stopped"
    assert blocker.reason == "cancelled", blocker.reason
    latency = blocker.cancelled_at - closed_at
    assert latency < CANCEL_LATENCY, f"the cancel took {latency:.3f} s"
    with raises(StopAsyncIteration, "reading a closed stream"):
        await anext(stream)


@transport_check()
async def cancelling_the_awaiting_task_cancels_the_handler(t: TransportSession) -> None:
    """Cancelling the task that reads a stream stops its handler within CANCEL_LATENCY."""
    blocker = Blocker()
    server = await t.server(block=blocker)
    client = t.client()
    got_first = asyncio.Event()

    async def consume() -> None:
        stream = await client.request(server.address, "block", b"")
        async for _ in stream:
            got_first.set()

    task = asyncio.create_task(consume(), name="conformance-consumer")
    await asyncio.wait_for(got_first.wait(), 5)
    cancelled_at = asyncio.get_running_loop().time()
    task.cancel()
    with raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(blocker.cancelled.wait(), 5)
    assert blocker.stopped_seen, "the context was not stopped"
    latency = blocker.cancelled_at - cancelled_at
    assert latency < CANCEL_LATENCY, f"the cancel took {latency:.3f} s"


@transport_check()
async def deadline_passing_mid_stream_stops_both_sides(t: TransportSession) -> None:
    """A deadline passing mid-stream: DeadlineExceeded for the caller, the handler stopped."""
    blocker = Blocker()
    server = await t.server(block=blocker)
    stream = await t.client().request(server.address, "block", b"", deadline=time.time() + 0.3)
    assert await anext(stream) == b"first"
    started = time.monotonic()
    with raises(DeadlineExceeded):
        await anext(stream)
    assert time.monotonic() - started < 2.0, "the deadline was late"
    await asyncio.wait_for(blocker.cancelled.wait(), 5)
    assert blocker.stopped_seen, "the context was not stopped"


@transport_check("timed_client")
async def request_timeout_stops_a_silent_handler(t: TransportSession) -> None:
    """No reply frame within the client's request timeout, before the first chunk or between
    two: RequestTimeout for the caller, and the handler stopped (``cancelled``)."""
    silent_stopped = asyncio.Event()

    async def silent(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        try:
            await asyncio.Event().wait()
            yield b"never"
        finally:
            silent_stopped.set()

    blocker = Blocker()
    server = await t.server(block=blocker, silent=silent)
    client = t.timed_client(0.3)
    with raises(RequestTimeout, "before the first chunk"):
        await collect(client, server.address, "silent", b"")
    await asyncio.wait_for(silent_stopped.wait(), 5)

    stream = await client.request(server.address, "block", b"")
    assert await anext(stream) == b"first"
    started = time.monotonic()
    with raises(RequestTimeout, "between two chunks"):
        await anext(stream)
    waited = time.monotonic() - started
    assert 0.2 < waited < 3.0, f"the timeout fired after {waited:.3f} s"
    await asyncio.wait_for(blocker.cancelled.wait(), 5)
    assert blocker.reason == "cancelled", blocker.reason


@transport_check()
async def a_dropped_stream_stops_its_handler(t: TransportSession) -> None:
    """A stream the caller forgets without closing it stops its handler."""
    stopped = asyncio.Event()
    reasons: list[str | None] = []
    go = asyncio.Event()

    async def ticker(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await go.wait()
            while True:
                yield b"more"
                await asyncio.sleep(0.01)  # a steady producer, not a flood
        finally:
            reasons.append(ctx.stop_reason)
            stopped.set()

    server = await t.server(ticker=ticker)
    stream = await t.client().request(server.address, "ticker", b"")
    assert await anext(stream) == b"first"
    del stream  # neither closed nor read to the end
    gc.collect()
    go.set()
    try:
        await asyncio.wait_for(stopped.wait(), 5)
    except TimeoutError:
        raise AssertionError("the handler of a dropped stream still runs after 5 s") from None
    assert reasons[0] in CALLER_GONE, reasons


@transport_check()
async def client_close_fails_its_streams_and_refuses_requests(t: TransportSession) -> None:
    """Closing a client: its open streams and new requests raise TransportClosed; closing
    twice is harmless."""
    blocker = Blocker()
    server = await t.server(block=blocker, echo=echo)
    client = t.client()
    stream = await client.request(server.address, "block", b"")
    assert await anext(stream) == b"first"
    await client.close()
    with raises(TransportClosed, "an open stream"):
        await anext(stream)
    with raises(TransportClosed, "a new request"):
        await client.request(server.address, "echo", b"")
    await client.close()


@transport_check()
async def client_close_stops_the_handlers_of_its_streams(t: TransportSession) -> None:
    """Closing a client stops the handlers of its open streams within 2 s, even silent ones
    (nothing to send, so only the transport can tell them the caller left)."""
    blocker = Blocker()
    server = await t.server(block=blocker)
    client = t.client()
    stream = await client.request(server.address, "block", b"")
    assert await anext(stream) == b"first"
    await client.close()
    try:
        await asyncio.wait_for(blocker.cancelled.wait(), 2)
    except TimeoutError:
        raise AssertionError("the handler still runs 2 s after its client closed") from None
    assert blocker.reason in CALLER_GONE, blocker.reason


@transport_check()
async def server_close_breaks_open_streams(t: TransportSession) -> None:
    """Closing a server breaks its open streams (StreamBroken); handlers see ``shutdown``."""
    blocker = Blocker()
    server = await t.server(block=blocker)
    stream = await t.client().request(server.address, "block", b"")
    assert await anext(stream) == b"first"
    await server.close()
    with raises(StreamBroken):
        await asyncio.wait_for(anext(stream), 5)
    assert blocker.reason == "shutdown", blocker.reason


@transport_check()
async def graceful_close_lets_running_requests_finish(t: TransportSession) -> None:
    """``close(grace)`` waits for running requests and lets them answer to the end."""
    release = asyncio.Event()

    async def slow(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"a"
        await release.wait()
        yield b"b"

    server = await t.server(slow=slow)
    stream = await t.client().request(server.address, "slow", b"")
    assert await anext(stream) == b"a"
    closing = asyncio.create_task(server.close(grace=5.0), name="conformance-close-grace")
    try:
        done, _ = await asyncio.wait({closing}, timeout=0.2)
        assert not done, "close(grace) returned while a request was still running"
        release.set()
        assert [chunk async for chunk in stream] == [b"b"]
        await asyncio.wait_for(closing, 5)
    finally:
        release.set()
        await asyncio.gather(closing, return_exceptions=True)


@transport_check()
async def server_start_and_close_are_idempotent(t: TransportSession) -> None:
    """No address before start; start and close twice are harmless; closed is final."""
    server = t.unstarted_server()
    with raises(TransportError, "address before start"):
        _ = server.address
    await server.start()
    address = server.address
    await server.start()
    assert server.address == address, (server.address, address)
    await server.close()
    await server.close()
    with raises(TransportClosed, "start after close"):
        await server.start()


@transport_check("port")
async def explicit_port_in_use_names_port_and_variable(t: TransportSession) -> None:
    """A port already in use: ConfigError naming the port and its environment variable."""
    assert t.subject.port is not None
    variable = t.subject.port.variable
    first = await t.server()
    port = urlsplit(first.address).port
    assert port, f"no port in {first.address!r}"
    second = t.port_server(port)
    with raises(ConfigError) as info:
        await second.start()
    assert info.value.variable == variable, info.value.variable
    assert str(port) in str(info.value), str(info.value)
    assert variable in str(info.value), str(info.value)


@transport_check("worker")
async def worker_killed_mid_stream_gives_stream_broken(t: TransportSession) -> None:
    """A worker process killed mid-stream breaks the stream (StreamBroken) within 1.5 s."""
    worker = await t.worker()
    client = t.client()
    assert await collect(client, worker.address, "echo", b"hi") == [b"hi"]
    stream = await client.request(worker.address, "forever", b"")
    assert await anext(stream) == b"first"
    worker.kill()
    killed_at = time.monotonic()
    with raises(StreamBroken):
        await asyncio.wait_for(anext(stream), 10)
    took = time.monotonic() - killed_at
    assert took < 1.5, f"the broken stream was noticed after {took:.2f} s"


STOP_CHECKS = (
    aclose_cancels_the_handler_promptly,
    cancelling_the_awaiting_task_cancels_the_handler,
    deadline_passing_mid_stream_stops_both_sides,
    request_timeout_stops_a_silent_handler,
    a_dropped_stream_stops_its_handler,
    client_close_fails_its_streams_and_refuses_requests,
    client_close_stops_the_handlers_of_its_streams,
    server_close_breaks_open_streams,
    graceful_close_lets_running_requests_finish,
    server_start_and_close_are_idempotent,
    explicit_port_in_use_names_port_and_variable,
    worker_killed_mid_stream_gives_stream_broken,
)
"""The checks of this module, in the order they run."""
