"""``troupe instances``: list or watch registered instances through the configured backend.

It shows what a router would route to: a record that does not decode, or that no lease binds (a
key written by hand, which routers ignore), is left out of the listing and named on stderr
(``--watch`` logs one warning per such key, as routers do).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import msgspec

from troupe.actors import Actor
from troupe.actors._watcher import Joined, Left, Subscribe, WatcherActor
from troupe.config import Config
from troupe.discovery import KeyValueStore, open_store
from troupe.errors import ConfigError, DiscoveryError
from troupe.messages import SERVICES_PREFIX, InstanceRecord, decode_record, services_prefix
from troupe.runtime import Runtime

__all__ = ["UNLEASED", "add_arguments", "add_prefix_argument", "cmd_instances", "resolve_prefix"]

UNLEASED = "bound to no lease (written by hand?), so routers ignore it; delete it"
"""Why a listed key is left out: nothing would ever expire it."""

_COLUMNS = (
    "INSTANCE",
    "NAMESPACE",
    "COMPONENT",
    "ENDPOINT",
    "TRANSPORT",
    "HOST",
    "PID",
    "AGE",
    "WIRE",
)


def add_prefix_argument(parser: argparse.ArgumentParser) -> None:
    """The optional PREFIX that ``instances`` and ``status`` take (see :func:`resolve_prefix`)."""
    parser.add_argument(
        "prefix",
        nargs="?",
        default="",
        metavar="PREFIX",
        help="ns[.component[.endpoint]] or a key prefix such as /services/ns (default: all)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``instances`` subcommand's options."""
    add_prefix_argument(parser)
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument(
        "--watch", action="store_true", help="stream joins and leaves until interrupted"
    )


def resolve_prefix(text: str) -> str:
    """``ns.comp.ep`` (or ``dyn://ns.comp``) or a key prefix → a key prefix."""
    text = text.strip().removeprefix("dyn://")
    if not text:
        return SERVICES_PREFIX
    if text.startswith("/"):
        return text.rstrip("/")
    parts = text.split(".")
    if len(parts) > 3 or not all(parts):
        raise ConfigError("PREFIX", text, "ns, ns.component or ns.component.endpoint")
    return services_prefix(*parts)


def _age(started_at: float) -> str:
    seconds = max(0, int(time.time() - started_at))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _row(record: InstanceRecord) -> tuple[str, ...]:
    transport = ",".join(record.transport.values())
    return (
        record.instance_id,
        record.namespace,
        record.component,
        record.endpoint,
        transport,
        record.host,
        str(record.pid),
        _age(record.started_at),
        str(record.wire),
    )


def format_instances(records: list[InstanceRecord]) -> str:
    """A fixed-width table of instances (header only when there are none)."""
    rows = [_COLUMNS, *(_row(r) for r in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _json_line(event: str | None, record: InstanceRecord | None, **extra: Any) -> str:
    body: dict[str, Any] = {} if event is None else {"event": event}
    if record is not None:
        body.update(msgspec.to_builtins(record))
    body.update(extra)
    return json.dumps(body, sort_keys=False)


def _decode(key: str, value: bytes) -> tuple[str, InstanceRecord]:
    record = decode_record(value, key=key)
    return record.instance_id, record


class _Printer(Actor[Joined | Left]):
    """Prints watch events as they arrive (one line each, flushed)."""

    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self._json = as_json

    def receive(self, message: Joined | Left) -> None:
        match message:
            case Joined(instance=record):
                line = (
                    _json_line("joined", record)
                    if self._json
                    else f"+ joined  {'  '.join(_row(record))}"
                )
            case Left(key=key, instance_id=instance_id, reason=reason):
                line = (
                    _json_line("left", None, key=key, instance_id=instance_id, reason=reason)
                    if self._json
                    else f"- left    {instance_id}  {key}  ({reason})"
                )
        print(line, flush=True)


def cmd_instances(args: argparse.Namespace, config: Config) -> int:
    """List (or watch) the instances registered under a prefix."""
    prefix = resolve_prefix(args.prefix)
    with Runtime(config, handle_signals=args.watch) as rt:
        store: KeyValueStore = open_store(config.discovery, config.nats)
        rt.io.run(store.connect())
        try:
            if args.watch:
                printer = rt.spawn(lambda: _Printer(args.json), name="instances-printer")
                watcher = rt.spawn(
                    lambda: WatcherActor(store, prefix, _decode), name="instances-watcher"
                )
                watcher.ask(Subscribe(printer))
                if not args.json:
                    print(f"watching {prefix} on {store.name} (Ctrl-C to stop)", file=sys.stderr)
                rt.wait_for_shutdown()
                return 0
            items, _ = rt.io.run(store.list(prefix))
            records = []
            for kv in items:
                if kv.lease is None:
                    print(f"troupe: ignoring {kv.key}: {UNLEASED}", file=sys.stderr)
                    continue
                try:
                    records.append(decode_record(kv.value, key=kv.key))
                except DiscoveryError as exc:
                    print(f"troupe: skipping {kv.key}: {exc}", file=sys.stderr)
            if args.json:
                for record in records:
                    print(_json_line(None, record))
            else:
                print(format_instances(records))
            return 0
        finally:
            rt.system.shutdown()
            rt.io.run(store.close())
