"""The one handler adapter: every kind of handler, through the request runner and on its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from troupe.transports import (
    Handler,
    HandlerAdapter,
    InprocClient,
    InprocRegistry,
    InprocServer,
)
from troupe.transports import RequestContext as Ctx


async def agen(payload: bytes, ctx: Ctx) -> AsyncIterator[bytes]:
    yield payload
    yield b"!"


async def coro(payload: bytes, ctx: Ctx) -> bytes:
    return payload.upper()


async def nothing(payload: bytes, ctx: Ctx) -> None:
    return None


def sgen(payload: bytes, ctx: Ctx) -> Iterator[bytes]:
    yield threading.current_thread().name.encode()
    yield payload


def plain(payload: bytes, ctx: Ctx) -> bytes:
    return payload + b"/" + threading.current_thread().name.encode()


def wraps_a_coroutine(payload: bytes, ctx: Ctx) -> Awaitable[bytes]:
    """A decorator's plain wrapper around a coroutine function."""
    return coro(payload, ctx)


class Streamer:
    async def __call__(self, payload: bytes, ctx: Ctx) -> AsyncIterator[bytes]:
        yield payload


@pytest.mark.parametrize(
    ("handler", "kind"),
    [
        (agen, "async_gen"),
        (coro, "async"),
        (sgen, "sync_gen"),
        (plain, "sync"),
        (Streamer(), "async_gen"),
        (functools.partial(agen), "async_gen"),
        (wraps_a_coroutine, "sync"),
    ],
)
def test_kinds_are_told_by_what_the_callable_is(handler: Callable[..., Any], kind: str) -> None:
    adapter = HandlerAdapter(handler)
    assert adapter.kind == kind
    assert adapter.blocking == (kind in ("sync_gen", "sync"))


def test_a_non_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="not callable"):
        HandlerAdapter("nope")  # type: ignore[arg-type]


def test_the_async_kinds_are_called_with_nothing_in_between() -> None:
    assert HandlerAdapter(agen).start is agen
    assert HandlerAdapter(coro).start is coro


async def test_items_of_every_kind_and_sync_ones_run_on_the_executor() -> None:
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="adapt-test")
    ctx = Ctx(1, "ep")
    try:

        async def items(handler: Callable[..., Any]) -> list[Any]:
            return [item async for item in HandlerAdapter(handler, pool).items(b"x", ctx)]

        assert await items(agen) == [b"x", b"!"]
        assert await items(coro) == [b"X"]
        assert await items(nothing) == [None]  # an object handler's None is an answer
        [thread, payload] = await items(sgen)
        assert thread.startswith(b"adapt-test")
        assert payload == b"x"
        [answer] = await items(plain)
        assert answer.startswith(b"x/adapt-test")
        assert await items(wraps_a_coroutine) == [b"X"]
    finally:
        pool.shutdown()


async def test_a_sync_generator_is_closed_on_the_executor_when_its_reader_stops() -> None:
    closed = threading.Event()

    def endless(payload: bytes, ctx: Ctx) -> Iterator[bytes]:
        try:
            while True:
                yield b"more"
        finally:
            closed.set()

    items = HandlerAdapter(endless).items(b"", Ctx(1, "ep"))
    assert await anext(items) == b"more"
    await items.aclose()  # type: ignore[attr-defined]
    assert closed.is_set()


async def test_the_runner_serves_every_kind() -> None:
    registry = InprocRegistry()
    server = InprocServer(registry)
    handlers: dict[str, Handler] = {
        "agen": agen,
        "coro": coro,
        "nothing": nothing,
        "sgen": sgen,
        "plain": plain,
        "wrapped": wraps_a_coroutine,
    }
    for name, handler in handlers.items():
        server.add_endpoint(name, handler)
    await server.start()
    client = InprocClient(registry)
    try:

        async def call(endpoint: str) -> list[bytes]:
            stream = await client.request(server.address, endpoint, b"x")
            return await asyncio.wait_for(stream.collect(), 5)

        assert await call("agen") == [b"x", b"!"]
        assert await call("coro") == [b"X"]
        assert await call("nothing") == []  # on the wire, None is no chunk
        [thread, payload] = await call("sgen")
        assert thread != threading.current_thread().name.encode()  # not on the loop's thread
        assert payload == b"x"
        [answer] = await call("plain")
        assert answer.startswith(b"x/")
        assert answer != b"x/" + threading.current_thread().name.encode()
        assert await call("wrapped") == [b"X"]
    finally:
        await client.close()
        await server.close()
