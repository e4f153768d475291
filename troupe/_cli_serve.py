"""``troupe worker``: serve a handler on an endpoint, in this process or in N supervised ones."""

from __future__ import annotations

import argparse
import sys

from troupe._handlers import load_handler
from troupe.config import Config
from troupe.errors import ConfigError
from troupe.runtime import Runtime

__all__ = ["add_worker_arguments", "cmd_worker"]


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
