"""The ``troupe`` command: operator tools sharing the runtime's configuration.

Every subcommand resolves the configuration from the environment first, so a bad variable is
reported the same way everywhere: one line naming the variable, the value and the valid choices,
and exit status 2 — never a traceback. A request that cannot be sent (``troupe call`` given text
that is not JSON) is one line and status 2 too; any other troupe error is one line and status 1
(a handler's failure is preceded by the worker's traceback when the worker logs at debug level).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from troupe import (
    _cli_discovery,
    _cli_events,
    _cli_frontend,
    _cli_mocker,
    _cli_serve,
    _cli_status,
)
from troupe._version import __version__
from troupe.config import Config, format_table
from troupe.errors import ConfigError, InvalidRequest, RemoteError, TroupeError

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_CONFIG = 2


def _cmd_config(args: argparse.Namespace, config: Config) -> int:
    """Print the effective configuration as a table (secrets masked)."""
    print(format_table(config.describe()))
    if config.unknown:
        print(
            "\nnot troupe settings, ignored (typos?): " + ", ".join(sorted(config.unknown)),
            file=sys.stderr,
        )
    return 0


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """For subcommands that take no options."""


Handler = Callable[[argparse.Namespace, Config], int]

# Subcommand name -> (handler, options, help). Later layers add rows here.
_COMMANDS: dict[str, tuple[Handler, Callable[[argparse.ArgumentParser], None], str]] = {
    "config": (
        _cmd_config,
        _no_arguments,
        "print the effective configuration resolved from the environment",
    ),
    "worker": (
        _cli_serve.cmd_worker,
        _cli_serve.add_worker_arguments,
        "serve HANDLER (module:function) on ENDPOINT; --workers N for N processes",
    ),
    "call": (
        _cli_serve.cmd_call,
        _cli_serve.add_call_arguments,
        "send a request to ENDPOINT and print each streamed chunk as a JSON line",
    ),
    "status": (
        _cli_status.cmd_status,
        _cli_status.add_arguments,
        "show each instance at work: state, load, requests, errors (--watch, --json)",
    ),
    "instances": (
        _cli_discovery.cmd_instances,
        _cli_discovery.add_arguments,
        "list (or --watch) the instances registered in discovery",
    ),
    "events": (
        _cli_events.cmd_events,
        _cli_events.add_arguments,
        "print the events of a component's topic (KV events by default) as JSON lines",
    ),
    "frontend": (
        _cli_frontend.cmd_frontend,
        _cli_frontend.add_arguments,
        "serve the OpenAI-compatible HTTP API over the models registered in discovery",
    ),
    "mocker": (
        _cli_mocker.cmd_mocker,
        _cli_mocker.add_arguments,
        "serve the mock LLM engine with a simulated KV cache, publishing its KV events",
    ),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="troupe", description="troupe: an actor runtime for distributed serving"
    )
    parser.add_argument("--version", action="version", version=f"troupe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, add_arguments, help_text) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    handler = _COMMANDS[args.command][0]
    try:
        config = Config.from_env()
        return handler(args, config)
    except ConfigError as exc:
        print(f"troupe: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except InvalidRequest as exc:  # what the user typed cannot be sent (bad JSON): a usage error
        print(f"troupe: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TroupeError as exc:
        if isinstance(exc, RemoteError) and exc.remote_traceback:
            # Sent only by a worker logging at debug level: shown as Python shows one, before
            # the error's own line.
            print("the worker's traceback:", file=sys.stderr)
            print(exc.remote_traceback.rstrip("\n"), file=sys.stderr)
        print(f"troupe: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
