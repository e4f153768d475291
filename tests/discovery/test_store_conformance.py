"""Every store through troupe's store conformance kit (``troupe.testing.conformance``): memory,
file, etcd, NATS (real servers) and Kubernetes (the fake API server).

One test per (check, backend). A check runs on every backend that has what it needs: the
kubernetes store lacks three of the kit's optional properties (``BACKEND_LACKS`` in
``conftest.py``): an atomic ``create`` across processes (each pod writes its own resource), TTL
leases (the pod's life is the lease; ``test_kubernetes_store.py`` covers it) and revisions
shared by watches and reads.
"""

from __future__ import annotations

import pytest

from troupe.testing.conformance import STORE_CHECKS, Check, StoreUnderTest

from .conftest import BACKEND_LACKS, BACKENDS

CASES = [
    pytest.param(backend, check, id=f"{check.name}-{backend}")
    for check in STORE_CHECKS
    for backend in BACKENDS
    if not set(check.needs) & BACKEND_LACKS.get(backend, frozenset())
]


@pytest.mark.parametrize(("backend", "check"), CASES)
async def test_store(store_under_test: StoreUnderTest, check: Check[StoreUnderTest]) -> None:
    subject = store_under_test
    assert check.applies_to(subject), f"{subject.backend} lacks {check.missing(subject)}"
    await check(subject)


def test_every_check_a_backend_can_run_is_collected(store_under_test: StoreUnderTest) -> None:
    collected = {(case.values[0], case.values[1].name) for case in CASES}  # type: ignore[union-attr]
    subject = store_under_test
    runnable = [check.name for check in STORE_CHECKS if check.applies_to(subject)]
    assert [name for name in runnable if (subject.backend, name) not in collected] == []
