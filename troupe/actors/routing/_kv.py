"""KV-aware routing: send each request to the worker that already holds its prefix.

:class:`KvPolicy` implements the router's :class:`~troupe.actors.routing.Policy` seam. For a
request carrying token ids it computes the chained block hashes (``troupe.kv`` hashing), asks its
:class:`~troupe.kv.KvIndex` how many leading blocks each candidate holds (its *overlap*), and
scores every candidate::

    cost = overlap_weight * prefill_blocks + decode_blocks

where ``prefill_blocks`` is what the worker would still have to compute (the request's blocks
less the overlap) and ``decode_blocks`` the worker's active load as this router tracks it: the
blocks of the requests it sent there and has not seen end. At temperature 0 the lowest cost
wins (ties: the worker with the smaller tree, then at random); above 0 a worker is drawn with
probability ``∝ exp(-normalised_cost / temperature)``.

A worker whose active blocks exceed ``busy_threshold`` times its KV capacity (announced in its
record's metadata as ``kv_total_blocks``) is skipped; when every candidate is busy the request
fails at once with :class:`~troupe.errors.AllWorkersBusy`, which the frontend answers with 503
and ``Retry-After``.

The index is fed either by KV events from the workers (``troupe.kv`` follower: exact) or, in
*approximate* mode, by the policy itself: a request's blocks are assumed cached on the worker it
was sent to, for ``approx_ttl`` seconds.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from troupe._support._logging import get_logger
from troupe.actors.routing._kv_active import ActiveBlocks
from troupe.actors.routing._kv_sync import ReplicaSync
from troupe.actors.routing._snapshot import RoutedInstance
from troupe.errors import AllWorkersBusy, ConfigError
from troupe.kv._index import KvIndex

__all__ = ["KvPolicy", "KvRouterSettings", "request_tokens"]

_log = get_logger("troupe.actors.router.kv")
_debug = logging.getLogger("troupe.actors.router.kv")  # the level check, before any event

Hasher = Callable[[Sequence[int], int], list[int]]


@dataclass(frozen=True, slots=True)
class KvRouterSettings:
    """How the KV policy weighs cache overlap against load (see docs/routing.md).

    Attributes:
        block_size: tokens per KV block; must match the workers' (``--kv-cache-block-size``).
        overlap_weight: weight of the prefill cost against the decode load
            (``--kv-overlap-score-weight``); 0 ignores the cache.
        temperature: 0 picks the cheapest worker; above 0, softmax sampling over normalised
            costs (``--router-temperature``).
        busy_threshold: fraction of a worker's KV capacity its active blocks may fill before it
            is skipped; None: never skipped (``--active-decode-blocks-threshold``).
        approximate: predict caches from routing decisions instead of KV events
            (``--no-kv-events``).
        approx_ttl: seconds a routed request's blocks count as cached in approximate mode.
        max_blocks_per_worker: cap on one worker's blocks in the index (pruned past it).
        replica_sync: share active requests with the other routers of the endpoint's component
            over the event plane (``--router-replica-sync``), so they count each other's load.
    """

    block_size: int = 16
    overlap_weight: float = 1.0
    temperature: float = 0.0
    busy_threshold: float | None = None
    approximate: bool = False
    approx_ttl: float = 120.0
    max_blocks_per_worker: int = 1 << 20
    replica_sync: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError("block_size", self.block_size, "an integer >= 1")
        if not self.overlap_weight >= 0:
            raise ConfigError("overlap_weight", self.overlap_weight, "a number >= 0")
        if not self.temperature >= 0:
            raise ConfigError("temperature", self.temperature, "a number >= 0")
        if self.busy_threshold is not None and not self.busy_threshold > 0:
            raise ConfigError("busy_threshold", self.busy_threshold, "a number > 0, or None")
        if not self.approx_ttl > 0:
            raise ConfigError("approx_ttl", self.approx_ttl, "a number of seconds > 0")


def request_tokens(request: Any) -> Sequence[int] | None:
    """The token ids a request carries: ``request["token_ids"]`` or ``request.token_ids``."""
    if isinstance(request, Mapping):
        tokens = request.get("token_ids")
    else:
        tokens = getattr(request, "token_ids", None)
    if isinstance(tokens, (list, tuple)):
        return tokens
    return None


class KvPolicy:
    """The KV-aware :class:`~troupe.actors.routing.Policy` (see the module docstring).

    Args:
        settings: the weights and thresholds.
        hasher: ``hasher(token_ids, block_size)`` → chained block hashes; troupe's scheme
            (:func:`troupe.kv.block_hashes`) by default.
        tokens: finds a request's token ids (:func:`request_tokens` by default).
        rng: randomness for ties and sampling.
        clock: monotonic seconds (approximate mode's expiry).
    """

    name = "kv"

    def __init__(
        self,
        settings: KvRouterSettings | None = None,
        *,
        hasher: Hasher | None = None,
        tokens: Callable[[Any], Sequence[int] | None] = request_tokens,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or KvRouterSettings()
        self.index = KvIndex(max_blocks_per_worker=self.settings.max_blocks_per_worker)
        self._hasher = hasher or _default_hasher()
        self._tokens = tokens
        self._rng = rng or random.Random()
        self._clock = clock
        self._active = ActiveBlocks()
        # Uncached blocks of the requests whose first chunk has not come yet, per worker: prefill
        # work queued there, added to a candidate's prefill cost (as NVIDIA Dynamo's router does).
        self._pending: dict[str, int] = {}
        self._prefilling: dict[int, tuple[str, int]] = {}
        self._tokens_issued = itertools.count()
        # The request choose() last saw, and its hashes: started() follows choose() at once.
        self._last: tuple[Any, list[int], int, int] | None = (
            None  # request, hashes, partial, prefill
        )
        # Approximate mode: when each (worker, block) was last routed, and in what order.
        self._expiry: deque[tuple[float, str, list[int]]] = deque()
        self._routed_at: dict[tuple[str, int], float] = {}
        self.decisions = 0
        self.decision_seconds = 0.0
        self.predicted_hit_blocks = 0
        self.requested_blocks = 0
        self.last_overlap: dict[str, int] = {}
        """Overlap per worker of the last request chosen for (workers holding none absent)."""
        self.last_sent: str | None = None
        """The worker the last request was sent to."""
        self.sync: ReplicaSync | None = None
        """Replica sync, once started (``settings.replica_sync``): the other routers' load."""

    # --- the Policy seam ------------------------------------------------------------------------

    def choose(
        self,
        candidates: tuple[RoutedInstance, ...],
        load: Mapping[str, int],
        request: Any,
        headers: Mapping[str, str] | None,
    ) -> RoutedInstance:
        started = time.perf_counter()
        settings = self.settings
        if settings.approximate:
            self._expire()
        tokens = self._tokens(request)
        hashes = self._hasher(tokens, settings.block_size) if tokens else []
        request_blocks = len(tokens) / settings.block_size if tokens else 0.0
        overlaps = self.index.find_matches(hashes) if hashes else {}
        usable = self._not_busy(candidates)
        active, pending = self._active, self._pending
        full = len(hashes)
        costs = [
            settings.overlap_weight
            * (request_blocks - overlaps.get(c.instance_id, 0) + pending.get(c.instance_id, 0))
            + self._load(c.instance_id)
            + full
            - active.shared_prefix(c.instance_id, hashes)  # its blocks already there add none
            for c in usable
        ]
        chosen = usable[self._select(usable, costs)]
        overlap = overlaps.get(chosen.instance_id, 0)
        prefill = max(0, math.ceil(request_blocks) - overlap)
        self._last = (request, hashes, _partial(tokens, settings.block_size), prefill)
        self.last_overlap = overlaps
        self.decisions += 1
        self.predicted_hit_blocks += overlap
        self.requested_blocks += len(hashes)
        self.decision_seconds += time.perf_counter() - started
        if _debug.isEnabledFor(logging.DEBUG):
            _log.debug(
                "kv routed",
                worker=chosen.instance_id,
                overlap=overlap,
                blocks=len(hashes),
                candidates=len(usable),
                load=self._load(chosen.instance_id),
                overlaps=overlaps,
                costs={c.instance_id: round(x, 1) for c, x in zip(usable, costs, strict=True)},
            )
        return chosen

    def started(self, instance_id: str, request: Any) -> int:
        """The router sent ``request`` to ``instance_id``; returns a token for :meth:`finished`."""
        last = self._last
        if last is not None and last[0] is request:
            _, hashes, partial, prefill = last
        else:  # direct routing: choose() did not see this request
            tokens = self._tokens(request)
            hashes = self._hasher(tokens, self.settings.block_size) if tokens else []
            partial = _partial(tokens, self.settings.block_size)
            prefill = len(hashes) + partial
        self._last = None
        self.last_sent = instance_id
        token = next(self._tokens_issued)
        self._active.add(token, instance_id, hashes, partial)
        if prefill:
            self._prefilling[token] = (instance_id, prefill)
            self._pending[instance_id] = self._pending.get(instance_id, 0) + prefill
        if self.sync is not None:
            self.sync.added(token, instance_id, len(hashes) + partial)
        if self.settings.approximate and hashes:
            now = self._clock()
            routed_at = self._routed_at
            for block in hashes:
                routed_at[instance_id, block] = now
            self.index.store(instance_id, hashes)
            self._expiry.append((now + self.settings.approx_ttl, instance_id, hashes))
        return token

    def finished(self, token: int) -> None:
        """The request of ``token`` ended (answered, failed or cancelled)."""
        self.first_chunk(token)
        if self._active.remove(token) and self.sync is not None:
            self.sync.freed(token)

    def first_chunk(self, token: int) -> None:
        """The request of ``token`` yielded its first chunk: its worker's prefill of it is done."""
        entry = self._prefilling.pop(token, None)
        if entry is None:
            return
        worker, blocks = entry
        left = self._pending.get(worker, 0) - blocks
        if left > 0:
            self._pending[worker] = left
        else:
            self._pending.pop(worker, None)

    # --- what the router and operators read ----------------------------------------------------

    @property
    def active_blocks(self) -> Mapping[str, int]:
        """Distinct blocks of the requests in flight per worker, as this router counts them."""
        return self._active.counts()

    @property
    def predicted_hit_rate(self) -> float:
        """Blocks found cached over blocks requested, over every decision so far."""
        return self.predicted_hit_blocks / self.requested_blocks if self.requested_blocks else 0.0

    def remove_worker(self, instance_id: str) -> None:
        """Drop a worker's blocks (it left discovery)."""
        self.index.remove_worker(instance_id)
        if self._routed_at:
            self._routed_at = {k: t for k, t in self._routed_at.items() if k[0] != instance_id}

    # --- helpers --------------------------------------------------------------------------------

    def _not_busy(self, candidates: tuple[RoutedInstance, ...]) -> tuple[RoutedInstance, ...]:
        threshold = self.settings.busy_threshold
        if threshold is None:
            return candidates
        usable = tuple(c for c in candidates if not self._busy(c, threshold))
        if not usable:
            record = candidates[0].record
            endpoint = f"{record.namespace}.{record.component}.{record.endpoint}"
            raise AllWorkersBusy(endpoint, len(candidates))
        return usable

    def _busy(self, candidate: RoutedInstance, threshold: float) -> bool:
        capacity = candidate.record.metadata.get("kv_total_blocks")
        if not isinstance(capacity, int) or capacity <= 0:
            return False
        return self._load(candidate.instance_id) > threshold * capacity

    def _load(self, instance_id: str) -> int:
        """Active blocks on ``instance_id``: this router's, plus the other replicas'."""
        own = self._active.count(instance_id)
        sync = self.sync
        return own + sync.remote_blocks.get(instance_id, 0) if sync is not None else own

    def _select(self, usable: tuple[RoutedInstance, ...], costs: list[float]) -> int:
        if len(usable) == 1:
            return 0
        low, high = min(costs), max(costs)
        temperature = self.settings.temperature
        if temperature <= 0 or high == low:
            best = [i for i, cost in enumerate(costs) if cost == low]
            if len(best) > 1:
                trees = {i: self.index.block_count(usable[i].instance_id) for i in best}
                smallest = min(trees.values())
                best = [i for i in best if trees[i] == smallest]
            return best[0] if len(best) == 1 else self._rng.choice(best)
        span = high - low
        weights = [math.exp(-(cost - low) / (span * temperature)) for cost in costs]
        return self._rng.choices(range(len(usable)), weights)[0]

    def _expire(self) -> None:
        now = self._clock()
        expiry = self._expiry
        routed_at = self._routed_at
        oldest = now - self.settings.approx_ttl
        while expiry and expiry[0][0] <= now:
            _, worker, hashes = expiry.popleft()
            # A block routed again since stays: only the blocks not refreshed expire.
            stale = [block for block in hashes if routed_at.get((worker, block), now) <= oldest]
            for block in stale:
                del routed_at[worker, block]
            self.index.remove(worker, stale)


def _partial(tokens: Sequence[int] | None, block_size: int) -> int:
    """1 if the prompt ends in an unfinished block (held in the cache, never hashed), else 0."""
    return 1 if tokens and len(tokens) % block_size else 0


def _default_hasher() -> Hasher:
    from troupe.kv import block_hashes  # noqa: PLC0415  # troupe.kv is being written beside

    return block_hashes
