"""``troupe status``: the fleet at work, per endpoint and instance.

Discovery says who is registered (like ``troupe instances``); each instance's own server says
how it is doing: its built-in ``troupe.status`` endpoint (:mod:`troupe._introspect`) answers on
the instance's request plane, whatever the plane, with no extra port. One call per worker process
(a process serving several endpoints answers once for all of them), all at once, each bounded by
``--timeout``. An instance that does not answer is shown as such (``unreachable``, or
``overloaded`` when it is at its admission limit), never hidden.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from troupe._cli_discovery import add_prefix_argument, resolve_prefix
from troupe._introspect import STATUS_ENDPOINT, EndpointStatus, ProcessStatus, decode_status
from troupe.actors.routing import choose_address
from troupe.config import Config
from troupe.discovery import KeyValueStore, open_store
from troupe.errors import ConfigError, InvalidRecord, Overloaded, TroupeError
from troupe.messages import InstanceRecord, decode_record
from troupe.messages._payload import decode_payload
from troupe.runtime import Runtime
from troupe.transports import NetworkManager

__all__ = ["Row", "add_arguments", "cmd_status", "format_rows", "gather"]

_COLUMNS: Final = (
    "ENDPOINT",
    "INSTANCE",
    "MODEL",
    "ADDRESS",
    "HOST:PID",
    "STATE",
    "INFLIGHT",
    "REQUESTS",
    "ERRORS",
    "UPTIME",
    "RESTARTS",
    "NOTE",
)
_STATUS_KEYS: Final = (
    "inflight",
    "max_inflight",
    "requests",
    "errors",
    "cancellations",
    "uptime",
    "worker",
    "restarts",
    "process",
)
# What a process that answers but no longer serves the registered endpoint reports for it.
_NOT_SERVED: Final = EndpointStatus("not served", 0, 0, 0, 0, 0)
_CLEAR: Final = "\x1b[H\x1b[J"  # cursor home, clear to the end: redraw in place


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``status`` subcommand's options."""
    add_prefix_argument(parser)
    parser.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    parser.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        default=None,
        type=float,
        metavar="SECONDS",
        help="refresh in place every SECONDS (2 when not given) until interrupted",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long each instance may take to answer (default: 2)",
    )


@dataclass(frozen=True, slots=True)
class Row:
    """One registered instance of one endpoint, and what its process said (or why it did not)."""

    record: InstanceRecord
    address: str
    status: ProcessStatus | None
    problem: str | None  # why there is no status: "unreachable: ...", "overloaded: ..."

    @property
    def path(self) -> str:
        return f"{self.record.namespace}.{self.record.component}.{self.record.endpoint}"

    def as_json(self) -> dict[str, Any]:
        """The row as a JSON object: the record's facts, then the endpoint's and process's."""
        record = self.record
        body: dict[str, Any] = {
            "endpoint": self.path,
            "instance_id": record.instance_id,
            "model": record.metadata.get("model"),
            "address": self.address,
            "host": record.host,
            "pid": record.pid,
        }
        status = self.status
        if status is None:  # the same keys, unknown
            body["state"] = self.problem.split(":", 1)[0] if self.problem else "unknown"
            body.update(dict.fromkeys(_STATUS_KEYS), error=self.problem)
            return body
        endpoint = status.endpoints.get(self.path, _NOT_SERVED)
        body.update(
            state=endpoint.state,
            inflight=endpoint.inflight,
            max_inflight=_limit(status, endpoint.max_inflight),
            requests=endpoint.requests,
            errors=endpoint.errors,
            cancellations=endpoint.cancellations,
            uptime=round(status.uptime, 3),
            worker=status.label,
            restarts=status.restarts,
            process={
                "inflight": status.inflight,
                "max_inflight": status.max_inflight,
                "max_inflight_per_caller": status.max_inflight_per_caller,
                "plane": status.plane,
            },
            error=None,
        )
        return body


def _limit(status: ProcessStatus, endpoint_limit: int) -> int:
    """The limit that binds first: the endpoint's own, or the process's (0: none)."""
    limits = [n for n in (endpoint_limit, status.max_inflight) if n > 0]
    return min(limits) if limits else 0


def _uptime(seconds: float) -> str:
    rest = int(seconds)
    days, rest = divmod(rest, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, rest = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{rest:02d}s"
    return f"{rest}s"


def _cells(row: Row) -> tuple[str, ...]:
    body = row.as_json()
    head = (
        body["endpoint"],
        body["instance_id"],
        body["model"] or "-",
        body["address"],
        f"{body['host']}:{body['pid']}",
    )
    if row.status is None:
        state, _, why = (row.problem or "unknown").partition(": ")
        return (*head, state, "-", "-", "-", "-", "-", why)
    limit = body["max_inflight"]
    worker = body["worker"]
    return (
        *head,
        body["state"],
        f"{body['inflight']}/{limit if limit else '-'}",
        str(body["requests"]),
        str(body["errors"]),
        _uptime(body["uptime"]),
        f"{body['restarts']} ({worker})" if worker else "-",
        "",
    )


def format_rows(rows: list[Row]) -> str:
    """A fixed-width table, one line per instance of each endpoint (header only when none)."""
    table = [_COLUMNS, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


async def _ask(network: NetworkManager, address: str, timeout: float) -> ProcessStatus | str:
    """The status of the process at ``address``, or why there is none."""
    try:
        async with asyncio.timeout(timeout):
            client = network.client_for(address)
            stream = await client.request(
                address, STATUS_ENDPOINT, b"", deadline=time.time() + timeout
            )
            async with stream:
                chunks = [decode_payload(chunk) async for chunk in stream]
    except TimeoutError:
        return f"unreachable: no answer within {timeout:g} s"
    except Overloaded as exc:
        return f"overloaded: {exc}"
    except TroupeError as exc:
        return f"unreachable: {type(exc).__name__}: {exc}"
    try:
        return decode_status(chunks[0])
    except (IndexError, msgspec.ValidationError) as exc:
        return f"unreachable: not a troupe status answer ({exc})"


async def gather(
    store: KeyValueStore, network: NetworkManager, prefix: str, timeout: float
) -> list[Row]:
    """Every leased, decodable instance under ``prefix``, with its process's status."""
    items, _ = await store.list(prefix)
    records: list[tuple[InstanceRecord, str]] = []
    for kv in items:
        if kv.lease is None:
            continue  # written by hand: routers ignore it (troupe instances names it)
        try:
            record = decode_record(kv.value, key=kv.key)
        except InvalidRecord:
            continue
        address = choose_address(record)
        if address is not None:
            records.append((record, address))
    addresses = sorted({address for _, address in records})
    answers = await asyncio.gather(*(_ask(network, a, timeout) for a in addresses))
    by_address = dict(zip(addresses, answers, strict=True))
    rows = []
    for record, address in records:
        answer = by_address[address]
        if isinstance(answer, str):
            rows.append(Row(record, address, None, answer))
        else:
            rows.append(Row(record, address, answer, None))
    rows.sort(key=lambda r: (r.path, r.record.instance_id))
    return rows


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    """Print the fleet's status once, or (``--watch``) redraw it until interrupted."""
    prefix = resolve_prefix(args.prefix)
    if not args.timeout > 0:
        raise ConfigError("--timeout", args.timeout, "a number of seconds > 0")
    if args.watch is not None and not args.watch > 0:
        raise ConfigError("--watch", args.watch, "a number of seconds > 0")
    with Runtime(config, handle_signals=args.watch is not None) as rt:
        store = open_store(config.discovery, config.nats)
        rt.io.run(store.connect())
        try:
            while True:
                rows = rt.io.run(gather(store, rt.network, prefix, args.timeout))
                _show(rows, args, store.name, prefix)
                if args.watch is None or rt.wait_for_shutdown(timeout=args.watch):
                    return 0
        except KeyboardInterrupt:  # Ctrl-C while gathering: how a watch ends too
            if args.watch is None:
                raise
            return 0
        finally:
            rt.io.run(store.close())


def _show(rows: list[Row], args: argparse.Namespace, store: str, prefix: str) -> None:
    if args.json:
        text = json.dumps([row.as_json() for row in rows])
    else:
        text = format_rows(rows)
        if args.watch is not None:
            stamp = time.strftime("%H:%M:%S")
            text = (
                f"{_CLEAR}troupe status {prefix} on {store} at {stamp}, every {args.watch:g} s "
                f"(Ctrl-C to stop)\n\n{text}"
            )
    print(text, flush=True)
    if not rows and not args.json and args.watch is None:
        print(f"troupe: no instances registered under {prefix}", file=sys.stderr)
