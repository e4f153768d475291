"""Shared fixtures: a scrubbed environment for every test, real etcd/NATS servers on free ports."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

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
