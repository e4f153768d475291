"""A fleet: N ``troupe worker`` processes serving one endpoint under one supervisor.

:meth:`Runtime.spawn_workers <troupe.Runtime.spawn_workers>` (and ``troupe worker --workers N``)
builds a :class:`WorkerFleet`. The fleet

- plans each worker's configuration: with a fixed request-plane port, worker ``i`` serves on
  port + ``i`` (``DYN_TCP_RPC_PORT``, or ``DYN_HTTP_RPC_PORT`` whose default 8888 is fixed), and a
  range that would pass 65535 is refused before anything starts; with the status server on
  (``DYN_SYSTEM_PORT``), the parent keeps the port and each worker runs its own on a port the OS
  picks;
- starts a :class:`~troupe.actors.Supervisor` of :class:`~troupe.actors.ProcessActor` children
  that report on the readiness channel (:mod:`troupe._readiness`), and keeps each worker's state;
- waits until every worker serves, or raises the first start failure once the fleet is stopped;
- says whether the whole fleet serves (the parent's ``/health``), and tells its owner when the
  supervisor gives up later.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from troupe._introspect import ProcessLabel
from troupe._readiness import one_line
from troupe._support._logging import get_logger
from troupe.actors import ActorRef, ActorSystem, Backoff, ChildSpec, Down, Intensity, Supervisor
from troupe.actors._process import ProcessActor, ProcessState, ProcessStatus
from troupe.actors._worker import WorkerState
from troupe.config import Config, RequestPlaneConfig
from troupe.errors import ActorDead, ConfigError, StartFailed, TroupeError
from troupe.messages._endpoint import Endpoint

__all__ = ["LABEL_FLAG", "WorkerFleet", "parse_label", "worker_configs"]

LABEL_FLAG = "--worker-label"
"""The hidden ``troupe worker`` option naming a supervised worker: ``worker-2:3`` (its id, and
how many times it was restarted)."""


def parse_label(text: str) -> ProcessLabel:
    """``worker-2:3`` -> ``ProcessLabel("worker-2", 3)``.

    Raises:
        ConfigError: not ``NAME:RESTARTS``.
    """
    name, _, restarts = text.rpartition(":")
    if not name or not restarts.isdigit():
        raise ConfigError(LABEL_FLAG, text, "NAME:RESTARTS, e.g. worker-2:0")
    return ProcessLabel(name, int(restarts))


_log = get_logger("troupe.fleet")

_MAX_PORT = 65_535
_PORT_VARIABLES = {"tcp": "DYN_TCP_RPC_PORT", "http": "DYN_HTTP_RPC_PORT"}


def worker_configs(config: Config, processes: int) -> list[Config]:
    """The configuration of each of ``processes`` workers started by a process with ``config``.

    Raises:
        ConfigError: ``processes`` < 1, or the consecutive ports would pass 65535.
    """
    if processes < 1:
        raise ConfigError("processes", processes, "an integer >= 1")
    plane = config.request_plane
    system = config.system
    if system.enabled:
        system = dataclasses.replace(system, port=0)  # the parent serves the configured port
    base = {"tcp": plane.tcp.port, "http": plane.http.port}.get(plane.plane, 0)
    if base and base + processes - 1 > _MAX_PORT:
        raise ConfigError(
            _PORT_VARIABLES[plane.plane],
            base,
            f"a port <= {_MAX_PORT - processes + 1}: worker i of {processes} serves on port + i",
        )
    return [
        dataclasses.replace(config, request_plane=_on_port(plane, base + n), system=system)
        if base
        else dataclasses.replace(config, system=system)
        for n in range(processes)
    ]


def _on_port(plane: RequestPlaneConfig, port: int) -> RequestPlaneConfig:
    """``plane`` with its own transport's server port set to ``port``."""
    if plane.plane == "tcp":
        return dataclasses.replace(plane, tcp=dataclasses.replace(plane.tcp, port=port))
    return dataclasses.replace(plane, http=dataclasses.replace(plane.http, port=port))


class WorkerFleet:
    """N worker processes for one endpoint: their plan, their supervisor, their states.

    Args:
        config: the parent's configuration (each worker's is derived with :func:`worker_configs`).
        endpoint: the endpoint served.
        command: the worker command after ``python -m troupe`` (``worker ENDPOINT HANDLER ...``).
        processes: how many workers.
        log_dir: worker ``n`` writes to ``log_dir/worker-n.log`` (appended) when given.

    Raises:
        ConfigError: see :func:`worker_configs`.
    """

    def __init__(
        self,
        config: Config,
        endpoint: Endpoint,
        command: Sequence[str],
        processes: int,
        *,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.name = f"workers-{endpoint.path}"
        self._configs = worker_configs(config, processes)
        self._argv = [sys.executable, "-m", "troupe", *command]
        self._log_dir = None if log_dir is None else Path(log_dir)
        # A worker gets its drain time, then a few seconds to unregister and exit, then SIGKILL.
        self._stop_timeout = config.worker.graceful_shutdown_timeout + 5.0
        self._ids = [f"worker-{n}" for n in range(processes)]
        self._changed = threading.Condition()
        self._statuses: dict[str, ProcessStatus] = {}
        self._down = False
        self._failure: BaseException | None = None
        self._on_failure: Callable[[BaseException], None] | None = None
        self.supervisor: ActorRef[Any] | None = None
        """The supervisor's ref once started (ask it ``WhichChildren()``)."""

    # --- lifecycle -----------------------------------------------------------------------------

    def start(
        self,
        system: ActorSystem,
        *,
        intensity: Intensity | None = None,
        backoff: Backoff | None = None,
    ) -> ActorRef[Any]:
        """Spawn the supervisor, which starts the workers; returns its ref at once."""
        children = [
            ChildSpec(
                child_id,
                self._process_factory(child_id, config),
                shutdown_timeout=self._stop_timeout + 5.0,
            )
            for child_id, config in zip(self._ids, self._configs, strict=True)
        ]
        ref = system.spawn(
            lambda: Supervisor(
                children,
                intensity=intensity or Intensity(max_restarts=5, within=30.0),
                backoff=backoff or Backoff(min=0.2, max=5.0, jitter=0.2),
                stop_together=True,
            ),
            name=self.name,
        )
        self.supervisor = ref
        system.watch(ref, self._supervisor_down)
        return ref

    def _process_factory(self, child_id: str, config: Config) -> Callable[[], ProcessActor]:
        """What the supervisor calls to start (and restart) worker ``child_id``: the command
        names the worker and how many times it was restarted (its log lines and
        ``troupe status`` show both)."""
        env = config.child_environment()
        log = None if self._log_dir is None else self._log_dir / f"{child_id}.log"
        starts = itertools.count()

        def start() -> ProcessActor:
            argv = [*self._argv, LABEL_FLAG, f"{child_id}:{next(starts)}"]
            return ProcessActor(
                argv,
                env,
                stop_timeout=self._stop_timeout,
                log=log,
                readiness=True,
                on_status=functools.partial(self._on_status, child_id),
            )

        return start

    def wait_ready(self, timeout: float | None) -> None:
        """Block until every worker serves.

        Raises:
            StartFailed: a worker failed before it served (the fleet is stopped by then), or
                not every worker served within ``timeout`` seconds (the caller stops the fleet).
            SupervisorEscalation: the fleet gave up meanwhile.
        """
        with self._changed:
            done = self._changed.wait_for(
                lambda: self._failure is not None or self._down or self._all_serving(), timeout
            )
            failure, down = self._failure, self._down
        if failure is not None:
            raise failure
        if down:
            raise StartFailed(self.name, "stopped before every worker served")
        if not done:
            raise StartFailed(self.name, f"not every worker served within {timeout:g} s")

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback(error)`` once if the supervisor stops with an error (at once if it
        already has), from the supervisor's thread: the fleet has given up."""
        with self._changed:
            failure = self._failure
            if failure is None:
                self._on_failure = callback
        if failure is not None:
            callback(failure)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the supervisor and its workers (SIGTERM, SIGKILL after their stop timeout)."""
        if self.supervisor is not None:
            self.supervisor.stop(timeout=timeout)

    # --- what the fleet says -------------------------------------------------------------------

    def state(self) -> WorkerState:
        """``serving`` only while every worker serves; for the status server's readiness."""
        with self._changed:
            if self._down:
                return "stopped"
            if self._all_serving():
                return "serving"
            if any(s.state == "draining" for s in self._statuses.values()):
                return "draining"
            return "starting"

    def describe(self) -> dict[str, dict[str, object]]:
        """Each worker's state, pid, address and status URL, for the health body."""
        with self._changed:
            statuses = dict(self._statuses)
        described: dict[str, dict[str, object]] = {}
        for child_id in self._ids:
            status = statuses.get(child_id)
            state: ProcessState = status.state if status is not None else "starting"
            row: dict[str, object] = {"status": "ready" if state == "serving" else "notready"}
            row["state"] = state
            if status is not None and status.pid is not None:
                row["pid"] = status.pid
            serving = status.serving if status is not None else None
            if serving is not None and state in ("serving", "draining"):
                row["address"] = serving.address
                row["instance_id"] = serving.instance_id
                if serving.status_url is not None:
                    row["status_url"] = serving.status_url
            described[child_id] = row
        return described

    def addresses(self) -> list[str]:
        """The request-plane address of each serving worker, in worker order."""
        with self._changed:
            return [
                s.serving.address
                for child_id in self._ids
                if (s := self._statuses.get(child_id)) is not None
                and s.state == "serving"
                and s.serving is not None
            ]

    # --- callbacks (actor threads) -------------------------------------------------------------

    def _all_serving(self) -> bool:
        return all(
            (s := self._statuses.get(child_id)) is not None and s.state == "serving"
            for child_id in self._ids
        )

    def _on_status(self, child_id: str, status: ProcessStatus) -> None:
        with self._changed:
            self._statuses[child_id] = status
            self._changed.notify_all()
        if status.state == "serving" and status.serving is not None:
            _log.debug(
                "worker serving",
                endpoint=self.endpoint.path,
                worker=child_id,
                pid=status.pid,
                address=status.serving.address,
            )

    def _supervisor_down(self, down: Down) -> None:
        error = down.error if down.reason == "error" else None
        if error is not None and not isinstance(error, TroupeError):
            cause = error  # a bug in the supervisor: still one line for the user
            error = ActorDead(self.name, "error", one_line(repr(cause)))
            error.__cause__ = cause
        with self._changed:
            self._down = True
            self._failure = error
            callback = self._on_failure
            self._changed.notify_all()
        if error is not None and callback is not None:
            callback(error)
