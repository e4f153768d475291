"""A supervised tree surviving a crashing child.

    python examples/supervision.py

The tree: a top supervisor (one_for_one) over a "cache" worker and a nested supervisor
(rest_for_one) over "db" and "api". Crashing "db" restarts "db" and "api" (started after it) but
leaves "cache" alone; the tree keeps answering.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from troupe import Config, Runtime
from troupe.actors import Actor, ActorRef, ChildSpec, Intensity, Supervisor, WhichChildren
from troupe.config import LogConfig
from troupe.testing._wait import eventually


class Ping(msgspec.Struct, frozen=True, tag=True):
    pass


class Crash(msgspec.Struct, frozen=True, tag=True):
    pass


class Service(Actor[Ping | Crash]):
    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def receive(self, message: Ping | Crash) -> Any:
        if isinstance(message, Crash):
            raise RuntimeError(f"{self.label} crashed")
        return f"{self.label} ok"


def tree(sup: ActorRef[Any], indent: str = "") -> dict[str, ActorRef[Any]]:
    """Print the tree, return every live leaf by id."""
    leaves: dict[str, ActorRef[Any]] = {}
    for child in sup.ask(WhichChildren()):
        print(
            f"{indent}- {child.id}: {child.ref.name if child.ref else '(restarting)'}"
            f" restarts={child.restarts}"
        )
        if child.id == "backend" and child.ref is not None:
            leaves.update(tree(child.ref, indent + "  "))
        elif child.ref is not None:
            leaves[child.id] = child.ref
    return leaves


def main() -> None:
    service = functools.partial
    backend = ChildSpec(
        "backend",
        lambda: Supervisor(
            [ChildSpec("db", service(Service, "db")), ChildSpec("api", service(Service, "api"))],
            strategy="rest_for_one",
        ),
    )
    with Runtime(Config(log=LogConfig(level="critical"))) as rt:
        top = rt.spawn(
            lambda: Supervisor(
                [ChildSpec("cache", service(Service, "cache")), backend],
                intensity=Intensity(max_restarts=3, within=5.0),
            ),
            name="top",
        )
        leaves = eventually(lambda: (t := tree(top)) and len(t) == 3 and t)
        print("crashing db ...")
        leaves["db"].tell(Crash())
        new = eventually(
            lambda: (
                (t := tree(top, "  "))
                and len(t) == 3
                and t["db"] != leaves["db"]
                and t["api"] != leaves["api"]
                and t
            )
        )
        assert new["cache"] == leaves["cache"], "cache must not be restarted"
        print("after the crash:")
        tree(top)
        print(", ".join(ref.ask(Ping()) for ref in new.values()))


if __name__ == "__main__":
    main()
