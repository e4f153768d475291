"""``python -m troupe.demo`` (what ``make demo`` runs): a supervised tree of local actors.

A supervisor runs three word-counting workers. Jobs are spread over them round robin; one job is
poisoned and crashes its worker midway. The supervisor restarts it, and the job is retried, so
every job still gets an answer. The request plane and discovery replace this with real worker
processes in a later release of the demo.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any

import msgspec

from troupe import Runtime
from troupe.actors import (
    Actor,
    ActorRef,
    Backoff,
    ChildSpec,
    Intensity,
    Supervisor,
    WhichChildren,
)
from troupe.config import Config, LogConfig
from troupe.errors import ActorDead

JOBS = [
    "the quick brown fox",
    "jumps over the lazy dog",
    "actors share nothing",
    "POISON: this job crashes its worker",
    "supervisors restart what crashes",
    "and the show goes on",
]


class Count(msgspec.Struct, frozen=True, tag=True):
    """Count the words of ``text``."""

    text: str


class WordCounter(Actor[Count]):
    """A worker actor; a poisoned job makes it crash (and its supervisor restart it)."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def started(self) -> None:
        print(f"  [{self.label}] started on thread {self.name}")

    def receive(self, message: Count) -> Any:
        if message.text.startswith("POISON"):
            raise RuntimeError("poisoned job")
        return len(message.text.split())


def _children(sup: ActorRef[Any]) -> list[ActorRef[Any]]:
    return [c.ref for c in sup.ask(WhichChildren()) if c.ref is not None and c.ref.is_alive()]


def _ask_with_retry(sup: ActorRef[Any], index: int, job: str, attempts: int = 3) -> Any:
    for attempt in range(1, attempts + 1):
        deadline = time.monotonic() + 5.0
        workers = _children(sup)
        while len(workers) < 3 and time.monotonic() < deadline:  # a restart may be under way
            time.sleep(0.01)
            workers = _children(sup)
        worker = workers[index % len(workers)]
        try:
            return worker.ask(Count(job), timeout=5.0)
        except ActorDead as exc:
            print(f"  ! {worker.name} died on job {index} ({exc.__cause__}); attempt {attempt}")
            if job.startswith("POISON"):
                return "rejected (poisoned)"
    return "failed"


def main() -> int:
    """Run the demo; returns the exit status."""
    print("troupe demo: a supervised tree of local actors\n")
    config = Config(log=LogConfig(level="critical"))  # the demo narrates crashes itself
    with Runtime(config) as rt:
        specs = [
            ChildSpec(f"counter-{i}", functools.partial(WordCounter, f"counter-{i}"))
            for i in range(3)
        ]
        sup = rt.spawn(
            lambda: Supervisor(
                specs,
                strategy="one_for_one",
                intensity=Intensity(max_restarts=3, within=5.0),
                backoff=Backoff(min=0.05, max=1.0),
            ),
            name="counters",
        )
        print("supervisor 'counters' started 3 workers; sending jobs round robin:\n")
        for index, job in enumerate(JOBS):
            answer = _ask_with_retry(sup, index, job)
            print(f"  job {index}: {job!r:45} -> {answer}")
        restarts = {c.id: c.restarts for c in sup.ask(WhichChildren())}
        print(f"\nrestarts per worker: {restarts}")
    print("runtime closed: every actor stopped, every thread joined.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
