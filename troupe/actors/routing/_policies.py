"""Which instance serves a request: the :class:`Policy` seam and the policies of :data:`POLICIES`.

A :class:`Policy` sees the request, its headers and the requests in flight per instance, counted
by the :class:`~troupe.actors.routing.Router` for every caller of the handle. Choosing one is a
lookup in :data:`POLICIES` (or a :class:`Policy` object passed instead of a name).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

from troupe.actors.routing._snapshot import RoutedInstance
from troupe.errors import ConfigError


class Policy(Protocol):
    """Which instance serves a request: the router's one seam for choosing (see docs/routing.md).

    ``choose`` runs on the runtime's I/O loop for every attempt of every request (retries and
    migrations included, over the instances that attempt may use); it must be quick and must
    not block. It may refuse the request by raising :class:`~troupe.errors.Overloaded` (the KV
    policy's :class:`~troupe.errors.AllWorkersBusy`): the caller gets it, nothing is sent.

    A policy that tracks what it sent may also define ``started(instance_id, request) ->
    token``, called right after ``choose`` when the attempt is sent, ``first_chunk(token)`` when
    its first chunk arrives (the worker's prefill is done), and ``finished(token)``, called once
    when that attempt ends however it ends.
    """

    def choose(
        self,
        candidates: tuple[RoutedInstance, ...],
        load: Mapping[str, int],
        request: Any,
        headers: Mapping[str, str] | None,
    ) -> RoutedInstance:
        """The instance to send ``request`` to.

        Args:
            candidates: the instances this attempt may use, sorted by id; never empty.
            load: requests in flight per instance id (absent: none), counted by the router for
                every caller of it (a frontend and scripts sharing it alike); live, read-only.
            request: the request as the caller passed it (before encoding); after a migration
                through a ``resume`` hook, the rewritten request.
            headers: the caller's headers, if any.
        """
        ...


class _RoundRobin:
    """Each of N instances once per N calls (while the set does not change)."""

    def __init__(self, rng: random.Random) -> None:
        self._counter = itertools.count()

    def choose(
        self,
        candidates: tuple[RoutedInstance, ...],
        load: Mapping[str, int],
        request: Any,
        headers: Mapping[str, str] | None,
    ) -> RoutedInstance:
        return candidates[next(self._counter) % len(candidates)]


class _Random:
    """Uniformly at random."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(
        self,
        candidates: tuple[RoutedInstance, ...],
        load: Mapping[str, int],
        request: Any,
        headers: Mapping[str, str] | None,
    ) -> RoutedInstance:
        return candidates[self._rng.randrange(len(candidates))]


class _LeastLoaded:
    """Power of two choices: of two random instances, the one with fewer requests in flight."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(
        self,
        candidates: tuple[RoutedInstance, ...],
        load: Mapping[str, int],
        request: Any,
        headers: Mapping[str, str] | None,
    ) -> RoutedInstance:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        if load.get(second.instance_id, 0) < load.get(first.instance_id, 0):
            return second
        return first


POLICIES: Final[Mapping[str, Callable[[random.Random], Policy]]] = {
    "round_robin": _RoundRobin,
    "random": _Random,
    "least_loaded": _LeastLoaded,
}
"""Policy name → factory. Direct routing is ``generate(..., instance_id=...)``; a
:class:`Policy` object may be passed instead of a name."""


def _validate(policy: str | Policy, migration_limit: int) -> Callable[[random.Random], Policy]:
    if isinstance(policy, str):
        factory = POLICIES.get(policy)
        if factory is None:
            raise ConfigError("policy", policy, choices=tuple(POLICIES))
    elif callable(getattr(policy, "choose", None)):
        factory = _given(policy)
    else:
        raise ConfigError("policy", policy, f"one of {', '.join(POLICIES)} or a Policy object")
    if not isinstance(migration_limit, int) or migration_limit < 0:
        raise ConfigError("migration_limit", migration_limit, "an integer >= 0")
    return factory


def _given(policy: Policy) -> Callable[[random.Random], Policy]:
    return lambda rng: policy
