"""``troupe frontend``: the OpenAI-compatible HTTP frontend, on the main thread's event loop."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
from collections.abc import Callable

from troupe.actors.routing import KvRouterSettings
from troupe.config import Config
from troupe.errors import ConfigError
from troupe.frontend import ROUTER_MODES, Frontend, FrontendSettings, FrontendTls
from troupe.runtime import Runtime

__all__ = ["add_arguments", "cmd_frontend"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``frontend`` subcommand's options."""
    parser.add_argument(
        "--host",
        default=None,
        help="address to bind; 0.0.0.0 for every interface (default: DYN_HTTP_HOST, else "
        "127.0.0.1: this host only)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="port to bind; 0 lets the OS pick (default: DYN_HTTP_PORT, else 8000)",
    )
    tls = parser.add_argument_group("HTTPS and API key (see docs/security.md)")
    tls.add_argument(
        "--tls-cert-path",
        default=None,
        metavar="PEM",
        help="server certificate; with --tls-key-path serves HTTPS (default: DYN_TLS_CERT_PATH)",
    )
    tls.add_argument(
        "--tls-key-path",
        default=None,
        metavar="PEM",
        help="private key of --tls-cert-path (default: DYN_TLS_KEY_PATH)",
    )
    tls.add_argument(
        "--tls-client-ca-cert-path",
        default=None,
        metavar="PEM",
        help="CA certificates of the clients: every client must present a certificate one of "
        "them signed (mutual TLS; default: DYN_TLS_CLIENT_CA_CERT_PATH)",
    )
    tls.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require Authorization: Bearer KEY on every route but /health and /live "
        "(default: DYN_HTTP_API_KEY, which other users of this host cannot read in ps)",
    )
    parser.add_argument(
        "--router-mode",
        default="round_robin",
        choices=ROUTER_MODES,
        help="how to pick a worker for each request (default: round_robin; kv: the worker "
        "that holds most of the prompt's prefix in its KV cache, weighed against its load)",
    )
    kv = parser.add_argument_group("KV-aware routing (--router-mode kv)")
    kv.add_argument(
        "--kv-cache-block-size",
        type=int,
        default=16,
        metavar="TOKENS",
        help="tokens per KV block; must match the workers' (default 16)",
    )
    kv.add_argument(
        "--kv-overlap-score-weight",
        type=float,
        default=1.0,
        metavar="W",
        help="weight of prefill cost (uncached blocks) against decode load (default 1.0)",
    )
    kv.add_argument(
        "--router-temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="0: always the cheapest worker; > 0: sample by softmax of the costs (default 0)",
    )
    kv.add_argument(
        "--active-decode-blocks-threshold",
        type=float,
        default=None,
        metavar="FRACTION",
        help="skip a worker whose active blocks exceed this fraction of its KV capacity; "
        "all busy: 503 with Retry-After (default: none)",
    )
    kv.add_argument(
        "--no-kv-events",
        action="store_true",
        help="approximate mode: predict caches from routing decisions; opens no event plane "
        "(NATS is never contacted)",
    )
    kv.add_argument(
        "--router-replica-sync",
        action="store_true",
        help="share active requests with the other frontends' routers over the event plane, "
        "so each counts the others' load (best effort)",
    )
    kv.add_argument(
        "--durable-kv-events",
        action="store_true",
        help="KV events kept in a NATS JetStream stream (DYN_DURABLE_KV_EVENTS): a router "
        "started later replays them",
    )
    parser.add_argument(
        "--migration-limit",
        type=int,
        default=0,
        metavar="N",
        help="resume a generation on another worker up to N times if its worker fails "
        "(default 0: off, the failure reaches the client)",
    )
    parser.add_argument(
        "--max-body-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest request body accepted, else 413 (default: DYN_TCP_MAX_MESSAGE_SIZE)",
    )
    parser.add_argument(
        "--overload-tries",
        type=int,
        default=3,
        metavar="N",
        help="instances a request tries while they answer overloaded (default 3)",
    )
    parser.add_argument(
        "--router-idle",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a model's router is kept after its last worker left (default 30)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long in-flight requests may finish on SIGTERM/SIGINT (default 5)",
    )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop  # noqa: PLC0415 - optional dependency (extra "fast")
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


async def _serve(rt: Runtime, settings: FrontendSettings) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        frontend = await Frontend(rt, settings).start()
        print(f"frontend listening on {frontend.listening}", flush=True)
        await frontend.serve_until(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _kv_settings(args: argparse.Namespace) -> KvRouterSettings:
    try:
        return KvRouterSettings(
            block_size=args.kv_cache_block_size,
            overlap_weight=args.kv_overlap_score_weight,
            temperature=args.router_temperature,
            busy_threshold=args.active_decode_blocks_threshold,
            approximate=args.no_kv_events,
            replica_sync=args.router_replica_sync,
        )
    except ConfigError as exc:
        flag = _KV_FLAGS.get(str(exc.variable), str(exc.variable))
        raise exc.naming(flag) from None


_OPTIONS = ("host", "port", "tls_cert_path", "tls_key_path", "tls_client_ca_cert_path", "api_key")
"""The options that override the environment's ``frontend`` section."""

_KV_FLAGS = {
    "block_size": "--kv-cache-block-size",
    "overlap_weight": "--kv-overlap-score-weight",
    "temperature": "--router-temperature",
    "busy_threshold": "--active-decode-blocks-threshold",
}


def cmd_frontend(args: argparse.Namespace, config: Config) -> int:
    """Serve until SIGINT/SIGTERM; then drain (``--grace``) and exit 0."""
    listen = config.frontend
    for option in _OPTIONS:  # validated like the environment's values
        value = getattr(args, option)
        if value is not None:
            try:
                listen = dataclasses.replace(listen, **{option: value})
            except ConfigError as exc:
                shown = "****" if option == "api_key" else value
                flag = "--" + option.replace("_", "-")
                raise exc.naming(flag, shown) from None
    settings = FrontendSettings(
        tls=FrontendTls.from_paths(
            listen.tls_cert_path, listen.tls_key_path, listen.tls_client_ca_cert_path
        ),
        api_key=listen.api_key,
        host=listen.host,
        port=listen.port,
        router_mode=args.router_mode,
        migration_limit=args.migration_limit,
        grace=args.grace,
        max_body_size=args.max_body_size,
        overload_tries=args.overload_tries,
        router_idle=args.router_idle,
        kv=_kv_settings(args) if args.router_mode == "kv" else None,
    )
    if args.durable_kv_events:
        config = dataclasses.replace(
            config, events=dataclasses.replace(config.events, durable=True)
        )
    with (
        Runtime(config, handle_signals=False) as rt,
        asyncio.Runner(loop_factory=_loop_factory()) as runner,
    ):
        runner.run(_serve(rt, settings))
    return 0
