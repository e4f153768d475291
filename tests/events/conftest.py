"""Fixtures of the event-plane tests: one harness per backend of the conformance suite."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ._helpers import Harness, memory_harness, nats_harness, zmq_harness

BACKENDS = ("memory", "nats", "nats-durable", "zmq")
"""Every event plane the conformance suite runs against."""


@pytest.fixture(params=BACKENDS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """Planes of one backend that see each other; closed at teardown."""
    name = str(request.param)
    if name == "memory":
        made = memory_harness()
    elif name == "zmq":
        made = zmq_harness()
    else:
        server = request.getfixturevalue("nats_server")
        made = nats_harness(server.url, durable=name == "nats-durable")
    try:
        yield made
    finally:
        await made.close()
