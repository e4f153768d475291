"""``troupe worker`` (serve a handler, in this process or N supervised ones) and ``troupe call``.

``troupe worker --workers N`` supervises N worker processes (:meth:`Runtime.spawn_workers`). Each
of them is ``troupe worker`` again, given the readiness channel with ``--ready-fd`` (not shown in
``--help``): it reports ``serving``, or its start-up error, to the parent instead of printing it,
so that a fleet that cannot start says so once, in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import types
from collections.abc import Callable
from typing import Any

from troupe._fleet import LABEL_FLAG, parse_label
from troupe._handlers import load_handler, serve_loaded
from troupe._readiness import READY_FD_FLAG, Draining, Failed, ParentLink, Serving, one_line
from troupe._shutdown import SignalHandlers
from troupe._support._logging import get_logger
from troupe.actors import ActorRef, Router, WhichChildren
from troupe.actors._process import ProcessStatus, Status
from troupe.config import Config
from troupe.errors import (
    ConfigError,
    IncompatibleInstances,
    InvalidRequest,
    NoInstances,
    SupervisorEscalation,
    TroupeError,
)
from troupe.messages._endpoint import Endpoint
from troupe.runtime import Runtime

__all__ = ["add_call_arguments", "add_worker_arguments", "cmd_call", "cmd_worker"]

_log = get_logger("troupe.cli")

# The statuses of troupe.cli (not imported: it imports this module).
_EXIT_ERROR = 1
_EXIT_CONFIG = 2


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
    parser.add_argument(READY_FD_FLAG, type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(LABEL_FLAG, default=None, help=argparse.SUPPRESS)


def cmd_worker(args: argparse.Namespace, config: Config) -> int:
    """Serve until SIGINT/SIGTERM; then unregister, drain and exit 0.

    With ``--workers N``: exit 1 with one line if a worker fails to start, or if the workers
    keep crashing until their supervisor gives up.
    """
    if args.workers < 1:
        raise ConfigError("--workers", args.workers, "an integer >= 1")
    if args.max_inflight is not None and args.max_inflight < 0:
        raise ConfigError("--max-inflight", args.max_inflight, "an integer >= 0")
    if args.ready_fd is not None:
        return _serve_supervised(args, config)
    handler = load_handler(args.handler)
    with Runtime(config) as rt:
        endpoint = rt.endpoint(args.endpoint)
        if args.workers > 1:
            return _serve_fleet(rt, endpoint, args)
        metadata = {"model": args.model} if args.model else None
        serve_loaded(rt, endpoint, handler, max_inflight=args.max_inflight, metadata=metadata)
        print(
            f"troupe: serving {endpoint.path} at {rt.server().address} "
            f"as instance {rt.instance_id} (Ctrl-C to stop)",
            file=sys.stderr,
            flush=True,
        )
        rt.wait_for_shutdown()
    return 0


def _serve_fleet(rt: Runtime, endpoint: Endpoint, args: argparse.Namespace) -> int:
    """Supervise ``--workers`` processes until a signal, or until their supervisor gives up."""
    supervisor = rt.spawn_workers(
        endpoint,
        args.handler,
        args.workers,
        max_inflight=args.max_inflight,
        model=args.model,
        ready_timeout=None,  # loading a model may take long; /health says notready meanwhile
    )
    addresses = [s.serving.address for s in _statuses(supervisor) if s.serving is not None]
    print(
        f"troupe: {args.workers} worker processes serving {endpoint.path} at "
        f"{', '.join(addresses)} (Ctrl-C to stop)",
        file=sys.stderr,
        flush=True,
    )
    try:
        rt.wait_for_shutdown()
    except SupervisorEscalation as exc:
        last = f"; last: {exc.__cause__}" if exc.__cause__ is not None else ""
        print(
            f"troupe: error: the worker processes of {endpoint.path} kept exiting (more than "
            f"{exc.restarts} restarts within {exc.window:g} s){last}; stopped them all",
            file=sys.stderr,
            flush=True,
        )
        return _EXIT_ERROR
    return 0


def _statuses(supervisor: ActorRef[Any]) -> list[ProcessStatus]:
    """Each worker process's status, in worker order."""
    statuses = []
    for child in supervisor.ask(WhichChildren()):
        if child.ref is not None:
            try:
                statuses.append(child.ref.ask(Status()))
            except TroupeError:
                pass  # it crashed meanwhile; its replacement reports when it serves
    return statuses


def _serve_supervised(args: argparse.Namespace, config: Config) -> int:
    """A worker of ``--workers N``: report to the parent on the readiness channel and serve."""
    link = ParentLink(args.ready_fd)
    signals = _SignalPolicy()
    signals.install()
    serving = False
    try:
        handler = load_handler(args.handler)
        label = None if args.worker_label is None else parse_label(args.worker_label)
        with Runtime(config, handle_signals=False, label=label) as rt:
            endpoint = rt.endpoint(args.endpoint)
            metadata = {"model": args.model} if args.model else None
            serve_loaded(rt, endpoint, handler, max_inflight=args.max_inflight, metadata=metadata)
            address = rt.server().address
            status_url = rt.status.url if rt.status is not None else None
            serving = True
            signals.serving(rt.request_shutdown)
            if not link.report(Serving(os.getpid(), rt.instance_id, address, status_url)):
                rt.request_shutdown()  # the parent is gone already
            link.watch_parent(rt.request_shutdown)
            status = f", status at {status_url}" if status_url is not None else ""
            who = "" if label is None else f"[{label.label} {os.getpid()}] "
            print(
                f"{who}troupe: serving {endpoint.path} at {address} as instance {rt.instance_id}"
                f"{status}",
                file=sys.stderr,
                flush=True,
            )
            rt.wait_for_shutdown()
            link.report(Draining())
    except TroupeError as exc:
        if serving:
            raise
        # The parent prints it, once for the whole fleet: nothing here.
        config_error = isinstance(exc, ConfigError)
        link.report(Failed(one_line(str(exc)), config=config_error))
        return _EXIT_CONFIG if config_error else _EXIT_ERROR
    finally:
        signals.restore()
        link.close()
    return 0


class _SignalPolicy(SignalHandlers):
    """SIGINT/SIGTERM in a supervised worker.

    Before it serves, the first signal exits at once and quietly (the parent is stopping the
    fleet and has its own line to print); once it serves, a signal asks ``stop`` (the runtime's
    ``request_shutdown``) and the worker unregisters and drains. A later signal never unwinds a
    stop in progress.
    """

    def __init__(self) -> None:
        super().__init__()
        self._stop: Callable[[], None] | None = None
        self._exiting = False

    def serving(self, stop: Callable[[], None]) -> None:
        self._stop = stop

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        if self._stop is not None:
            _log.info("signal received, draining", signal=signal.Signals(signum).name)
            self._stop()
        elif not self._exiting:
            # Still starting: it holds nothing worth a clean-up (no request, nothing reported;
            # a lease it may hold expires), and unwinding could wait on a connect in progress
            # (an unreachable store) past the parent's patience. Leave now.
            self._exiting = True
            os._exit(128 + signum)


def add_call_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``call`` subcommand's options."""
    parser.add_argument("endpoint", metavar="ENDPOINT", help="ns.component.endpoint (or dyn://…)")
    parser.add_argument(
        "request",
        metavar="JSON",
        nargs="?",
        default="null",
        help="the request as JSON, or - to read it from standard input (for large ones); "
        "default: null",
    )
    parser.add_argument(
        "--policy",
        default="round_robin",
        choices=("round_robin", "random", "least_loaded"),
        help="how to pick an instance (default: %(default)s)",
    )
    parser.add_argument(
        "--instance", default=None, metavar="ID", help="send to this instance (default: any)"
    )
    parser.add_argument(
        "--count",
        type=int,
        default=1,
        metavar="N",
        help="send the request N times (default: %(default)s)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for a first instance when none is known yet, saying so on "
        "stderr (default: %(default)g; 0: fail at once)",
    )


_QUIET_WAIT = 0.25
"""Seconds ``troupe call`` waits for a first instance before saying that it waits: discovery
usually answers well within it."""

_JSON_SHOWN = 60
"""Characters of a request that is not valid JSON shown in the error, from its start."""


def _parse_request(text: str) -> Any:
    """The request ``text`` decoded from JSON.

    Raises:
        InvalidRequest: it is not valid JSON; the message has the parser's reason with line
            and column, and the text (its start when long).
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if not text.strip():
            raise InvalidRequest("the request is empty: expected JSON such as null or {}") from exc
        shown = repr(text) if len(text) <= _JSON_SHOWN else f"{text[:_JSON_SHOWN]!r}..."
        if len(text) > _JSON_SHOWN:
            shown += f" ({len(text)} characters)"
        raise InvalidRequest(f"the request is not valid JSON: {exc}, in {shown}") from exc


def _wait_for_instances(router: Router, endpoint: str, wait: float) -> bool:
    """Wait up to ``wait`` seconds for an instance, saying on stderr that it waits unless one
    is known at once; ``False`` if none appeared.

    Raises:
        IncompatibleInstances: only instances of another wire version appeared.
    """
    quiet = min(wait, _QUIET_WAIT)
    if _instances_within(router, quiet, last=wait <= quiet):
        return True
    if wait <= quiet:
        return False
    print(
        f"troupe: no instance of {endpoint} known yet; waiting up to {wait:g} s (--wait)",
        file=sys.stderr,
        flush=True,
    )
    return _instances_within(router, wait - quiet, last=True)


def _instances_within(router: Router, timeout: float, *, last: bool) -> bool:
    try:
        router.wait_for_instances_sync(timeout=timeout)
    except IncompatibleInstances:
        if last:
            raise
        return False
    except NoInstances:
        return False
    return True


def cmd_call(args: argparse.Namespace, config: Config) -> int:
    """Send the request and print each chunk as one JSON line."""
    text = sys.stdin.read() if args.request == "-" else args.request
    request = _parse_request(text)
    if args.count < 1:
        raise ConfigError("--count", args.count, "an integer >= 1")
    with Runtime(config) as rt:
        endpoint = rt.endpoint(args.endpoint)
        router = rt.router(endpoint, policy=args.policy)
        if args.wait > 0 and not _wait_for_instances(router, endpoint.path, args.wait):
            print(
                f"troupe: error: no instance of {endpoint.path} appeared within {args.wait:g} s "
                "(--wait): is a worker serving it, with the same discovery settings?",
                file=sys.stderr,
            )
            return _EXIT_ERROR
        for _ in range(args.count):
            for chunk in router.generate_sync(request, instance_id=args.instance):
                print(json.dumps(chunk, default=repr), flush=True)
    return 0
