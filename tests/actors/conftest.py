"""Fixtures of the actor tests: the router tests' cluster (see ``_cluster.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._cluster import Cluster


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A frontend runtime with no workers yet; everything is closed after the test."""
    c = Cluster()
    try:
        yield c
    finally:
        c.close()
