"""What an event plane counts, per topic: events published, received, malformed and dropped.

Plain integers, bumped on the I/O loop that owns the plane (no lock: only that loop touches
them); :meth:`EventMetrics.stats` copies them for a reader (the runtime renders them as
Prometheus series). Counters only grow, and survive the publishers and subscriptions that fed
them.
"""

from __future__ import annotations

__all__ = ["EventMetrics", "TopicCounts"]


class TopicCounts:
    """The counters of one topic of one scope in one plane.

    Attributes:
        published: events handed to the plane by this process's publishers.
        received: envelopes delivered to this process's subscriptions.
        malformed: messages that were not an envelope of the topic (dropped).
        dropped: events a subscription dropped because its reader fell too far behind.
    """

    __slots__ = ("dropped", "malformed", "published", "received")

    def __init__(self) -> None:
        self.published = 0
        self.received = 0
        self.malformed = 0
        self.dropped = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {
            "published": self.published,
            "received": self.received,
            "malformed": self.malformed,
            "dropped": self.dropped,
        }


class EventMetrics:
    """Every topic's :class:`TopicCounts` in one plane, keyed ``namespace.component.topic``."""

    __slots__ = ("_topics",)

    def __init__(self) -> None:
        self._topics: dict[str, TopicCounts] = {}

    def topic(self, namespace: str, component: str, topic: str) -> TopicCounts:
        """The counters of a topic (created at zero on first use)."""
        name = f"{namespace}.{component}.{topic}"
        counts = self._topics.get(name)
        if counts is None:
            counts = self._topics[name] = TopicCounts()
        return counts

    def stats(self) -> dict[str, dict[str, int]]:
        """A copy of every topic's counters: ``{"ns.comp.topic": {"published": n, ...}}``."""
        return {name: counts.as_dict() for name, counts in sorted(self._topics.items())}
