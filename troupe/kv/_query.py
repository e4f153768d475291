"""The worker's KV events query endpoint: how a follower recovers what it missed.

Every worker that publishes KV events serves ``{namespace}.{component}.kv_events_query`` on its
request plane, under the same instance id as its other endpoints (NVIDIA Dynamo's worker query
endpoint). A request is a map:

- ``{"first": a, "last": b}``: the events ``a`` .. ``b``, if the worker's ring still holds them;
  otherwise the worker answers with a dump instead (saving the caller a round trip);
- ``{"dump": true}``: events that rebuild the worker's whole state.

The answer streams one or more chunks, each the msgpack bytes of a :class:`KvQueryAnswer`; their
``events`` concatenate. Codecs here are pure: bytes in, structs out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from troupe.errors import InvalidRequest, ProtocolError
from troupe.kv._events import KvCacheEvent
from troupe.kv._local import LocalKvIndexer

__all__ = [
    "QUERY_ENDPOINT",
    "KvQueryAnswer",
    "decode_answer",
    "dump_request",
    "parse_query",
    "query_handler",
    "range_request",
]

QUERY_ENDPOINT = "kv_events_query"
"""The endpoint name, in the publishing worker's namespace and component."""

CHUNK_EVENTS = 512
"""Events per answer chunk."""


class KvQueryAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """One chunk of a query's answer."""

    last_event_id: int
    """The worker's last event id: for a dump, the last event the dump covers."""
    dump: bool
    """True: ``events`` rebuild the whole state. False: they are the range asked for."""
    events: list[KvCacheEvent]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KvQueryAnswer)


def range_request(first: int, last: int) -> dict[str, Any]:
    """The request for events ``first`` .. ``last``."""
    return {"first": first, "last": last}


def dump_request() -> dict[str, Any]:
    """The request for a dump."""
    return {"dump": True}


def parse_query(request: Any) -> tuple[int, int] | None:
    """``(first, last)`` for a range request, None for a dump request.

    Raises:
        InvalidRequest: neither shape.
    """
    if isinstance(request, dict):
        if request.get("dump") is True and len(request) == 1:
            return None
        first, last = request.get("first"), request.get("last")
        if len(request) == 2 and type(first) is int and type(last) is int and 1 <= first <= last:
            return first, last
    raise InvalidRequest(
        f"expected {{'first': a, 'last': b}} with 1 <= a <= b, or {{'dump': true}}; "
        f"got {request!r:.200}"
    )


def query_handler(
    indexer: LocalKvIndexer, chunk_events: int = CHUNK_EVENTS
) -> Callable[[Any, Any], AsyncIterator[bytes]]:
    """The handler of the query endpoint, answering from ``indexer``."""

    async def kv_events_query(request: Any, ctx: Any) -> AsyncIterator[bytes]:
        span = parse_query(request)
        events = indexer.events_between(*span) if span is not None else None
        if events is not None:
            dump, last = False, indexer.last_event_id
        else:
            dump = True
            events, last = indexer.dump()
        for start in range(0, max(len(events), 1), chunk_events):
            chunk = events[start : start + chunk_events]
            yield _encoder.encode(KvQueryAnswer(last_event_id=last, dump=dump, events=chunk))

    return kv_events_query


def decode_answer(chunks: list[bytes]) -> KvQueryAnswer:
    """Join the chunks of one answer.

    Raises:
        ProtocolError: no chunk, a chunk that is not a :class:`KvQueryAnswer`, or chunks that
            disagree on ``dump`` / ``last_event_id``.
    """
    if not chunks:
        raise ProtocolError("empty KV events query answer")
    parts: list[KvQueryAnswer] = []
    for chunk in chunks:
        if not isinstance(chunk, bytes):
            raise ProtocolError(f"KV events query answer chunk is {type(chunk).__name__}")
        try:
            parts.append(_decoder.decode(chunk))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(f"malformed KV events query answer: {exc}") from None
    first = parts[0]
    if any(p.dump != first.dump or p.last_event_id != first.last_event_id for p in parts):
        raise ProtocolError("KV events query answer chunks disagree")
    if len(parts) == 1:
        return first
    events = [event for part in parts for event in part.events]
    return KvQueryAnswer(last_event_id=first.last_event_id, dump=first.dump, events=events)
