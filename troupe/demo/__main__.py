"""``python -m troupe.demo`` (what ``make demo`` runs): workers in processes, a router, a crash.

Embedded defaults, nothing to install: file-backed discovery in a temporary directory and the
TCP request plane on loopback. Three worker processes serve ``troupe.demo:words`` under a
supervisor; a router streams requests to them round robin. Midway, one worker is SIGKILLed while
it streams: the router migrates the request to another worker, the dead instance's lease
expires, and the supervisor starts a replacement — the demo carries on.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from typing import Any

from troupe import Config, Runtime
from troupe.actors import WhichChildren
from troupe.config import DiscoveryConfig, FileKvConfig, LogConfig, RequestPlaneConfig, TcpConfig

ENDPOINT = "demo.backend.words"
TEXTS = [
    "workers register themselves and routers find them",
    "every answer streams back word by word",
    "a worker is killed in the middle of this sentence yet the stream goes on",
    "the supervisor has started a replacement meanwhile",
]


def _config(kv_dir: str) -> Config:
    return Config(
        discovery=DiscoveryConfig(backend="file", lease_ttl=2.0, file=FileKvConfig(path=kv_dir)),
        request_plane=RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1")),
        log=LogConfig(level="critical"),  # the demo narrates what happens itself
    )


def _stream(rt: Runtime, router: Any, text: str, *, kill_after: int | None = None) -> None:
    seen: set[int] = set()
    pids: list[int] = []
    print(f"\n> {text!r}")
    for chunk in router.generate_sync({"text": text, "delay": 0.05}):
        if chunk["attempt"] and pids[-1:] != [chunk["pid"]] and chunk["index"] == 0:
            print(
                f"\n  ! stream broke; migrated to worker {chunk['pid']} "
                f"(attempt {chunk['attempt']}), skipping words already shown"
            )
        pids.append(chunk["pid"])
        if chunk["index"] in seen:
            continue
        seen.add(chunk["index"])
        print(f"  [{chunk['pid']}] {chunk['word']}", flush=True)
        if kill_after is not None and len(seen) == kill_after:
            print(f"\n  ! kill -9 worker {chunk['pid']} mid-stream")
            os.kill(chunk["pid"], signal.SIGKILL)
            kill_after = None


def _workers(rt: Runtime, router: Any) -> str:
    return ", ".join(sorted(str(i.record.pid) for i in router.snapshot.instances))


def main() -> int:
    """Run the demo; returns the exit status."""
    print("troupe demo: 3 worker processes, file discovery, TCP request plane\n")
    with (
        tempfile.TemporaryDirectory(prefix="troupe-demo-") as kv_dir,
        Runtime(_config(kv_dir)) as rt,
    ):
        supervisor = rt.spawn_workers(ENDPOINT, "troupe.demo:words", processes=3)
        router = rt.router(ENDPOINT, policy="round_robin", migration_limit=2)
        deadline = time.monotonic() + 30
        while len(router.instance_ids()) < 3 and time.monotonic() < deadline:
            router.wait_for_instances_sync(timeout=30)
            time.sleep(0.05)
        print(f"router sees {len(router.instance_ids())} workers: pids {_workers(rt, router)}")
        for index, text in enumerate(TEXTS):
            _stream(rt, router, text, kill_after=4 if index == 2 else None)
            if index == 2:
                while len(router.instance_ids()) != 3 and time.monotonic() < deadline + 30:
                    time.sleep(0.05)  # the dead lease expires; the replacement registers
                restarts = {c.id: c.restarts for c in supervisor.ask(WhichChildren())}
                print(f"\nrouter sees workers {_workers(rt, router)}; restarts: {restarts}")
        print("\nstopping: each worker unregisters, finishes what it was doing, and exits")
    print("done: every process stopped, every thread joined.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
