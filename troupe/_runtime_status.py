"""What a :class:`~troupe.runtime.Runtime` says about itself: the ``troupe status`` answer and
the status server's health report.

Both read the runtime's endpoints (its workers and their admission limits), its fleets of
worker processes and its metrics; they sit beside ``troupe/runtime.py``, in the same layer, and
are the runtime's own code kept apart to keep each module to one role.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from troupe._introspect import EndpointStatus, ProcessStatus, process_status
from troupe._status import HealthReport
from troupe.actors._worker import Health
from troupe.errors import TroupeError

if TYPE_CHECKING:
    from troupe.runtime import Runtime

__all__ = ["describe_process", "health_report"]


async def _worker_health(rt: Runtime) -> dict[str, tuple[str, int]]:
    """``endpoint path -> (state, inflight)`` of each of the runtime's workers."""
    health: dict[str, tuple[str, int]] = {}
    for path, ref in list(rt._workers.items()):
        try:
            state, inflight = await ref.ask_async(Health(), timeout=1.0)
        except TroupeError:  # ActorDead once stopped, AskTimeout if it is stuck
            state, inflight = "stopped", 0
        health[path] = (state, inflight)
    return health


async def describe_process(rt: Runtime) -> ProcessStatus:
    """This process for ``troupe status`` (the ``troupe.status`` endpoint's answer)."""
    endpoints: dict[str, EndpointStatus] = {}
    for path, (state, inflight) in (await _worker_health(rt)).items():
        ns, comp, name = path.split(".")
        requests, _, errors, cancellations = rt.metrics.endpoint(ns, comp, name).totals()
        limit = rt._limits.get(path, 0)
        endpoints[path] = EndpointStatus(state, inflight, limit, requests, errors, cancellations)
    server, worker = rt.server(), rt.config.worker
    return process_status(
        instance_id=rt.instance_id,
        plane=rt.network.plane,
        address=server.address,
        started_at=time.time() - rt.metrics.uptime_seconds(),
        label=rt.label,
        inflight=max(0, server.inflight - 1),  # not counting this very request
        limits=(worker.max_inflight, worker.max_inflight_per_caller),
        endpoints=endpoints,
    )


async def health_report(rt: Runtime) -> HealthReport:
    """Each endpoint's worker state, for the status server's health route."""
    states = {path: state for path, (state, _) in (await _worker_health(rt)).items()}
    workers: dict[str, dict[str, dict[str, object]]] = {}
    for fleet in list(rt._fleets):  # worker processes: serving while all of them serve
        if states.get(path := fleet.endpoint.path, "serving") == "serving":
            states[path] = fleet.state()
        workers.setdefault(path, {}).update(fleet.describe())
    return HealthReport.from_states(states, running=rt._state == "running", workers=workers)
