"""When a router tries again: :class:`Retries`, :data:`MIGRATABLE`, :data:`Resume`, the decisions.

A refused or failed connection or a broken stream (:data:`MIGRATABLE`) sets the instance aside
for a few seconds (told to the :class:`~troupe.actors.routing.RouterActor`); with
``migration_limit`` the request is re-sent to another instance, the handler seeing
``ctx.attempt``. A stream that already delivered chunks continues rather than repeats: it moves
only to an instance whose handler is resumable (told ``ctx.received``), or through the router's
``resume`` hook (:data:`Resume`). An instance that answers ``Overloaded`` before its first chunk
(at its admission limit, or draining) is skipped for the next untried one (with :class:`Retries`,
capped, and tried again after a jittered pause once every instance refused). A
:class:`RouteObserver` is told of each retry and migration.

The decisions are methods of ``_Rerouting``, a base class of the
:class:`~troupe.actors.routing.Router`, so that the Router's request loop calls them as its own.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from troupe._support._logging import get_logger
from troupe.actors._actor import ActorRef
from troupe.actors.routing._actor import RouterMessage, SetAside
from troupe.actors.routing._snapshot import RoutedInstance, RouterSnapshot, SnapshotHolder
from troupe.errors import (
    ActorDead,
    ConfigError,
    ConnectionLost,
    ConnectTimeout,
    Overloaded,
    StreamBroken,
    StreamNotResumable,
    TroupeError,
)
from troupe.messages._payload import encode_payload

# The whole router logs under one name, the one it had as a single module.
_log = get_logger("troupe.actors.router")

MIGRATABLE: Final[tuple[type[TroupeError], ...]] = (ConnectTimeout, ConnectionLost, StreamBroken)
"""Failures that set the instance aside and may be migrated to another instance. Errors raised
by the handler (``RemoteError``, ``Overloaded``, ...) and timeouts are not: they propagate."""

Resume = Callable[[Any, list[Any]], Any]
"""A router's ``resume`` hook: ``resume(request, received) -> request``. Given the original
request and the chunks its caller already received (decoded, in order, from every earlier
attempt), it returns the request that makes another instance produce only the rest of the answer
(e.g. the prompt extended with the tokens generated so far and a smaller ``max_tokens``)."""


@dataclass(frozen=True, slots=True)
class Retries:
    """How a router tries again when no instance took a request.

    Attributes:
        overload_tries: attempts answered ``Overloaded`` (before any chunk) that a request may
            make, the first included, before that error reaches the caller. Each goes to an
            instance not tried yet; once every instance refused, the next round starts after
            a pause. ``None``: each instance once, no pause (a request fails with
            ``Overloaded`` once every instance refused it).
        overload_pause: seconds before a new round once every instance refused: doubled at
            each round, times a random factor in [0.5, 1.5) (so that refused requests do not
            come back in step).
        replacement_wait: seconds a migration waits for a new instance to register when every
            known instance was tried (``0``: the failure reaches the caller at once).

    Raises:
        ConfigError: a value out of range.
    """

    overload_tries: int | None = None
    overload_pause: float = 0.01
    replacement_wait: float = 0.0

    def __post_init__(self) -> None:
        tries = self.overload_tries
        if tries is not None and (not isinstance(tries, int) or tries < 1):
            raise ConfigError("overload_tries", tries, "an integer >= 1, or None")
        if not self.overload_pause >= 0:
            raise ConfigError("overload_pause", self.overload_pause, "seconds >= 0")
        if not self.replacement_wait >= 0:
            raise ConfigError("replacement_wait", self.replacement_wait, "seconds >= 0")

    def pause(self, rounds: int, rng: random.Random) -> float:
        """Seconds to wait before round ``rounds + 1`` (``rounds`` >= 1 rounds all refused)."""
        return self.overload_pause * 2.0 ** (rounds - 1) * (0.5 + rng.random())


class RouteObserver(Protocol):
    """Told (on the runtime's I/O loop; it must not block) when a request tries again."""

    def retried(self, endpoint: str) -> None:
        """A request refused with ``Overloaded`` is sent to another attempt."""
        ...

    def migrated(self, endpoint: str) -> None:
        """A request whose instance failed is sent to another instance."""
        ...


class _Retry:
    """What one request's failed attempts left: the instances it tried, those that refused it
    in this round, and how often it was refused."""

    __slots__ = ("refusals", "refused", "rounds", "tried")

    def __init__(self) -> None:
        self.tried: set[str] = set()
        self.refused: set[str] = set()
        self.refusals = 0
        self.rounds = 0

    @staticmethod
    def after(retry: _Retry | None, key: str, *, refused: bool = False) -> _Retry:
        """``retry`` (created if ``None``) with ``key`` tried (and counted as a refusal)."""
        if retry is None:
            retry = _Retry()
        retry.tried.add(key)
        if refused:
            retry.refused.add(key)
            retry.refusals += 1
        return retry


class _Rerouting:
    """The retry and migration decisions of a :class:`~troupe.actors.routing.Router`.

    A base class of the Router rather than an object of its own, so that its request loop
    (``_run``, the hot path) calls them as its own methods, with nothing in between; the
    attributes below are the Router's.
    """

    endpoint: str
    retries: Retries
    _actor: ActorRef[RouterMessage]
    _holder: SnapshotHolder
    _resume: Resume | None
    _observer: RouteObserver | None
    _rng: random.Random
    _down: dict[str, float]
    _set_aside_for: float

    if TYPE_CHECKING:

        async def wait_for_snapshot(
            self, predicate: Callable[[RouterSnapshot], bool], timeout: float | None = None
        ) -> RouterSnapshot | None: ...

    def _can_move(
        self, tried: set[str], resuming: bool, snapshot: RouterSnapshot | None = None
    ) -> bool:
        """Whether an untried instance is left (a resumable one when ``resuming``)."""
        if snapshot is None:
            snapshot = self._holder.current
        return any(
            i.instance_id not in tried and (not resuming or i.record.resumable)
            for i in snapshot.instances
        )

    async def _move(
        self, exc: TroupeError, target: RoutedInstance, tried: set[str], received: int
    ) -> None:
        """Return when an instance is left to take over the failed request (waiting up to
        ``retries.replacement_wait`` for one to register); raise ``exc`` (or
        :class:`StreamNotResumable`) otherwise."""
        resuming = received > 0 and self._resume is None
        wait = self.retries.replacement_wait
        if wait and not self._can_move(tried, resuming):
            _log.info("waiting for a replacement instance", endpoint=self.endpoint, seconds=wait)
            await self.wait_for_snapshot(lambda s: self._can_move(tried, resuming, s), wait)
        if not self._can_move(tried, resuming):
            if resuming and self._can_move(tried, False):
                raise StreamNotResumable(
                    self.endpoint, received, str(exc), address=target.address
                ) from exc
            raise exc
        _log.info(
            "migrating request",
            endpoint=self.endpoint,
            failed=target.instance_id,
            received=received,
            error=str(exc),
        )
        if self._observer is not None:
            self._observer.migrated(self.endpoint)

    async def _retry_refused(self, exc: Overloaded, retry: _Retry, resuming: bool) -> None:
        """After an ``Overloaded`` answer: return when another attempt may go (after a pause
        when every instance refused); raise ``exc`` when the tries are spent."""
        retries = self.retries
        limit = retries.overload_tries
        if limit is not None and retry.refusals >= limit:
            raise exc
        if not self._can_move(retry.tried, resuming):
            if limit is None:
                raise exc  # each instance once
            # Every instance refused: a new round over them, after a pause.
            retry.tried.difference_update(retry.refused)
            retry.refused.clear()
            if not self._can_move(retry.tried, resuming):
                raise exc  # the others failed outright
            retry.rounds += 1
            await asyncio.sleep(retries.pause(retry.rounds, self._rng))
        _log.debug("instance overloaded; trying another", endpoint=self.endpoint)
        if self._observer is not None:
            self._observer.retried(self.endpoint)

    def _resent(
        self, request: Any, payload: bytes, held: list[Any] | None, received: int
    ) -> tuple[Any, bytes, int]:
        """The request of the next attempt, its payload and the ``received`` count its
        handler is told: the ``resume`` hook's request (the handler starts afresh), or the
        same request with the count of chunks to skip."""
        if received and self._resume is not None:
            assert held is not None
            rewritten = self._resume(request, list(held))
            return rewritten, encode_payload(rewritten), 0
        return request, payload, received

    def _set_aside(self, instance_id: str) -> None:
        self._down[instance_id] = time.monotonic() + self._set_aside_for
        try:
            self._actor.tell(SetAside(instance_id))
        except ActorDead:
            pass  # the router actor is stopping; there is no table to update any more
