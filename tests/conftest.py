"""Shared fixtures: a scrubbed environment for every test, real etcd/NATS servers on free ports,
and the environment (``env``) and runtime (``rt``) of tests that run troupe in other processes
(their helpers are in ``_procs.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from troupe import Config, Runtime
from troupe._support._logging import reset_logging

# Real etcd and NATS servers on free loopback ports (`etcd_server`, `nats_server`, ...).
pytest_plugins = ["troupe.testing.pytest_plugin"]

# Environment variables troupe reads; every test starts with none of them set.
_SCRUBBED_PREFIXES = ("DYN_", "ETCD_", "NATS_", "POD_")


@pytest.fixture(autouse=True)
def _scrub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(_SCRUBBED_PREFIXES):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Every Runtime configures process-wide logging; undo it so no test sees another's."""
    yield
    reset_logging()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of troupe processes started by a test: file discovery in the test's own
    directory, request planes on 127.0.0.1, 1 s leases, warnings only. A module that needs
    other values overrides it (``def env(env): return env | {...}``)."""
    clean = dict(os.environ)  # already scrubbed of troupe variables by _scrub_env
    return clean | {
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_FILE_KV": str(tmp_path / "kv"),
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_HTTP_RPC_HOST": "127.0.0.1",
        "DYN_LEASE_TTL": "1",
        "DYN_LOG": "warning",
    }


@pytest.fixture
def rt(env: dict[str, str]) -> Iterator[Runtime]:
    """A runtime in this process on ``env``'s discovery: it sees what those processes register."""
    with Runtime(Config.from_env(env), handle_signals=False) as runtime:
        yield runtime
