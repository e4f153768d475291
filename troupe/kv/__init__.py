"""KV events: which KV-cache blocks each worker holds, published by workers, followed by routers.

A worker serving an LLM publishes ``Stored`` / ``Removed`` / ``Cleared`` events on the event
plane (topic ``kv-events`` of its namespace and component) and answers recovery queries from its
own index; routers follow every worker's events, in order and without gaps, into a sink (a KV
router's index). See docs/kv-events.md.

Modules, one per role:

- ``_hashing``: block hashing, defined once (XXH3-64, chained sequence hashes).
- ``_events``: the event structs (:class:`KvCacheEvent` and its ``data`` union).
- ``_local``: :class:`LocalKvIndexer`, the worker's own view and its ring of recent events.
- ``_publisher``: :class:`KvPublisher`, what a worker or an engine adapter calls.
- ``_query``: the worker's query endpoint: request shapes, the answer, the handler.
- ``_sink``: the :class:`KvSink` seam and the simple :class:`KvView`.
- ``_directory``: :class:`KvWorkerDirectory`, who the workers are and how to ask one.
- ``_follower``: :class:`KvFollower`, the router side, with gap recovery; its settings,
  counters and per-worker state in ``_follower_state``; on a durable plane, replay and
  snapshots in ``_replay``.
- ``_vllm``: :class:`VllmKvEventsAdapter`, vLLM's ZeroMQ KV-event stream in, a publisher fed.
- ``_index``: :class:`KvIndex`, the KV router's block index (a sink's store).
- ``_runtime``: :func:`open_kv_events` (``Runtime.kv_events``) and :func:`follow_kv_events`.

This package sits below the actors (the KV routing policy imports it): nothing here imports
``troupe.actors`` at import time.
"""

from troupe.kv._directory import KvWorkerDirectory, RouterDirectory
from troupe.kv._events import (
    KV_EVENTS_TOPIC,
    Cleared,
    KvCacheEvent,
    KvEventData,
    Removed,
    Stored,
    StoredBlock,
)
from troupe.kv._follower import FollowerSettings, KvFollower, KvFollowerCounters
from troupe.kv._hashing import (
    KV_HASH_SEED,
    block_hashes,
    chain_hash,
    local_block_hashes,
    sequence_hashes,
)
from troupe.kv._index import KvIndex
from troupe.kv._local import LocalKvIndexer
from troupe.kv._publisher import BLOCK_SIZE_KEY, KvPublisher
from troupe.kv._query import QUERY_ENDPOINT, KvQueryAnswer
from troupe.kv._runtime import follow_kv_events, open_kv_events, query_endpoint
from troupe.kv._sink import KvSink, KvView
from troupe.kv._vllm import VllmKvEventsAdapter, VllmKvEventsCounters

__all__ = [
    "BLOCK_SIZE_KEY",
    "KV_EVENTS_TOPIC",
    "KV_HASH_SEED",
    "QUERY_ENDPOINT",
    "Cleared",
    "FollowerSettings",
    "KvCacheEvent",
    "KvEventData",
    "KvFollower",
    "KvFollowerCounters",
    "KvIndex",
    "KvPublisher",
    "KvQueryAnswer",
    "KvSink",
    "KvView",
    "KvWorkerDirectory",
    "LocalKvIndexer",
    "Removed",
    "RouterDirectory",
    "Stored",
    "StoredBlock",
    "VllmKvEventsAdapter",
    "VllmKvEventsCounters",
    "block_hashes",
    "chain_hash",
    "follow_kv_events",
    "local_block_hashes",
    "open_kv_events",
    "query_endpoint",
    "sequence_hashes",
]

# Reprs and tracebacks show the public path (troupe.kv.KvPublisher).
for _public in (
    Cleared,
    FollowerSettings,
    KvCacheEvent,
    KvFollower,
    KvFollowerCounters,
    KvIndex,
    KvPublisher,
    KvQueryAnswer,
    KvSink,
    KvView,
    KvWorkerDirectory,
    LocalKvIndexer,
    Removed,
    RouterDirectory,
    Stored,
    StoredBlock,
    VllmKvEventsAdapter,
    VllmKvEventsCounters,
    block_hashes,
    chain_hash,
    follow_kv_events,
    local_block_hashes,
    open_kv_events,
    query_endpoint,
    sequence_hashes,
):
    _public.__module__ = __name__
del _public
