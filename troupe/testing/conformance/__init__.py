"""Conformance kits: prove that a transport or a discovery store behaves like troupe's own.

troupe runs these very checks against its own request planes (tcp, http, nats, inproc) and
stores (etcd, memory, file, NATS KV, Kubernetes). A third-party transport or store passes them
to show that routers, workers and watchers can rely on it.

- Transports: describe yours as a :class:`TransportUnderTest` (factories of its servers and
  clients, plus what it supports) and ``await check_transport(subject)``, or run
  :data:`TRANSPORT_CHECKS` one test each under pytest.
- Stores: describe yours as a :class:`StoreUnderTest` (a factory of stores sharing one backend,
  plus what it supports) and ``await check_store(subject)``, or run :data:`STORE_CHECKS`.

Each check is a :class:`Check`: ``await check(subject)`` raises ``AssertionError`` when the
subject misbehaves. :func:`parametrize` makes one pytest test per check. The roles:
``_check`` (checks and running them), ``_transport`` and ``_store`` (the subjects),
``_transport_calls``/``_transport_stops`` and ``_store_keys``/``_store_watches`` (the checks),
``_watch`` (:class:`WatchReader`).
"""

from __future__ import annotations

from troupe.testing.conformance._check import Check, NotApplicable, parametrize, run_checks
from troupe.testing.conformance._store import StoreUnderTest, UnreachableStore
from troupe.testing.conformance._store_keys import KEY_CHECKS
from troupe.testing.conformance._store_watches import WATCH_CHECKS
from troupe.testing.conformance._transport import (
    WORKER_ENDPOINTS,
    PortSetting,
    TransportUnderTest,
    WorkerProcess,
)
from troupe.testing.conformance._transport_calls import CALL_CHECKS
from troupe.testing.conformance._transport_stops import STOP_CHECKS
from troupe.testing.conformance._watch import WatchReader

__all__ = [
    "STORE_CHECKS",
    "TRANSPORT_CHECKS",
    "WORKER_ENDPOINTS",
    "Check",
    "NotApplicable",
    "PortSetting",
    "StoreUnderTest",
    "TransportUnderTest",
    "UnreachableStore",
    "WatchReader",
    "WorkerProcess",
    "check_store",
    "check_transport",
    "parametrize",
]

TRANSPORT_CHECKS: tuple[Check[TransportUnderTest], ...] = CALL_CHECKS + STOP_CHECKS
"""Every transport check: streaming, errors, metadata, deadlines, limits, cancellation,
timeouts, closing, ports and a killed worker."""

STORE_CHECKS: tuple[Check[StoreUnderTest], ...] = KEY_CHECKS + WATCH_CHECKS
"""Every store check: reads and writes, create, prefixes, leases on keys, an unreachable
backend, snapshot-then-events watches, lease expiry and revocation, closing."""


async def check_transport(subject: TransportUnderTest, *, timeout: float = 60.0) -> list[str]:
    """Run every transport check that applies to ``subject``, one after the other.

    Returns:
        The names of the checks that ran (those whose needs ``subject`` meets).

    Raises:
        AssertionError: a check failed or ran past ``timeout`` seconds; the message names it.
    """
    return await run_checks("transport", TRANSPORT_CHECKS, subject, timeout=timeout)


async def check_store(subject: StoreUnderTest, *, timeout: float = 60.0) -> list[str]:
    """Run every store check that applies to ``subject``, one after the other.

    Returns:
        The names of the checks that ran (those whose needs ``subject`` meets).

    Raises:
        AssertionError: a check failed or ran past ``timeout`` seconds; the message names it.
    """
    return await run_checks("store", STORE_CHECKS, subject, timeout=timeout)


# Reprs and tracebacks show the public path.
for _public in (
    Check,
    NotApplicable,
    PortSetting,
    StoreUnderTest,
    TransportUnderTest,
    UnreachableStore,
    WatchReader,
    WorkerProcess,
    parametrize,
):
    _public.__module__ = __name__
del _public
