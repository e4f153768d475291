"""An actor that closes something of the KV event plane when its runtime stops.

A :class:`~troupe.kv.KvPublisher` or :class:`~troupe.kv.KvFollower` made for a runtime owns tasks
on the runtime's I/O loop; they must stop before the loop does. The runtime stops its actors in
reverse spawn order before it stops the loop, so an actor spawned right after the thing it owns
closes it at the right time: this one, whose only job is :meth:`Closer.stopped`.

Imported only by :mod:`troupe.kv._runtime`'s functions: :mod:`troupe.kv` itself sits below the
actors (their KV routing policy imports it).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from troupe._support._ioloop import IOLoop
from troupe._support._logging import get_logger
from troupe.actors import Actor, ExitReason
from troupe.errors import TroupeError

__all__ = ["Closer"]

_log = get_logger("troupe.kv.owner")


class Closer(Actor[Any]):
    """Runs ``close()`` on ``io`` when it stops (at the latest, when its runtime closes)."""

    def __init__(
        self, io: IOLoop, close: Callable[[], Coroutine[Any, Any, None]], timeout: float = 10.0
    ) -> None:
        super().__init__()
        self._io = io
        self._close = close
        self._timeout = timeout

    def receive(self, message: Any) -> None:
        return None

    def stopped(self, reason: ExitReason, error: BaseException | None) -> None:
        try:
            self._io.run(self._close(), timeout=self._timeout)
        except (TroupeError, TimeoutError) as exc:
            _log.warning("did not close cleanly", actor=self.name, error=str(exc))
