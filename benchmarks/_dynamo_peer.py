"""The NVIDIA Dynamo peer, seen from the benchmark: is it installed, its environment, its processes.

Dynamo (``ai-dynamo-runtime``, the ``bench`` extra) runs in child processes
(:mod:`benchmarks._dynamo`), discovery on the etcd the suite starts on loopback. Every address is
pinned to 127.0.0.1: ``DYN_TCP_RPC_HOST`` (the worker's request server),
``DYN_TCP_RESPONSE_STREAM_HOST`` (the caller's listener that answers connect back to),
``DYN_EVENT_PLANE_HOST`` and ``DYN_SYSTEM_HOST``; :meth:`DynamoProcesses.check_loopback` checks
with ``ss`` that no Dynamo process listens on, or is connected to, anything else. NATS is given
(``NATS_SERVER``) only to the nats plane: Dynamo opens no NATS connection on tcp without it.
"""

from __future__ import annotations

import importlib.metadata
import sys
import types
from typing import Self

from benchmarks._harness import BenchContext
from benchmarks._procs import descendants, foreign_peers, listeners, non_loopback
from benchmarks.bench_planes import _Child, _child_env

__all__ = [
    "DYNAMO",
    "PACKAGE",
    "DynamoProcesses",
    "LoopbackViolation",
    "checked_note",
    "dynamo_env",
    "unavailable",
    "version",
]

DYNAMO = "NVIDIA Dynamo"
PACKAGE = "ai-dynamo-runtime"


class LoopbackViolation(RuntimeError):
    """A peer process listens on, or talks to, an address that is not loopback."""


def version() -> str | None:
    """The installed ``ai-dynamo-runtime`` version, or None."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def unavailable() -> str | None:
    """Why the peer cannot run here, or None when it is installed."""
    if version() is None:
        return f"{PACKAGE} not installed: pip install 'troupe[bench]'"
    if not sys.platform.startswith("linux"):
        return f"{PACKAGE} ships Linux wheels only"
    return None


def dynamo_env(plane: str, etcd_url: str, nats_url: str | None) -> dict[str, str]:
    """A child environment for Dynamo on ``plane`` with etcd discovery, everything on loopback."""
    env = {
        "DYN_DISCOVERY_BACKEND": "etcd",
        "ETCD_ENDPOINTS": etcd_url,
        "DYN_REQUEST_PLANE": plane,
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "DYN_EVENT_PLANE_HOST": "127.0.0.1",
        "DYN_SYSTEM_HOST": "127.0.0.1",
        "DYN_LOG": "warn",
        "NO_COLOR": "1",
    }
    if nats_url is not None:
        env["NATS_SERVER"] = nats_url
    return _child_env(env)


class DynamoProcesses:
    """Dynamo workers and clients for one plane; every one stopped on exit.

    Each child's stderr (Dynamo's log) goes to a file in the suite's scratch directory. Dynamo
    1.6.1 logs one INFO line per request on the caller ("route request completed"), whatever
    ``DYN_LOG`` says: its cost is part of the caller's figures.
    """

    def __init__(self, ctx: BenchContext, plane: str, etcd_url: str, nats_url: str | None) -> None:
        self.ctx = ctx
        self.plane = plane
        self.env = dynamo_env(plane, etcd_url, nats_url)
        self.children: list[_Child] = []

    def _start(self, name: str, args: list[str]) -> _Child:
        log = self.ctx.scratch / f"dynamo-{self.plane}-{name}-{len(self.children)}.log"
        child = _Child([sys.executable, "-m", "benchmarks._dynamo", *args], env=self.env, log=log)
        self.children.append(child)
        try:
            child.wait_ready(timeout=60.0)
        except (TimeoutError, RuntimeError) as exc:
            lines = [line.strip() for line in child.tail().splitlines() if line.strip()]
            why = lines[-1] if lines else type(exc).__name__
            raise RuntimeError(f"{DYNAMO} {name} did not start: {why}") from exc
        return child

    def worker(self, path: str, handler: str) -> _Child:
        """Start a worker serving ``path`` with ``handler`` (``echo`` or ``words``)."""
        return self._start("worker", ["worker", path, "--handler", handler])

    def client(self, path: str, instances: int = 1) -> _Child:
        """Start a client; it is ready once it sees ``instances`` instances of ``path``."""
        return self._start("client", ["client", path, "--instances", str(instances)])

    @property
    def pids(self) -> set[int]:
        """The live children and their descendants."""
        found = {child.pid for child in self.children if child.proc.poll() is None}
        for pid in list(found):
            found.update(descendants(pid))
        return found

    def check_loopback(self) -> int:
        """Raise :class:`LoopbackViolation` if Dynamo reaches beyond loopback; 1 if checked."""
        pids = self.pids
        found = listeners(pids)
        if found is None:
            return 0
        bad = [f"{b.process}({b.pid}) listens on {b.address}:{b.port}" for b in non_loopback(found)]
        bad += [f"connected to {peer}" for peer in foreign_peers(pids) or []]
        if bad:
            raise LoopbackViolation(f"{DYNAMO} reaches beyond loopback: " + "; ".join(bad))
        self.ctx.log(f"dynamo {self.plane}: {len(found)} listeners, all on loopback")
        return 1

    def close(self) -> None:
        """Stop the clients first, then the workers (SIGTERM, SIGKILL after a grace)."""
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()


def checked_note(checks: int) -> str:
    """Say whether the loopback check ran."""
    if checks:
        return f"every {DYNAMO} listener and connection checked on loopback (ss)"
    return "loopback NOT verified: ss is missing"
