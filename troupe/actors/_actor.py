"""The actor core: typed actors on pykka threads, typed refs, replies, monitors.

An :class:`Actor` subclass declares the msgspec message union it accepts (``Actor[A | B]``) and
handles one message at a time in :meth:`Actor.receive` on its own pykka thread. Other code holds an
:class:`ActorRef` and talks to it with :meth:`~ActorRef.tell` (fire and forget) or
:meth:`~ActorRef.ask` (request/reply; also awaitable from asyncio with
:meth:`~ActorRef.ask_async` without blocking the event loop).

Failure semantics follow OTP rather than pykka: an exception escaping :meth:`Actor.receive` (for a
tell *or* an ask) crashes the actor. The pending ask, every other pending ask, and every ask made
afterwards fail at once with :class:`~troupe.errors.ActorDead` (the crash is its ``__cause__``);
monitors receive exactly one :class:`Down`. A supervisor decides what happens next.

This module holds :class:`Actor` and its pykka wiring; the refs, replies, monitors and the
:class:`_Cell` of reply bookkeeping they share with the actor live in :mod:`troupe.actors._ref`
(and are importable from here too).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import types
import typing
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import msgspec
import pykka

from troupe.actors._ref import (
    ActorRef,
    Down,
    ExitReason,
    MonitorRef,
    Reply,
    _Envelope,
    _SystemEnvelope,
)
from troupe.actors._ref import _Cell as _Cell  # noqa: PLC0414 - re-exported for ActorSystem
from troupe.errors import ActorDead

if TYPE_CHECKING:
    from troupe._support._clock import TimerHandle
    from troupe.actors._system import ActorSystem

__all__ = ["Actor", "ActorRef", "Down", "ExitReason", "MonitorRef", "Reply"]

M = TypeVar("M")
T = TypeVar("T")


def _accepted_types(cls: type) -> tuple[type, ...] | None:
    """The message classes an actor class accepts, from ``accepts`` or its ``Actor[...]`` base."""
    declared = cls.__dict__.get("accepts")
    if declared is None:
        for base in getattr(cls, "__orig_bases__", ()):
            if typing.get_origin(base) is Actor:
                (declared,) = typing.get_args(base)
                break
    if declared is None:
        parent = next((b for b in cls.__mro__[1:] if issubclass(b, Actor)), None)
        return parent._accepts if parent is not None and parent is not Actor else None
    if declared is Any:
        return None
    members = (
        typing.get_args(declared)
        if isinstance(declared, types.UnionType) or typing.get_origin(declared) is typing.Union
        else (declared,)
    )
    for member in members:
        if isinstance(member, TypeVar):
            return None  # a generic intermediate class: its concrete subclasses declare the union
        if not (isinstance(member, type) and issubclass(member, msgspec.Struct)):
            raise TypeError(f"{cls.__name__} accepts {member!r}, which is not a msgspec.Struct")
    return tuple(members)


_names = itertools.count(1)


class Actor(pykka.ThreadingActor, Generic[M]):
    """Base class of every troupe actor.

    Subclass it as ``class Counter(Actor[Increment | Get])`` and implement :meth:`receive`. Start
    it with :meth:`ActorSystem.spawn <troupe.actors.ActorSystem.spawn>`; never call pykka's
    ``start``. Hooks :meth:`started` and :meth:`stopped` run on the actor's thread.
    """

    accepts: ClassVar[Any] = None
    _accepts: ClassVar[tuple[type, ...] | None] = None

    _cell: _Cell
    _system: ActorSystem
    _ref: ActorRef[M]
    _current_reply: concurrent.futures.Future[Any] | None
    _deferred: bool
    _exit: tuple[ExitReason, BaseException | None]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._accepts = _accepted_types(cls)

    # --- hooks for subclasses ------------------------------------------------------------------

    def receive(self, message: M) -> Any:
        """Handle one message; the return value answers an ask. Raise to crash the actor."""
        raise NotImplementedError(f"{type(self).__name__} must implement receive()")

    def on_down(self, down: Down) -> None:
        """A monitored actor stopped (see :meth:`monitor`). Default: ignore."""

    def started(self) -> None:
        """Called on the actor's thread before the first message. Raise to crash."""

    def stopped(self, reason: ExitReason, error: BaseException | None) -> None:
        """Called on the actor's thread as it stops, whatever the reason."""

    # --- API for subclasses --------------------------------------------------------------------

    @property
    def ref(self) -> ActorRef[M]:
        """This actor's own ref."""
        return self._ref

    @property
    def name(self) -> str:
        """This actor's name."""
        return self._cell.name

    @property
    def system(self) -> ActorSystem:
        """The system this actor runs in."""
        return self._system

    def monitor(self, target: ActorRef[Any]) -> MonitorRef:
        """Receive one :class:`Down` in :meth:`on_down` when ``target`` stops (at once if dead)."""
        return self._system.monitor(target, self._ref)

    def demonitor(self, mon: MonitorRef) -> None:
        """Stop watching; no ``Down`` is delivered for this monitor afterwards."""
        mon._cell.remove_monitor(mon)

    def defer(self) -> Reply:
        """Answer the ask being handled later, through the returned :class:`Reply`.

        The return value of the current :meth:`receive` is then ignored. If the actor dies first,
        the asker gets ``ActorDead``.
        """
        if self._current_reply is None:
            raise RuntimeError("defer() called outside the handling of an ask")
        self._deferred = True
        return Reply(self._cell, self._current_reply)

    def send_after(self, delay: float, message: M) -> TimerHandle:
        """Deliver ``message`` to this actor after ``delay`` seconds of the system's clock."""
        ref = self._ref

        def fire() -> None:
            if ref.is_alive():
                try:
                    ref.tell(message)
                except ActorDead:
                    pass  # it died between the check and the send; nothing to deliver to

        return self._system.clock.call_later(delay, fire)

    def run_io(
        self,
        coro: Coroutine[Any, Any, T],
        on_done: Callable[[concurrent.futures.Future[T]], M],
    ) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the runtime's I/O loop; its outcome comes back as a message.

        ``on_done`` turns the finished future into a message for this actor; it runs on the I/O
        loop thread, so it must only build the message. The actor's mailbox never blocks on I/O.
        """
        fut = self._system.io_loop().submit(coro)
        ref = self._ref

        def deliver(done: concurrent.futures.Future[T]) -> None:
            if ref.is_alive():
                try:
                    ref.tell(on_done(done))
                except ActorDead:
                    pass

        fut.add_done_callback(deliver)
        return fut

    def stop_self(self) -> None:
        """Stop after this message, without processing the rest of the mailbox."""
        self._exit = ("normal", None)
        self._stop()

    # --- wiring (called by ActorSystem) --------------------------------------------------------

    def _bind(self, system: ActorSystem, name: str | None) -> ActorRef[M]:
        self._system = system
        self._cell = _Cell(name or f"{type(self).__name__}-{next(_names)}")
        self._ref = ActorRef(self._cell, self.actor_ref, self._accepts)
        self._cell.ref = self._ref
        self._current_reply = None
        self._deferred = False
        self._exit = ("normal", None)
        return self._ref

    def _start_actor_loop(self) -> None:
        thread = threading.Thread(target=self._actor_loop, name=self._cell.name)
        self._cell.thread = thread
        thread.start()

    def _actor_loop(self) -> None:
        try:
            super()._actor_loop()
        finally:
            reason, error = self._exit
            self._cell.mark_dead(reason, error)

    # --- pykka hooks, not for subclasses -------------------------------------------------------

    def on_start(self) -> None:
        try:
            self.started()
        except BaseException as exc:  # noqa: BLE001 - any crash is the actor's exit reason
            self._crash(exc)

    def on_stop(self) -> None:
        reason, error = self._exit
        self.stopped(reason, error)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _SystemEnvelope):
            try:
                self.on_down(message.message)
            except BaseException as exc:  # noqa: BLE001
                self._crash(exc)
            return None
        env: _Envelope = message
        self._current_reply = env.reply
        self._deferred = False
        try:
            result = self.receive(typing.cast(M, env.message))  # checked by the ref
        except BaseException as exc:  # noqa: BLE001 - OTP semantics: the actor crashes
            self._crash(exc)
            return None
        finally:
            self._current_reply = None
        if env.reply is not None and not self._deferred:
            self._cell.resolve(env.reply, result)
        return None

    def _crash(self, exc: BaseException) -> None:
        from troupe._support._logging import get_logger  # noqa: PLC0415 - avoid an import cycle at start

        get_logger("troupe.actors").error(
            "actor crashed", actor=self._cell.name, error=repr(exc), exc_info=exc
        )
        self._exit = ("error", exc)
        self._stop()
