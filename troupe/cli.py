"""The ``troupe`` command: operator tools sharing the runtime's configuration.

Every subcommand resolves the configuration from the environment first, so a bad variable is
reported the same way everywhere: one line naming the variable, the value and the valid choices,
and exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from troupe._version import __version__
from troupe.config import Config, format_table
from troupe.errors import ConfigError, TroupeError

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_CONFIG = 2


def _cmd_config(args: argparse.Namespace, config: Config) -> int:
    """Print the effective configuration as a table (secrets masked)."""
    print(format_table(config.describe()))
    return 0


# Subcommand name -> (handler, help). Later layers add rows here.
_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace, Config], int], str]] = {
    "config": (_cmd_config, "print the effective configuration resolved from the environment"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="troupe", description="troupe: an actor runtime for distributed serving"
    )
    parser.add_argument("--version", action="version", version=f"troupe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in _COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    handler, _ = _COMMANDS[args.command]
    try:
        config = Config.from_env()
        return handler(args, config)
    except ConfigError as exc:
        print(f"troupe: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TroupeError as exc:
        print(f"troupe: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
