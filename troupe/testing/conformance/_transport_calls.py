"""Transport checks, part one: what a call carries and returns — streaming, handler errors,
request metadata, deadlines at the start, many calls at once, and size limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from troupe.errors import (
    DeadlineExceeded,
    InvalidRequest,
    MessageTooLarge,
    Overloaded,
    RemoteError,
    UnknownEndpoint,
)
from troupe.testing._wait import eventually_async
from troupe.testing.conformance._check import raises
from troupe.testing.conformance._transport import (
    TransportSession,
    collect,
    echo,
    transport_check,
)
from troupe.transports import RequestContext

__all__ = ["CALL_CHECKS"]


@transport_check()
async def a_request_its_worker_could_not_decode_is_refused_before_sending(
    t: TransportSession,
) -> None:
    """Headers that are not strings, or a payload that is not bytes: InvalidRequest, at once."""
    server = await t.server(echo=echo)
    client = t.client()
    with raises(InvalidRequest, "int header") as caught:
        await client.request(server.address, "echo", b"x", headers={"n": 1})  # type: ignore[dict-item]
    assert caught.value.param == "headers", caught.value.param
    with raises(InvalidRequest, "str payload"):
        await client.request(server.address, "echo", "text")  # type: ignore[arg-type]
    assert await collect(client, server.address, "echo", b"still serving") == [b"still serving"]


@transport_check()
async def chunks_arrive_in_order_and_incrementally(t: TransportSession) -> None:
    """The caller reads each chunk as the handler yields it, in order."""
    release = asyncio.Event()
    finished = asyncio.Event()

    async def handler(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"0"
        await release.wait()  # the caller must see chunk 0 before we go on
        for i in range(1, 50):
            yield str(i).encode()
        finished.set()

    server = await t.server(gen=handler)
    stream = await t.client().request(server.address, "gen", b"")
    first = await asyncio.wait_for(anext(stream), 5)
    assert first == b"0", first
    assert not finished.is_set(), "the handler ran ahead of the caller"
    release.set()
    rest = [chunk async for chunk in stream]
    assert rest == [str(i).encode() for i in range(1, 50)], rest


@transport_check()
async def unary_coroutine_handler_and_empty_stream(t: TransportSession) -> None:
    """A coroutine handler answers one chunk; a generator that yields nothing, none."""

    async def unary(payload: bytes, ctx: RequestContext) -> bytes:
        return payload[::-1]

    async def empty(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        nothing: list[bytes] = []
        for chunk in nothing:
            yield chunk

    server = await t.server(unary=unary, empty=empty)
    client = t.client()
    assert await collect(client, server.address, "unary", b"abc") == [b"cba"]
    assert await collect(client, server.address, "empty", b"") == []


@transport_check()
async def handler_exception_is_a_remote_error_and_server_keeps_serving(
    t: TransportSession,
) -> None:
    """A handler's exception reaches the caller as RemoteError (kind and message kept)."""

    async def broken(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"partial"
        raise ValueError("the model fell over")

    server = await t.server(broken=broken, echo=echo)
    client = t.client()
    stream = await client.request(server.address, "broken", b"")
    assert await anext(stream) == b"partial"
    with raises(RemoteError) as info:
        await anext(stream)
    assert info.value.kind == "ValueError", info.value.kind
    assert info.value.remote_message == "the model fell over", info.value.remote_message
    assert "the model fell over" in str(info.value), str(info.value)
    assert await collect(client, server.address, "echo", b"still") == [b"still"]


@transport_check()
async def troupe_errors_keep_their_type(t: TransportSession) -> None:
    """Overloaded raised by a handler, and an unknown or removed endpoint, keep their types."""

    async def busy(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        if not ctx.is_stopped():  # always: it refuses before its first chunk
            raise Overloaded("busy", 4)
        yield b""

    server = await t.server(busy=busy)
    client = t.client()
    with raises(Overloaded) as info:
        await collect(client, server.address, "busy", b"")
    assert "max in-flight 4" in str(info.value), str(info.value)
    with raises(UnknownEndpoint, "never served"):
        await collect(client, server.address, "nope", b"")
    server.remove_endpoint("busy")
    with raises(UnknownEndpoint, "removed"):
        await collect(client, server.address, "busy", b"")


@transport_check()
async def deadline_headers_and_attempt_travel(t: TransportSession) -> None:
    """The handler's context carries the caller's deadline, headers and attempt."""
    seen: list[RequestContext] = []

    async def record(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        seen.append(ctx)
        yield b"ok"

    server = await t.server(record=record)
    deadline = time.time() + 30.5
    stream = await t.client().request(
        server.address,
        "record",
        b"",
        deadline=deadline,
        headers={"trace-id": "abc", "x": "1"},
        attempt=2,
    )
    assert await stream.collect() == [b"ok"]
    (ctx,) = seen
    assert ctx.deadline == deadline, ctx.deadline
    assert dict(ctx.headers) == {"trace-id": "abc", "x": "1"}, dict(ctx.headers)
    assert ctx.attempt == 2, ctx.attempt
    assert ctx.endpoint == "record", ctx.endpoint
    remaining = ctx.time_remaining()
    assert remaining is not None
    assert 25 < remaining <= 30.5, remaining


@transport_check()
async def expired_request_is_not_started(t: TransportSession) -> None:
    """A request whose deadline has passed gets DeadlineExceeded; its handler never runs."""
    started = asyncio.Event()

    async def work(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        started.set()
        yield b"done"

    server = await t.server(work=work, echo=echo)
    client = t.client()
    with raises(DeadlineExceeded):
        await (
            await client.request(server.address, "work", b"", deadline=time.time() - 1)
        ).collect()
    # A later request on the same client has been fully served: the expired one was handled.
    assert await collect(client, server.address, "echo", b"x") == [b"x"]
    assert not started.is_set(), "the expired request was started"


@transport_check()
async def a_thousand_concurrent_requests_on_one_client(t: TransportSession) -> None:
    """One client carries a thousand concurrent streams, each answer to its own caller."""

    async def double(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        await asyncio.sleep(0)  # let the other requests interleave
        yield payload
        yield payload

    server = await t.server(double=double)
    client = t.client()

    async def one(i: int) -> list[bytes]:
        return await collect(client, server.address, "double", str(i).encode())

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(1000))), 50)
    assert results == [[str(i).encode()] * 2 for i in range(1000)], "answers were mixed up"
    assert server.inflight == 0, server.inflight


@transport_check("request_limit")
async def oversized_request_is_refused_before_sending(t: TransportSession) -> None:
    """A payload over the client's limit is MessageTooLarge, and nothing reaches the server."""
    assert t.subject.request_limit is not None
    limit = t.subject.request_limit
    started = asyncio.Event()

    async def sink(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        started.set()
        yield b"got it"

    server = await t.server(sink=sink, echo=echo)
    client = t.client()
    with raises(MessageTooLarge) as info:
        await client.request(server.address, "sink", b"x" * (limit + 1))
    assert info.value.size > limit, (info.value.size, limit)
    assert not started.is_set(), "the handler ran"
    assert await collect(client, server.address, "echo", b"ok") == [b"ok"]


@transport_check("reply_limit")
async def oversized_reply_is_an_error_and_the_server_keeps_serving(t: TransportSession) -> None:
    """A chunk over the server's limit ends its stream with MessageTooLarge, and only that."""
    assert t.subject.reply_limit is not None
    limit = t.subject.reply_limit

    async def huge(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"small"
        yield b"x" * (limit + 1)
        yield b"never"

    server = await t.server(huge=huge, echo=echo)
    client = t.client()
    stream = await client.request(server.address, "huge", b"")
    assert await anext(stream) == b"small"
    with raises(MessageTooLarge) as info:
        await asyncio.wait_for(anext(stream), 10)
    assert info.value.limit == limit, f"the error names the limit {info.value.limit}, not {limit}"
    assert await collect(client, server.address, "echo", b"after") == [b"after"]
    await eventually_async(lambda: server.inflight == 0, what="the refused stream's handler ended")


CALL_CHECKS = (
    a_request_its_worker_could_not_decode_is_refused_before_sending,
    chunks_arrive_in_order_and_incrementally,
    unary_coroutine_handler_and_empty_stream,
    handler_exception_is_a_remote_error_and_server_keeps_serving,
    troupe_errors_keep_their_type,
    deadline_headers_and_attempt_travel,
    expired_request_is_not_started,
    a_thousand_concurrent_requests_on_one_client,
    oversized_request_is_refused_before_sending,
    oversized_reply_is_an_error_and_the_server_keeps_serving,
)
"""The checks of this module, in the order they run."""
