"""The actor wing: typed actors on pykka threads, supervision, and (later) the system actors.

Workers, leases, watchers and routers are actors that exchange typed msgspec messages; this
package holds the core they are built on.
"""

from troupe.actors._actor import Actor, ActorRef, Down, ExitReason, MonitorRef, Reply
from troupe.actors._supervisor import (
    Backoff,
    ChildInfo,
    ChildSpec,
    Intensity,
    RestartType,
    StartChild,
    Strategy,
    Supervisor,
    TerminateChild,
    WhichChildren,
)
from troupe.actors._system import ActorSystem

__all__ = [
    "Actor",
    "ActorRef",
    "ActorSystem",
    "Backoff",
    "ChildInfo",
    "ChildSpec",
    "Down",
    "ExitReason",
    "Intensity",
    "MonitorRef",
    "Reply",
    "RestartType",
    "StartChild",
    "Strategy",
    "Supervisor",
    "TerminateChild",
    "WhichChildren",
]
