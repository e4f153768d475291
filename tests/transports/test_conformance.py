"""Every request plane through troupe's transport conformance kit (``troupe.testing.conformance``).

One test per (check, plane): every check runs on every plane that has what it needs (a port
setting: tcp and http; a worker in another process: every plane but inproc). The plane table
and :meth:`Plane.under_test` are in ``conftest.py``.
"""

from __future__ import annotations

import pytest

from troupe.testing.conformance import TRANSPORT_CHECKS, Check, TransportUnderTest

from .conftest import PLANES, PORTED_PLANES, REMOTE_PLANES, Plane

ONLY_ON = {"port": PORTED_PLANES, "worker": REMOTE_PLANES}
"""The optional needs that only some planes meet; every plane meets the others."""

CASES = [
    pytest.param(name, check, id=f"{check.name}-{name}")
    for check in TRANSPORT_CHECKS
    for name in PLANES
    if all(name in ONLY_ON.get(need, PLANES) for need in check.needs)
]


@pytest.mark.parametrize(("plane", "check"), CASES, indirect=["plane"])
async def test_transport(plane: Plane, check: Check[TransportUnderTest]) -> None:
    subject = plane.under_test()
    assert check.applies_to(subject), f"{plane.name} lacks {check.missing(subject)}"
    await check(subject)


async def test_every_check_a_plane_can_run_is_collected(plane: Plane) -> None:
    collected = {(case.values[0], case.values[1].name) for case in CASES}  # type: ignore[attr-defined]
    subject = plane.under_test()
    runnable = [check.name for check in TRANSPORT_CHECKS if check.applies_to(subject)]
    assert [name for name in runnable if (plane.name, name) not in collected] == []
