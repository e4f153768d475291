"""``troupe events``: the events of a component's topic, as JSON lines, as they arrive.

It subscribes on the event plane the environment names (``DYN_EVENT_PLANE``,
``DYN_DURABLE_KV_EVENTS``, ``NATS_SERVER``, or discovery for brokerless ``zmq``), like a router
would, and prints one JSON object per event: the envelope (publisher id, sequence, publish time,
topic; the stream sequence on a durable plane) and the decoded KV event; a payload that is not a
KV event is printed raw (base64, and its msgpack decoded when it is msgpack), never a crash.
``--from-start`` replays the JetStream stream first. ``--count`` and ``--timeout`` end it for
scripts; Ctrl-C ends it too (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from typing import Any, Final

import msgspec

from troupe.config import Config
from troupe.errors import ConfigError, InvalidName, NoInstances, ProtocolError
from troupe.events import (
    Envelope,
    EventPlane,
    EventScope,
    EventSubscription,
    decode_payload_as,
    validate_topic,
)
from troupe.kv import KV_EVENTS_TOPIC, Cleared, KvCacheEvent, Removed, Stored
from troupe.kv._query import QUERY_ENDPOINT, decode_answer, dump_request
from troupe.messages import Endpoint, validate_name
from troupe.runtime import Runtime

__all__ = ["add_arguments", "cmd_events", "event_json", "resolve_scope"]

_EXIT_SHORT: Final = 1  # --count not reached within --timeout
_STOP_TIMEOUT: Final = 5.0
_BLOCKS_WAIT: Final = 5.0  # seconds to find the workers in discovery (--blocks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``events`` subcommand's options."""
    parser.add_argument(
        "endpoint",
        metavar="ENDPOINT",
        help="namespace.component or namespace.component.endpoint: whose events to print",
    )
    parser.add_argument(
        "--topic", default=KV_EVENTS_TOPIC, help=f"the topic (default: {KV_EVENTS_TOPIC})"
    )
    parser.add_argument(
        "--from-start",
        action="store_true",
        help="replay the events the JetStream stream holds first (DYN_DURABLE_KV_EVENTS=true)",
    )
    parser.add_argument("--count", type=int, default=None, metavar="N", help="exit after N events")
    parser.add_argument(
        "--blocks",
        action="store_true",
        help="print each worker's KV cache (blocks held, last event id) as JSON lines, asked of "
        "its kv_events_query endpoint, and exit",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after SECONDS (status 1 if --count events did not come by then)",
    )


def resolve_scope(text: str) -> EventScope:
    """``ns.comp`` or ``ns.comp.endpoint`` (or ``dyn://...``) -> its namespace and component.

    Raises:
        ConfigError: not two or three valid names.
    """
    parts = text.strip().removeprefix("dyn://").split(".")
    if len(parts) not in (2, 3):
        raise ConfigError("ENDPOINT", text, "namespace.component or namespace.component.endpoint")
    try:
        for part in parts:
            validate_name("ENDPOINT", part)
    except InvalidName:
        raise ConfigError(
            "ENDPOINT", text, "names of lower-case letters, digits, '_' and '-', joined by '.'"
        ) from None
    return EventScope(parts[0], parts[1])


def _kv_json(event: KvCacheEvent) -> dict[str, Any]:
    body: dict[str, Any] = {"event_id": event.event_id, "dp_rank": event.dp_rank}
    match event.data:
        case Stored(parent_hash=parent, blocks=blocks):
            body.update(
                kind="stored",
                parent_hash=parent,
                hashes=[b.block_hash for b in blocks],
                tokens_hashes=[b.tokens_hash for b in blocks],
            )
        case Removed(block_hashes=hashes):
            body.update(kind="removed", hashes=list(hashes))
        case Cleared():
            body.update(kind="cleared", hashes=[])
    return body


def _raw(value: Any) -> Any:
    """JSON-ready: bytes as base64 (msgspec's builtins), anything stranger as its repr."""
    return msgspec.to_builtins(value, enc_hook=repr)


def event_json(envelope: Envelope, subscription: EventSubscription | None = None) -> str:
    """One event as a JSON line: the envelope's fields and its decoded KV event, or the raw
    payload (``payload_base64``, and ``payload`` when it is msgpack) if it is not one."""
    body: dict[str, Any] = {
        "publisher_id": envelope.publisher_id,
        "sequence": envelope.sequence,
        "published_at": envelope.published_at,
        "topic": envelope.topic,
    }
    if subscription is not None and subscription.stream_sequence:
        body["stream_sequence"] = subscription.stream_sequence
    try:
        body["event"] = _kv_json(decode_payload_as(envelope.payload, KvCacheEvent))
    except ProtocolError:
        body["payload_base64"] = base64.b64encode(envelope.payload).decode("ascii")
        try:
            body["payload"] = _raw(msgspec.msgpack.decode(envelope.payload))
            return json.dumps(body)
        except (msgspec.DecodeError, TypeError, ValueError):  # not msgpack, or odd map keys
            body["payload"] = None
    return json.dumps(body)


class _Tail:
    """Prints a subscription's events on the I/O loop until it is told to stop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.printed = 0
        self.subscription: EventSubscription | None = None
        self._stopped = False

    async def run(self, plane: EventPlane, scope: EventScope) -> None:
        args = self.args
        subscription = await plane.subscribe(scope, args.topic, from_start=args.from_start)
        self.subscription = subscription
        if self._stopped:
            await subscription.close()
            return
        print(
            f"troupe: following topic {args.topic} of {scope.namespace}.{scope.component} "
            f"on the {plane.name} event plane (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        try:
            async with asyncio.timeout(args.timeout), subscription:
                async for envelope in subscription:
                    if not _write(event_json(envelope, subscription)):
                        return  # the reader went away (a closed pipe): nothing more to do
                    self.printed += 1
                    if self.printed == args.count:
                        return
        except TimeoutError:
            pass

    async def stop(self) -> None:
        """End the iteration (Ctrl-C): the subscription is closed."""
        self._stopped = True
        if self.subscription is not None:
            await self.subscription.close()


def _write(line: str) -> bool:
    """Print a line; False when stdout is a pipe nobody reads any more."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        # Python's own recipe: point stdout at devnull so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False
    return True


def cmd_events(args: argparse.Namespace, config: Config) -> int:
    """Print ENDPOINT's events until ``--count``, ``--timeout`` or Ctrl-C."""
    scope = resolve_scope(args.endpoint)
    validate_topic(args.topic)
    if args.count is not None and args.count < 1:
        raise ConfigError("--count", args.count, "a number of events >= 1")
    if args.timeout is not None and not args.timeout > 0:
        raise ConfigError("--timeout", args.timeout, "a number of seconds > 0")
    if args.from_start and not config.events.durable:
        raise ConfigError(
            "DYN_DURABLE_KV_EVENTS",
            config.events.durable,
            "true with DYN_EVENT_PLANE=nats for --from-start: only a durable (JetStream) event "
            "plane keeps events to replay",
        )
    if args.blocks:
        with Runtime(config) as rt:
            return _print_blocks(rt, scope, args.timeout or _BLOCKS_WAIT)
    tail = _Tail(args)
    try:
        with Runtime(config) as rt:
            running = rt.io.submit(tail.run(rt.event_plane, scope))
            running.add_done_callback(lambda _: rt.request_shutdown())
            rt.wait_for_shutdown()  # the end of the events, or a signal
            if not running.done():  # Ctrl-C (or SIGTERM): end it cleanly
                rt.io.run(tail.stop(), timeout=_STOP_TIMEOUT)
                running.result(timeout=_STOP_TIMEOUT)
                return 0
            running.result()
    except KeyboardInterrupt:  # Ctrl-C before the subscription was up
        return 0
    if args.count is not None and tail.printed < args.count:
        within = f"within {args.timeout:g} s" if args.timeout is not None else "before they ended"
        print(f"troupe: {tail.printed} of {args.count} events {within}", file=sys.stderr)
        return _EXIT_SHORT
    return 0


def _print_blocks(rt: Runtime, scope: EventScope, timeout: float) -> int:
    """One JSON line per worker publishing KV events in ``scope``: what its cache holds
    (``timeout``: seconds to find one in discovery)."""
    query = Endpoint(scope.namespace, scope.component, QUERY_ENDPOINT)
    router = rt.router(query)
    try:
        workers = router.wait_for_instances_sync(timeout=timeout)
    except NoInstances:
        print(
            f"troupe: no worker publishes KV events in {query.namespace}.{query.component}",
            file=sys.stderr,
        )
        return _EXIT_SHORT
    for worker in workers:
        answer = decode_answer(list(router.generate_sync(dump_request(), instance_id=worker)))
        blocks = sum(len(e.data.blocks) for e in answer.events if isinstance(e.data, Stored))
        line = {"instance_id": worker, "blocks": blocks, "last_event_id": answer.last_event_id}
        print(json.dumps(line), flush=True)
    return 0
