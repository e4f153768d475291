"""troupe.kv exports what we mean it to, under public paths, and imports no actor at load."""

from __future__ import annotations

import re
from pathlib import Path

import troupe.kv

EXPECTED = {
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
}


def test_all_is_what_we_mean_to_export() -> None:
    assert set(troupe.kv.__all__) == EXPECTED
    for name in EXPECTED:
        assert hasattr(troupe.kv, name), name
    assert repr(troupe.kv.KvPublisher) == "<class 'troupe.kv.KvPublisher'>"


def test_troupe_kv_imports_no_actor_at_load() -> None:
    """The KV routing policy (in troupe.actors) imports troupe.kv: the reverse would be a cycle.

    Only ``_owner`` (imported inside a function) and ``TYPE_CHECKING`` blocks may name actors.
    """
    package = Path(troupe.kv.__file__).parent
    for module in sorted(package.glob("*.py")):
        if module.name == "_owner.py":
            continue
        top_level = [
            line
            for line in module.read_text().splitlines()
            if re.match(r"(from|import) troupe\.(actors|runtime)", line)
        ]
        assert top_level == [], module.name
