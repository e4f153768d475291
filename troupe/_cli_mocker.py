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
from troupe.demo.mocker import Mocker, MockerConfig
from troupe.errors import ConfigError
from troupe.runtime import Runtime

__all__ = ["add_arguments", "cmd_mocker"]

_DEFAULTS = MockerConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``mocker`` subcommand's options."""
    parser.add_argument("endpoint", metavar="ENDPOINT", help="ns.component.endpoint to serve")
    parser.add_argument("--model", default="troupe-mock", help="model name (default troupe-mock)")
    parser.add_argument(
        "--block-size",
        type=int,
        default=_DEFAULTS.block_size,
        help=f"tokens per KV block (default {_DEFAULTS.block_size})",
    )
    parser.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=_DEFAULTS.num_gpu_blocks,
        help=f"KV cache capacity in blocks (default {_DEFAULTS.num_gpu_blocks})",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=_DEFAULTS.max_num_seqs,
        help=f"requests running at once (default {_DEFAULTS.max_num_seqs})",
    )
    parser.add_argument(
        "--prefill-tokens-per-second",
        type=float,
        default=_DEFAULTS.prefill_tokens_per_second,
        help=f"prefill speed (default {_DEFAULTS.prefill_tokens_per_second:g})",
    )
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=_DEFAULTS.tokens_per_second,
        help=f"decode speed per request (default {_DEFAULTS.tokens_per_second:g})",
    )
    parser.add_argument(
        "--output-tokens",
        type=int,
        default=_DEFAULTS.output_tokens,
        help=f"tokens per answer unless max_tokens says fewer (default {_DEFAULTS.output_tokens})",
    )
    parser.add_argument(
        "--speedup-ratio",
        type=float,
        default=_DEFAULTS.speedup_ratio,
        help="divide every simulated duration by this (default 1)",
    )
    parser.add_argument(
        "--no-kv-events", action="store_true", help="publish no KV events (no event plane)"
    )


def cmd_mocker(args: argparse.Namespace, config: Config) -> int:
    """Serve until SIGINT/SIGTERM; then unregister, drain and exit 0."""
    try:
        engine = MockerConfig(
            block_size=args.block_size,
            num_gpu_blocks=args.num_gpu_blocks,
            max_num_seqs=args.max_num_seqs,
            prefill_tokens_per_second=args.prefill_tokens_per_second,
            tokens_per_second=args.tokens_per_second,
            output_tokens=args.output_tokens,
            speedup_ratio=args.speedup_ratio,
        )
    except ConfigError as exc:
        flag = "--" + str(exc.variable).replace("_", "-")
        raise ConfigError(flag, exc.value, exc.expected, exc.choices) from None
    with Runtime(config) as rt:
        endpoint = rt.endpoint(args.endpoint)
        sink = None if args.no_kv_events else rt.kv_events(endpoint, block_size=engine.block_size)
        mocker = Mocker(engine, sink=sink)
        rt.metrics.registry.register(mocker.collector())
        metadata = {
            "model": args.model,
            "kv_block_size": engine.block_size,
            "kv_total_blocks": engine.num_gpu_blocks,
        }
        rt.serve(endpoint, mocker.generate, metadata=metadata)
        events = "no KV events" if sink is None else f"KV events on {config.events.plane}"
        print(
            f"troupe: mocker serving {args.model} on {endpoint.path} at {rt.server().address} "
            f"as instance {rt.instance_id}, {engine.num_gpu_blocks} blocks of "
            f"{engine.block_size} tokens, {events} (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        rt.wait_for_shutdown()
    return 0
