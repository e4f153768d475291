"""Built-in demo code: what ``make demo`` runs, and handlers anyone can serve to try troupe.

troupe worker demo.backend.words troupe.demo:words
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from troupe.errors import ConfigError
from troupe.transports import RequestContext, resumable

__all__ = ["words"]


@resumable
async def words(request: Any, ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
    """Stream back the words of ``request["text"]``, one chunk each.

    ``request["delay"]`` (seconds, optional) is waited between words. Stops early when the
    caller goes away. Each chunk says which process (``pid``) and which attempt
    (``ctx.attempt``, above 0 after a migration) produced it. Resumable: a stream migrated from
    a failed worker continues after the ``ctx.received`` words its caller already has.
    """
    if not isinstance(request, dict) or not isinstance(request.get("text"), str):
        raise ConfigError("request", request, 'a JSON object like {"text": "hello world"}')
    delay = request.get("delay", 0)
    if not isinstance(delay, int | float) or delay < 0:
        raise ConfigError("request.delay", delay, "seconds >= 0")
    for index, word in enumerate(request["text"].split()):
        if index < ctx.received:
            continue  # the caller has it from the worker that failed
        if ctx.is_stopped():
            return
        if delay and index > ctx.received:
            await asyncio.sleep(delay)
        yield {"index": index, "word": word, "attempt": ctx.attempt, "pid": os.getpid()}
