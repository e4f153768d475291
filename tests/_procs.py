"""Helpers of the tests that run troupe in other processes (``troupe worker`` fleets, the CLI):
reading registrations, calling a registered instance, and watching processes through /proc.

The ``env`` and ``rt`` fixtures that go with them are in ``conftest.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from troupe import Runtime
from troupe.messages import InstanceRecord, decode_payload, decode_record, encode_payload


def records(rt: Runtime, prefix: str) -> list[InstanceRecord]:
    """The instance records registered under ``prefix``, as ``rt`` reads them now."""
    items, _ = rt.io.run(rt.store.list(prefix), timeout=5)
    return [decode_record(kv.value, key=kv.key) for kv in items]


def call(rt: Runtime, record: InstanceRecord, endpoint: str, request: Any) -> list[Any]:
    """Send ``request`` to the instance of ``record`` (its one address); return its answer."""
    (address,) = record.transport.values()

    async def go() -> list[Any]:
        client = rt.network.client_for(address)
        stream = await client.request(address, endpoint, encode_payload(request))
        return [decode_payload(c) async for c in stream]

    return rt.io.run(go(), timeout=10)


def children_of(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry.name))
    return found


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (gone, or a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


class Fleet:
    """``troupe worker ENDPOINT HANDLER ARGS...`` in a subprocess, its stderr in a file."""

    def __init__(
        self, env: dict[str, str], tmp_path: Path, endpoint: str, handler: str, *args: str
    ) -> None:
        self.stderr_path = tmp_path / f"stderr-{time.monotonic_ns()}"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "troupe", "worker", endpoint, handler, *args],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
        self.started = time.monotonic()

    @property
    def stderr(self) -> str:
        """What the fleet wrote to stderr so far."""
        return self.stderr_path.read_text()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, as an operator would; SIGKILL what is left after ``timeout`` seconds."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the fleet and its workers, and reap it."""
        for child in children_of(self.proc.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.kill()
        self.proc.wait()
