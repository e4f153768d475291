"""The KV routing benchmark's processes: ``troupe mocker`` workers and a ``troupe frontend``.

:class:`Cluster` starts a fresh set for one mode of one repetition (fresh caches, a fresh
router), waits until the frontend can route to every worker, and reads their counters after the
run; it stops and reaps every process on exit, also on error. Stopping and reaping are apart
(:meth:`Cluster.stop`, :meth:`Cluster.reap`) so that one mode's processes can exit while the
next mode's start. Everything is on 127.0.0.1 and
needs no server: file discovery in a directory of its own (``DYN_KV_STORE=file``), brokerless
ZeroMQ KV events (``DYN_EVENT_PLANE=zmq``), the tcp request plane. Each worker runs its status
server (``DYN_SYSTEM_PORT``) so that its ``/metrics`` can be read: the mock engine's prompt
tokens and cached prompt tokens.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from benchmarks._harness import free_port, process_cpu_seconds
from benchmarks._procs import reap, scrubbed_env

__all__ = ["ENDPOINT", "MODEL", "Cluster", "ClusterError", "Counters", "MockerSpec", "Mode"]

ENDPOINT = "bench.llm.generate"
MODEL = "bench-mock"


class ClusterError(RuntimeError):
    """A process did not start, or did not become ready in time (with its log's end)."""


@dataclass(frozen=True)
class MockerSpec:
    """The mock engine of every worker (``troupe mocker`` options)."""

    block_size: int
    num_gpu_blocks: int
    prefill_tokens_per_second: float
    tokens_per_second: float
    output_tokens: int

    def args(self) -> list[str]:
        return [
            f"--block-size={self.block_size}",
            f"--num-gpu-blocks={self.num_gpu_blocks}",
            f"--prefill-tokens-per-second={self.prefill_tokens_per_second:g}",
            f"--tokens-per-second={self.tokens_per_second:g}",
            f"--output-tokens={self.output_tokens}",
        ]


@dataclass(frozen=True)
class Mode:
    """A routing mode: its name in the table, the frontend's flags, whether workers publish."""

    name: str
    frontend_args: tuple[str, ...]
    events: bool = False

    def frontend(self, block_size: int) -> list[str]:
        kv = ("--kv-cache-block-size", str(block_size)) if "kv" in self.frontend_args else ()
        return [*self.frontend_args, *kv]


@dataclass
class Counters:
    """What the processes say after a run: the engines' tokens, and everyone's CPU seconds."""

    prompt_tokens: list[float]
    cached_tokens: list[float]
    frontend: dict[str, float]
    cpu_seconds: float

    def since(self, before: Counters) -> Counters:
        """What was counted after ``before`` (the frontend's series as they are now)."""
        return Counters(
            [a - b for a, b in zip(self.prompt_tokens, before.prompt_tokens, strict=True)],
            [a - b for a, b in zip(self.cached_tokens, before.cached_tokens, strict=True)],
            self.frontend,
            self.cpu_seconds - before.cpu_seconds,
        )

    @property
    def hit_rate(self) -> float:
        """Cached prompt tokens over prompt tokens, over every worker."""
        total = sum(self.prompt_tokens)
        return sum(self.cached_tokens) / total if total else math.nan


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text → ``{name: value}`` summed over each name's label sets."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (OSError, urllib.error.URLError):
        return 0, ""


def _serving(status_port: int) -> bool:
    """Whether the worker whose status server is on ``status_port`` serves :data:`ENDPOINT`
    (a process with no endpoint yet is ready too: the endpoint must be listed)."""
    status, body = _get(f"http://127.0.0.1:{status_port}/health")
    if status != 200:
        return False
    endpoints = json.loads(body).get("endpoints") or {}
    return bool(endpoints.get(ENDPOINT) == "ready")


_FOLLOWED = "troupe_kv_follower_workers"


class Cluster:
    """``workers`` mock workers and one frontend in ``mode``, started on enter.

    Args:
        scratch: a directory for the discovery files and the processes' logs.
        mode: the routing mode.
        workers: how many ``troupe mocker`` processes.
        engine: their engine settings.
    """

    def __init__(self, scratch: Path, mode: Mode, workers: int, engine: MockerSpec) -> None:
        self.scratch = scratch
        self.mode = mode
        self.workers = workers
        self.engine = engine
        self.procs: list[subprocess.Popen[bytes]] = []
        self.status_ports: list[int] = []
        self.port = 0
        self._env = scrubbed_env(
            {
                "DYN_KV_STORE": "file",
                "DYN_FILE_KV": str(scratch / "discovery"),
                "DYN_EVENT_PLANE": "zmq",
                "DYN_TCP_RPC_HOST": "127.0.0.1",
                "DYN_SYSTEM_HOST": "127.0.0.1",
                "DYN_LOG": "warning",
            }
        )

    @property
    def url(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _start(self, name: str, args: Sequence[str], env: dict[str, str]) -> None:
        with open(self.scratch / f"{name}.log", "wb") as out:
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "troupe", *args],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )

    def _log(self, name: str) -> str:
        """The last lines of a process's log, on one line (the error is usually the last)."""
        try:
            text = (self.scratch / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return " | ".join(lines[-3:])[-400:] or "(empty log)"

    def _wait(self, what: str, log: str, ready: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead:
                raise ClusterError(f"{what}: a process exited ({dead[0]!r}): {self._log(log)}")
            time.sleep(0.05)
        raise ClusterError(f"{what}: not ready within {timeout:.0f} s: {self._log(log)}")

    def start(self) -> Self:
        """Start the workers, wait until they serve, then the frontend, and wait until it routes
        to every worker (KV events: until it follows every worker's events)."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        events = () if self.mode.events else ("--no-kv-events",)
        for index in range(self.workers):
            port = free_port()
            self.status_ports.append(port)
            env = self._env | {"DYN_SYSTEM_PORT": str(port)}
            args = ["mocker", ENDPOINT, "--model", MODEL, *self.engine.args(), *events]
            self._start(f"mocker-{index}", args, env)
        for index, port in enumerate(self.status_ports):
            ready = functools.partial(_serving, port)
            self._wait(f"mocker {index}", f"mocker-{index}", ready)
        self.port = free_port()
        args = ["frontend", "--host", "127.0.0.1", "--port", str(self.port), "--router-mode"]
        self._start("frontend", [*args, *self.mode.frontend(self.engine.block_size)], self._env)
        base = f"http://127.0.0.1:{self.port}"
        self._wait("frontend", "frontend", lambda: MODEL in _get(f"{base}/v1/models")[1])
        if self.mode.events:
            self._wait(
                "frontend's KV event follower",
                "frontend",
                lambda: self.frontend_metrics().get(_FOLLOWED, 0) >= self.workers,
            )
        return self

    def frontend_metrics(self) -> dict[str, float]:
        return metric_values(_get(f"http://127.0.0.1:{self.port}/metrics")[1])

    def cpu_seconds(self) -> float:
        """CPU seconds of every process of the cluster so far."""
        return sum(process_cpu_seconds(p.pid) for p in self.procs)

    def counters(self) -> Counters:
        """The workers' token counters, the frontend's series and the processes' CPU now."""
        prompt: list[float] = []
        cached: list[float] = []
        for port in self.status_ports:
            values = metric_values(_get(f"http://127.0.0.1:{port}/metrics")[1])
            prompt.append(values.get("troupe_mocker_prompt_tokens_total", math.nan))
            cached.append(values.get("troupe_mocker_cached_prompt_tokens_total", math.nan))
        return Counters(prompt, cached, self.frontend_metrics(), self.cpu_seconds())

    def stop(self) -> None:
        """SIGTERM every process still running (the frontend first); :meth:`reap` waits."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def reap(self, grace: float = 5.0) -> None:
        """Wait for every process to exit, SIGKILL what is left after ``grace`` seconds."""
        reap(self.procs, grace)

    def close(self) -> None:
        """:meth:`stop`, then :meth:`reap`."""
        self.stop()
        self.reap()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()
