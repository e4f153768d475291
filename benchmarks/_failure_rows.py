"""The failure window's rows, from a scenario's :class:`~benchmarks._failure_load.Outcome`.

Per scenario: the requests that failed (all of them), those *started after the kill* that
failed (the requests routed while the dead worker was still registered: the figure NVIDIA
Dynamo's own version of this test counted, 32 of 100), the time from the kill until the caller
saw the instance leave; with migration, the latency of the requests that were moved (p50, p99,
max) and the chunks a completed stream held twice.
"""

from __future__ import annotations

import math
from collections import Counter

from benchmarks._failure_load import Outcome, Request
from benchmarks._harness import Row, median, percentile

__all__ = ["group", "rows"]


def group(outcome: Outcome) -> str:
    """``failure window: <runtime>, lease TTL <s>, <load>``."""
    return (
        f"failure window: {outcome.runtime}, lease TTL {outcome.lease_ttl:g} s, "
        f"{outcome.load.label}"
    )


def _label(outcome: Outcome) -> str:
    if outcome.runtime != "troupe":
        return ""
    return " with migration" if outcome.migration_limit else " without migration"


def _kinds(failures: Counter[str]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(failures.items())) or "none"


def rows(outcome: Outcome, peer: Outcome | None) -> list[Row]:
    """The rows of one scenario; ``peer`` (NVIDIA Dynamo under the same load) is the reference."""
    label = _label(outcome)
    where = group(outcome)
    kill = f"{outcome.killed_at:.2f} s" if outcome.killed_at is not None else "never (!)"
    done = [r.latency * 1000.0 for r in outcome.requests if r.failure is None]
    note = (
        f"of {outcome.sent} requests ({outcome.load.label}, {outcome.duration:g} s, 2 workers, "
        f"kill -9 of one at {kill}, on its first chunk after that time); "
        f"failures: {_kinds(outcome.failures)}"
    )
    if outcome.migration_limit:
        note += f"; migration_limit={outcome.migration_limit}"
    if done:
        note += f"; completed requests p50 {median(done):.0f} ms, p99 {percentile(done, 99):.0f} ms"
    made = [
        Row(
            group=where,
            name=f"failed{label}",
            value=float(outcome.failed),
            unit="failed",
            reference=_peer_text(peer, after_kill=False),
            higher_is_better=False,
            note=note,
            samples=[float(outcome.failed)],
        ),
        _after_kill_row(outcome, label, peer),
        _left_row(outcome, label),
    ]
    if outcome.migration_limit:
        made += [_migrated_row(outcome), _duplicates_row(outcome)]
    return made


def _peer_text(peer: Outcome | None, *, after_kill: bool) -> str | None:
    if peer is None:
        return None
    if not after_kill:
        return f"{peer.runtime}: {peer.failed} of {peer.sent}"
    after = _after_kill(peer)
    if after is None:
        return f"{peer.runtime}: no kill"
    failed = sum(1 for r in after if r.failure is not None)
    return f"{peer.runtime}: {failed} of {len(after)}"


def _after_kill(outcome: Outcome) -> list[Request] | None:
    if outcome.killed_at is None:
        return None
    killed = outcome.killed_at
    return [r for r in outcome.requests if r.start >= killed]


def _after_kill_row(outcome: Outcome, label: str, peer: Outcome | None) -> Row:
    name = f"failed, started after the kill{label}"
    killed = outcome.killed_at
    if killed is None:
        return Row(group=group(outcome), name=name, value=math.nan, unit="failed", note="no kill")
    after = [r for r in outcome.requests if r.start >= killed]
    failed = [r.failure for r in after if r.failure is not None]
    note = f"{len(failed)} of the {len(after)} requests started after the kill -9 failed"
    left = outcome.left_after
    if left is not None:
        window = [r for r in after if r.start < killed + left]
        lost = sum(1 for r in window if r.failure is not None)
        note += (
            f"; {len(window)} of them started before the dead instance left "
            f"({left * 1000:.0f} ms after the kill), {lost} of those failed"
        )
    else:
        note += "; the dead instance was still registered when the run ended"
    if failed:
        note += "; " + _kinds(Counter(failed))
    return Row(
        group=group(outcome),
        name=name,
        value=float(len(failed)),
        unit="failed",
        reference=_peer_text(peer, after_kill=True),
        higher_is_better=False,
        note=note,
        samples=[float(len(failed))],
    )


def _left_row(outcome: Outcome, label: str) -> Row:
    left = outcome.left_after
    how = (
        "the watcher's Left (file discovery): the lease running out dominates"
        if outcome.runtime == "troupe"
        else "the client's instance list (etcd discovery)"
    )
    return Row(
        group=group(outcome),
        name=f"kill -9 → instance gone{label}",
        value=left * 1000.0 if left is not None else math.nan,
        unit="ms",
        note=f"lease TTL {outcome.lease_ttl:g} s; {how}"
        + ("" if left is not None else "; NOT seen within the run"),
    )


def _migrated_row(outcome: Outcome) -> Row:
    moved = [r.latency * 1000.0 for r in outcome.requests if r.migrated and r.failure is None]
    whole = [r.latency * 1000.0 for r in outcome.requests if not r.migrated and r.failure is None]
    note = f"{len(moved)} requests completed after a migration"
    if moved:
        note += (
            f"; p50 {median(moved):.0f} ms, p99 {percentile(moved, 99):.0f} ms, "
            f"max {max(moved):.0f} ms"
        )
    if whole:
        note += f"; requests not moved: p50 {median(whole):.0f} ms"
    return Row(
        group=group(outcome),
        name="migrated requests: latency p50",
        value=median(moved),
        unit="ms",
        p99=percentile(moved, 99) if moved else None,
        higher_is_better=False,
        note=note,
        samples=moved,
    )


def _duplicates_row(outcome: Outcome) -> Row:
    done = [r for r in outcome.requests if r.failure is None]
    dup = [r.duplicates for r in done]
    holding = sum(1 for n in dup if n)
    note = (
        f"{sum(dup)} chunks received twice over {len(done)} completed streams; {holding} "
        f"stream(s) held a chunk twice, at most {max(dup, default=0)} in one; 0 when a migrated "
        "stream continues where it stopped instead of repeating"
    )
    return Row(
        group=group(outcome),
        name="duplicated chunks per completed stream",
        value=sum(dup) / len(done) if done else math.nan,
        unit="chunks",
        higher_is_better=False,
        note=note,
        samples=[float(n) for n in dup if n],
    )
