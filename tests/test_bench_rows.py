"""The benchmark's row builders: failure-window counting and the NVIDIA Dynamo comparison rows.

Pure functions over made-up outcomes: no process, no timing.
"""

from __future__ import annotations

import math

from benchmarks._failure_load import Load, Outcome, Request
from benchmarks._failure_rows import rows as failure_rows
from benchmarks._harness import Row
from benchmarks.bench_dynamo import GROUP, VERSUS, versus


def _by_name(made: list[Row]) -> dict[str, Row]:
    return {row.name: row for row in made}


def test_failure_rows_count_failures_after_the_kill_moved_latency_and_duplicates() -> None:
    outcome = Outcome("troupe", 10.0, Load(rate=10.0), 3, 4.0, killed_at=1.0, left_at=3.0)
    outcome.requests = [
        Request(start=0.9, latency=0.05, failure="StreamBroken"),  # in flight at the kill
        Request(start=1.2, latency=0.08, failure=None, migrated=True, duplicates=2),
        Request(start=1.5, latency=0.10, failure=None, migrated=True),
        Request(start=2.0, latency=0.01, failure="ConnectionRefused"),  # before the Left
        Request(start=3.5, latency=0.08, failure=None),  # after the Left
    ]
    peer = Outcome("NVIDIA Dynamo", 30.0, Load(rate=10.0), 0, 4.0, killed_at=1.0)
    peer.requests = [Request(start=0.5, latency=0.08, failure="x"), Request(1.5, 0.08, None)]

    made = _by_name(failure_rows(outcome, peer))

    assert made["failed with migration"].value == 2
    assert made["failed with migration"].reference == "NVIDIA Dynamo: 1 of 2"
    after = made["failed, started after the kill with migration"]
    assert after.value == 1
    assert "3 of them started before the dead instance left (2000 ms" in after.note
    assert after.reference == "NVIDIA Dynamo: 0 of 1"
    assert made["kill -9 → instance gone with migration"].value == 2000.0
    assert made["migrated requests: latency p50"].value == 90.0
    assert "max 100 ms" in made["migrated requests: latency p50"].note
    duplicates = made["duplicated chunks per completed stream"]
    assert duplicates.value == 2 / 3
    assert "1 stream(s) held a chunk twice, at most 2 in one" in duplicates.note


def test_failure_rows_without_migration_or_kill() -> None:
    outcome = Outcome("troupe", 2.0, Load(inflight=20), 0, 4.0)
    outcome.requests = [Request(start=0.1, latency=0.08, failure=None)]

    made = _by_name(failure_rows(outcome, None))

    assert set(made) == {
        "failed without migration",
        "failed, started after the kill without migration",
        "kill -9 → instance gone without migration",
    }
    assert math.isnan(made["failed, started after the kill without migration"].value)
    assert math.isnan(made["kill -9 → instance gone without migration"].value)
    assert made["failed without migration"].group.endswith("lease TTL 2 s, 20 in flight")


def test_dynamo_versus_reads_times_better_than_dynamo() -> None:
    measured = [
        Row(group=GROUP, name="tcp: round trip p50", value=1200.0, unit="µs"),
        Row(group=GROUP, name="troupe tcp: round trip p50", value=300.0, unit="µs"),
        Row(group=GROUP, name="tcp: throughput @64", value=2000.0, unit="req/s"),
        Row(group=GROUP, name="troupe tcp: throughput @64", value=14000.0, unit="req/s"),
        Row(group=GROUP, name="nats: did not run", value=math.nan, unit=""),
    ]

    made = _by_name(versus(measured))

    assert set(made) == {"tcp round trip p50", "tcp throughput @64"}
    assert all(row.group == VERSUS for row in made.values())
    assert made["tcp round trip p50"].ratio == 4.0
    assert made["tcp throughput @64"].ratio == 7.0
