"""The actor system: spawns and tracks the actors of one runtime, and stops them in order.

Nothing here uses pykka's process-global ``ActorRegistry``: two systems in one process (two
runtimes in one test) never see each other's actors.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from troupe._support._clock import Clock, SystemClock
from troupe._support._ioloop import IOLoop
from troupe.actors._actor import Actor, ActorRef, Down, MonitorRef, _Cell
from troupe.errors import ActorError

__all__ = ["ActorSystem"]

M = TypeVar("M")


class ActorSystem:
    """Owns a set of actors, the clock they schedule on and (optionally) the I/O loop.

    Args:
        name: used in thread names and logs.
        clock: injected time; a ``SystemClock`` owned by the system if omitted.
        io_loop: the runtime's I/O loop, for actors that run coroutines (:meth:`Actor.run_io`).
    """

    def __init__(
        self, name: str = "troupe", *, clock: Clock | None = None, io_loop: IOLoop | None = None
    ) -> None:
        self.name = name
        self._owns_clock = clock is None
        self.clock: Clock = clock if clock is not None else SystemClock(f"{name}-clock")
        self._io_loop = io_loop
        self._lock = threading.Lock()
        # Insertion order is spawn order; value = parent (None for top-level actors).
        self._actors: dict[ActorRef[Any], ActorRef[Any] | None] = {}
        self._closed = False

    def io_loop(self) -> IOLoop:
        """The I/O loop actors submit coroutines to."""
        if self._io_loop is None:
            raise ActorError(f"actor system {self.name} has no I/O loop")
        return self._io_loop

    def spawn(
        self,
        factory: Callable[[], Actor[M]],
        *,
        name: str | None = None,
        parent: ActorRef[Any] | None = None,
    ) -> ActorRef[M]:
        """Create an actor with ``factory`` (usually its class) and start its thread.

        Args:
            factory: returns a fresh, unstarted :class:`Actor`.
            name: unique name (default ``ClassName-N``); also the thread's name.
            parent: the supervising actor; :meth:`shutdown` leaves children to their parent.
        """
        with self._lock:
            if self._closed:
                raise ActorError(f"actor system {self.name} is shut down")
        actor = factory()
        if not isinstance(actor, Actor):
            raise TypeError(f"spawn() factory returned {type(actor).__name__}, not an Actor")
        ref = actor._bind(self, name)
        actor._cell.on_dead = self._forget
        with self._lock:
            self._actors[ref] = parent
        actor._start_actor_loop()
        return ref

    def _forget(self, cell: _Cell) -> None:
        with self._lock:
            if cell.ref is not None:
                self._actors.pop(cell.ref, None)

    def actors(self) -> list[ActorRef[Any]]:
        """The live actors, in spawn order."""
        with self._lock:
            return list(self._actors)

    def monitor(self, target: ActorRef[Any], watcher: ActorRef[Any]) -> MonitorRef:
        """Deliver one :class:`Down` about ``target`` to ``watcher``'s ``on_down``."""

        def deliver(down: Down) -> None:
            watcher._deliver_system(down)

        return target._cell.add_monitor(deliver)

    def watch(self, target: ActorRef[Any], callback: Callable[[Down], None]) -> MonitorRef:
        """Call ``callback(down)`` (on the dying actor's thread) when ``target`` stops."""
        return target._cell.add_monitor(callback)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every actor: top-level actors in reverse spawn order (supervisors stop their own
        children), then any stragglers; join their threads; close the clock if owned."""
        with self._lock:
            self._closed = True
            top = [ref for ref, parent in self._actors.items() if parent is None]
        for ref in reversed(top):
            ref.stop(timeout=timeout)
        for ref in reversed(self.actors()):
            ref.stop(timeout=timeout)
        if self._owns_clock:
            self.clock.close()
