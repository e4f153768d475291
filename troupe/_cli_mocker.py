"""``troupe mocker``: serve the mock LLM engine with a KV cache, publishing its KV events.

What ``python -m dynamo.mocker`` is to NVIDIA Dynamo: a worker with no GPU whose timing follows
its simulated KV cache (prefill charged for uncached tokens only), for trying KV-aware routing,
benchmarks and tests. It publishes KV events on the event plane (``DYN_EVENT_PLANE``) unless
``--no-kv-events``, and announces ``kv_block_size`` and ``kv_total_blocks`` in its record.
"""

from __future__ import annotations

import argparse
import sys

from troupe.config import Config
from troupe.demo.mocker import MockerConfig, kv_mocker
from troupe.errors import ConfigError
from troupe.runtime import Runtime

__all__ = ["add_arguments", "cmd_mocker"]

_DEFAULTS = MockerConfig()

_ENGINE_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("block_size", int, "tokens per KV block"),
    ("num_gpu_blocks", int, "KV cache capacity in blocks"),
    ("max_num_seqs", int, "requests running at once"),
    ("prefill_tokens_per_second", float, "prefill speed"),
    ("tokens_per_second", float, "decode speed per request"),
    ("output_tokens", int, "tokens per answer unless max_tokens says fewer"),
    ("speedup_ratio", float, "divide every simulated duration by this"),
)
"""The engine's options: ``MockerConfig`` field, type, help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``mocker`` subcommand's options."""
    parser.add_argument("endpoint", metavar="ENDPOINT", help="ns.component.endpoint to serve")
    parser.add_argument("--model", default="troupe-mock", help="model name (default troupe-mock)")
    for field, kind, text in _ENGINE_OPTIONS:
        default = getattr(_DEFAULTS, field)
        parser.add_argument(
            "--" + field.replace("_", "-"),
            type=kind,
            default=default,
            help=f"{text} (default {default:g})",
        )
    parser.add_argument(
        "--no-kv-events", action="store_true", help="publish no KV events (no event plane)"
    )


def cmd_mocker(args: argparse.Namespace, config: Config) -> int:
    """Serve until SIGINT/SIGTERM; then unregister, drain and exit 0."""
    try:
        engine = MockerConfig(**{field: getattr(args, field) for field, _, _ in _ENGINE_OPTIONS})
    except ConfigError as exc:
        raise exc.naming("--" + exc.variable.replace("_", "-")) from None
    with Runtime(config) as rt:
        endpoint = rt.endpoint(args.endpoint)
        mocker, metadata = kv_mocker(rt, endpoint, engine, events=not args.no_kv_events)
        rt.serve(endpoint, mocker.generate, metadata={"model": args.model, **metadata})
        events = "no KV events" if args.no_kv_events else f"KV events on {config.events.plane}"
        print(
            f"troupe: mocker serving {args.model} on {endpoint.path} at {rt.server().address} "
            f"as instance {rt.instance_id}, {engine.num_gpu_blocks} blocks of "
            f"{engine.block_size} tokens, {events} (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        rt.wait_for_shutdown()
    return 0
