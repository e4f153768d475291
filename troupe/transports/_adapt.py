"""The one handler adapter: whatever kind of callable a handler is, what it produces.

A handler is called as ``handler(request, ctx)`` and is one of four kinds (:data:`HandlerKind`):
an async generator function (the usual: each item is a chunk), a coroutine function (its result
is the one answer), a sync generator function or a plain function. :class:`HandlerAdapter` tells
which once, when the endpoint is added, and runs each request accordingly: the async kinds on the
event loop, the sync ones on an executor (the loop's default one, or a pool of its own), so that
a blocking handler never blocks the loop.

Both sides of a worker use it: the :class:`~troupe.transports.RequestRunner` for the handlers a
server serves (bytes in, bytes out; :mod:`troupe.transports._pump` sends what they produce), and
the ``WorkerActor`` for the user's handler behind it (objects in and out, on the actor's bounded
thread pool).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, Final, Literal, TypeAlias, cast

from troupe.transports._context import RequestContext

__all__ = ["HandlerAdapter", "HandlerKind"]

HandlerKind: TypeAlias = Literal["async_gen", "async", "sync_gen", "sync"]
"""What a handler is: an async generator function, a coroutine function, a sync generator
function or a plain (sync) function."""

Produced: TypeAlias = AsyncIterator[Any] | Awaitable[Any]
"""What a started handler gives: its items (a generator kind), or its one result (the others)."""

_BLOCKING: Final = frozenset({"sync_gen", "sync"})
_DONE: Final = object()


def _kind_of(handler: Callable[..., Any]) -> HandlerKind:
    if not callable(handler):
        raise TypeError(f"handler {handler!r} is not callable")
    # A callable object's kind is that of its __call__ method.
    target = handler if inspect.isroutine(handler) else type(handler).__call__
    if inspect.isasyncgenfunction(handler) or inspect.isasyncgenfunction(target):
        return "async_gen"
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(target):
        return "async"
    if inspect.isgeneratorfunction(handler) or inspect.isgeneratorfunction(target):
        return "sync_gen"
    return "sync"


class HandlerAdapter:
    """Runs one handler of any kind (see :data:`HandlerKind`).

    Args:
        handler: ``handler(request, ctx)``.
        executor: where the sync kinds run; the event loop's default executor when ``None``.

    Attributes:
        handler: the handler.
        kind: what it is.
        start: ``start(request, ctx)`` starts the handler on the running loop and returns what
            it produces (:data:`Produced`): an async generator's own iterator, a coroutine's
            awaitable, a sync generator's items read on the executor, a plain function's result
            computed on the executor. For the async kinds it is the handler itself (nothing in
            between on the hot path).

    Raises:
        TypeError: ``handler`` is not callable.
    """

    __slots__ = ("handler", "kind", "start")

    def __init__(self, handler: Callable[..., Any], executor: Executor | None = None) -> None:
        self.handler = handler
        self.kind = _kind_of(handler)
        self.start: Callable[[Any, RequestContext], Produced]
        if self.kind == "sync_gen":
            self.start = functools.partial(_sync_items, handler, executor)
        elif self.kind == "sync":
            self.start = functools.partial(_in_thread, handler, executor)
        else:
            self.start = handler

    def __repr__(self) -> str:
        return f"<HandlerAdapter {self.kind} {self.handler!r}>"

    @property
    def blocking(self) -> bool:
        """Whether the handler runs on an executor (a sync kind)."""
        return self.kind in _BLOCKING

    def items(self, request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
        """Start the handler; what it produces as items (a one-result kind gives one item)."""
        produced = self.start(request, ctx)
        if type(produced) is types.AsyncGeneratorType:  # the usual handler: as it is
            return produced
        if is_result(produced):
            return _one(cast(Awaitable[Any], produced))
        return cast(AsyncIterator[Any], produced)  # another async iterator


def is_result(produced: Produced) -> bool:
    """Whether a started handler gives one result (an awaitable) rather than items."""
    # An async generator (the usual handler) is recognised by its exact type: cheaper than
    # inspect.isawaitable on every request.
    return type(produced) is not types.AsyncGeneratorType and inspect.isawaitable(produced)


async def _one(result: Awaitable[Any]) -> AsyncIterator[Any]:
    yield await result


async def _in_thread(
    handler: Callable[..., Any], executor: Executor | None, request: Any, ctx: RequestContext
) -> Any:
    """A plain function's result, computed on ``executor``."""
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(executor, handler, request, ctx)
    if inspect.isawaitable(result):  # a plain function that wraps a coroutine function
        result = await result
    return result


async def _sync_items(
    handler: Callable[..., Any], executor: Executor | None, request: Any, ctx: RequestContext
) -> AsyncIterator[Any]:
    """A sync generator's items, each read on ``executor``; it is closed there too."""
    loop = asyncio.get_running_loop()
    gen: Iterator[Any] = await loop.run_in_executor(executor, handler, request, ctx)
    try:
        while (item := await loop.run_in_executor(executor, next, gen, _DONE)) is not _DONE:
            yield item
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            await loop.run_in_executor(executor, close)
