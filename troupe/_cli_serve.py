"""``troupe worker`` (serve a handler, in this process or N supervised ones) and ``troupe call``."""

from __future__ import annotations

import argparse
import json
import sys

from troupe._handlers import load_handler
from troupe.config import Config
from troupe.errors import ConfigError
from troupe.runtime import Runtime

__all__ = ["add_call_arguments", "add_worker_arguments", "cmd_call", "cmd_worker"]


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``worker`` subcommand's options."""
    parser.add_argument("endpoint", metavar="ENDPOINT", help="ns.component.endpoint (or dyn://…)")
    parser.add_argument(
        "handler", metavar="HANDLER", help="module:function or path/to/file.py:function"
    )
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N", help="run N supervised worker processes"
    )
    parser.add_argument(
        "--max-inflight", type=int, default=None, metavar="M", help="admission limit per worker"
    )
    parser.add_argument("--model", default=None, help="model name put in the instance metadata")


def cmd_worker(args: argparse.Namespace, config: Config) -> int:
    """Serve until SIGINT/SIGTERM; then unregister, drain and exit 0."""
    if args.workers < 1:
        raise ConfigError("--workers", args.workers, "an integer >= 1")
    if args.max_inflight is not None and args.max_inflight < 0:
        raise ConfigError("--max-inflight", args.max_inflight, "an integer >= 0")
    handler = load_handler(args.handler)
    with Runtime(config) as rt:
        endpoint = rt.endpoint(args.endpoint)
        if args.workers == 1:
            metadata = {"model": args.model} if args.model else None
            rt.serve(endpoint, handler, max_inflight=args.max_inflight, metadata=metadata)
            print(
                f"troupe: serving {endpoint.path} at {rt.server().address} "
                f"as instance {rt.instance_id} (Ctrl-C to stop)",
                file=sys.stderr,
                flush=True,
            )
        else:
            rt.spawn_workers(
                endpoint,
                args.handler,
                args.workers,
                max_inflight=args.max_inflight,
                model=args.model,
            )
            print(
                f"troupe: {args.workers} supervised worker processes serving {endpoint.path} "
                "(Ctrl-C to stop)",
                file=sys.stderr,
                flush=True,
            )
        rt.wait_for_shutdown()
    return 0


def add_call_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``call`` subcommand's options."""
    parser.add_argument("endpoint", metavar="ENDPOINT", help="ns.component.endpoint (or dyn://…)")
    parser.add_argument(
        "request",
        metavar="JSON",
        nargs="?",
        default="null",
        help="the request as JSON, or - to read it from standard input (for large ones)",
    )
    parser.add_argument(
        "--policy",
        default="round_robin",
        choices=("round_robin", "random", "least_loaded"),
        help="how to pick an instance",
    )
    parser.add_argument("--instance", default=None, metavar="ID", help="send to this instance")
    parser.add_argument(
        "--count", type=int, default=1, metavar="N", help="send the request N times"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for a first instance (0: fail at once)",
    )


def cmd_call(args: argparse.Namespace, config: Config) -> int:
    """Send the request and print each chunk as one JSON line."""
    text = sys.stdin.read() if args.request == "-" else args.request
    try:
        request = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("JSON", text[:80], f"a JSON document ({exc.msg})") from exc
    if args.count < 1:
        raise ConfigError("--count", args.count, "an integer >= 1")
    with Runtime(config) as rt:
        router = rt.router(rt.endpoint(args.endpoint), policy=args.policy)
        if args.wait > 0:
            router.wait_for_instances_sync(timeout=args.wait)
        for _ in range(args.count):
            for chunk in router.generate_sync(request, instance_id=args.instance):
                print(json.dumps(chunk, default=repr), flush=True)
    return 0
