"""The actor wing: typed actors on pykka threads, supervision, and the system actors.

Workers, leases, watchers and routers are actors that exchange typed msgspec messages; this
package holds the core they are built on.
"""

from troupe.actors._actor import Actor, ActorRef, Down, ExitReason, MonitorRef, Reply
from troupe.actors._lease import LeaseActor, LeaseInfo, Register, Unregister
from troupe.actors._process import ProcessActor
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
from troupe.actors._watcher import Joined, Left, Subscribe, Unsubscribe, WatcherActor
from troupe.actors._worker import WorkerActor
from troupe.actors.routing import POLICIES, Router, RouterActor, RouterSnapshot, SetAside

__all__ = [
    "POLICIES",
    "Actor",
    "ActorRef",
    "ActorSystem",
    "Backoff",
    "ChildInfo",
    "ChildSpec",
    "Down",
    "ExitReason",
    "Intensity",
    "Joined",
    "LeaseActor",
    "LeaseInfo",
    "Left",
    "MonitorRef",
    "ProcessActor",
    "Register",
    "Reply",
    "RestartType",
    "Router",
    "RouterActor",
    "RouterSnapshot",
    "SetAside",
    "StartChild",
    "Strategy",
    "Subscribe",
    "Supervisor",
    "TerminateChild",
    "Unregister",
    "Unsubscribe",
    "WatcherActor",
    "WhichChildren",
    "WorkerActor",
]
