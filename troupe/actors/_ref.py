"""Refs and replies: how other code talks to an actor, and the state it shares with the actor.

An :class:`ActorRef` sends with :meth:`~ActorRef.tell` (fire and forget) or :meth:`~ActorRef.ask`
(request/reply; also awaitable from asyncio with :meth:`~ActorRef.ask_async` without blocking the
event loop). A :class:`Reply` answers an ask later; a :class:`MonitorRef` names one monitor, whose
:class:`Down` arrives exactly once.

The reply bookkeeping lives in a :class:`_Cell` shared by refs and the actor, guarded by a lock, so
an ask can never be lost in the window between an actor's death and its inbox being drained.
:mod:`troupe.actors._actor` holds the actor side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

import msgspec
import pykka

from troupe.errors import ActorDead, AskTimeout, UnexpectedMessage

__all__ = ["ActorRef", "Down", "ExitReason", "MonitorRef", "Reply"]

M = TypeVar("M")

ExitReason = Literal["normal", "error"]
"""Why an actor stopped: ``normal`` (asked to stop) or ``error`` (it crashed)."""


class Down(msgspec.Struct, frozen=True, tag=True):
    """Sent to a monitoring actor, exactly once, when the monitored actor stops.

    Attributes:
        ref: the actor that stopped.
        reason: ``"normal"`` or ``"error"``.
        error: the exception that crashed it, when ``reason == "error"``.
    """

    ref: ActorRef[Any]
    reason: ExitReason
    error: BaseException | None = None


class _Envelope:
    """What travels through the pykka inbox: a message and the future to answer, if any."""

    __slots__ = ("message", "reply")

    def __init__(self, message: object, reply: concurrent.futures.Future[Any] | None) -> None:
        self.message = message
        self.reply = reply


class _SystemEnvelope:
    """A system message (:class:`Down`) that bypasses the actor's declared message union."""

    __slots__ = ("message",)

    def __init__(self, message: Down) -> None:
        self.message = message


class MonitorRef:
    """Handle of one monitor; pass it to :meth:`Actor.demonitor` to stop watching."""

    __slots__ = ("_callback", "_cell")

    def __init__(self, cell: _Cell, callback: Callable[[Down], None]) -> None:
        self._cell = cell
        self._callback = callback


class _Cell:
    """State shared between an actor and its refs: liveness, pending replies, monitors."""

    __slots__ = (
        "alive",
        "exit_error",
        "exit_reason",
        "lock",
        "monitors",
        "name",
        "on_dead",
        "pending",
        "ref",
        "thread",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.alive = True
        self.pending: set[concurrent.futures.Future[Any]] = set()
        self.monitors: list[MonitorRef] = []
        self.exit_reason: ExitReason | None = None
        self.exit_error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.ref: ActorRef[Any] | None = None
        self.on_dead: Callable[[_Cell], None] | None = None

    def register(self, fut: concurrent.futures.Future[Any]) -> None:
        with self.lock:
            if not self.alive:
                raise self.dead_error()
            self.pending.add(fut)

    def resolve(self, fut: concurrent.futures.Future[Any], value: Any) -> None:
        with self.lock:
            self.pending.discard(fut)
        if not fut.done():
            try:
                fut.set_result(value)
            except concurrent.futures.InvalidStateError:  # the asker gave up meanwhile
                pass

    def fail(self, fut: concurrent.futures.Future[Any], exc: BaseException) -> None:
        with self.lock:
            self.pending.discard(fut)
        if not fut.done():
            try:
                fut.set_exception(exc)
            except concurrent.futures.InvalidStateError:
                pass

    def dead_error(self) -> ActorDead:
        detail = repr(self.exit_error) if self.exit_error is not None else ""
        err = ActorDead(self.name, self.exit_reason, detail)
        err.__cause__ = self.exit_error
        return err

    def add_monitor(self, callback: Callable[[Down], None]) -> MonitorRef:
        mon = MonitorRef(self, callback)
        with self.lock:
            if self.alive:
                self.monitors.append(mon)
                return mon
        # Already dead: deliver at once, as OTP does for a monitor on a dead process.
        callback(self._down())
        return mon

    def remove_monitor(self, mon: MonitorRef) -> None:
        with self.lock:
            if mon in self.monitors:
                self.monitors.remove(mon)

    def mark_dead(self, reason: ExitReason, error: BaseException | None) -> None:
        """Called exactly once, from the actor's thread, after its loop has ended."""
        with self.lock:
            self.alive = False
            self.exit_reason = reason
            self.exit_error = error
            pending, self.pending = self.pending, set()
            monitors, self.monitors = self.monitors, []
        for fut in pending:
            self.fail(fut, self.dead_error())
        if self.on_dead is not None:
            self.on_dead(self)
        down = self._down()
        for mon in monitors:
            mon._callback(down)

    def _down(self) -> Down:
        assert self.ref is not None
        return Down(ref=self.ref, reason=self.exit_reason or "normal", error=self.exit_error)


class ActorRef(Generic[M]):
    """A handle to a running actor; the only way other code talks to it.

    ``M`` is the message union the actor accepts; sending anything else raises
    :class:`~troupe.errors.UnexpectedMessage` before it reaches the mailbox.
    """

    __slots__ = ("_accepts", "_cell", "_pykka")

    def __init__(
        self, cell: _Cell, pykka_ref: pykka.ActorRef[Any], accepts: tuple[type, ...] | None
    ) -> None:
        self._cell = cell
        self._pykka = pykka_ref
        self._accepts = accepts

    @property
    def name(self) -> str:
        """The actor's unique name within its system (also its thread's name)."""
        return self._cell.name

    def is_alive(self) -> bool:
        """Whether the actor still accepts messages."""
        return self._cell.alive

    @property
    def exit_reason(self) -> ExitReason | None:
        """``None`` while alive; afterwards why it stopped."""
        return self._cell.exit_reason

    def _check(self, message: object) -> None:
        if self._accepts is not None and not isinstance(message, self._accepts):
            raise UnexpectedMessage(self.name, message, [t.__name__ for t in self._accepts])

    def _put(self, envelope: object) -> None:
        try:
            self._pykka.tell(envelope)
        except pykka.ActorDeadError as exc:
            raise self._cell.dead_error() from exc

    def tell(self, message: M) -> None:
        """Send ``message`` without waiting. Raises ``ActorDead`` if the actor is known dead."""
        self._check(message)
        if not self._cell.alive:
            raise self._cell.dead_error()
        self._put(_Envelope(message, None))

    def ask_future(self, message: M) -> concurrent.futures.Future[Any]:
        """Send ``message`` and return a future of the reply (fails with ``ActorDead`` at death)."""
        self._check(message)
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._cell.register(fut)
        try:
            self._put(_Envelope(message, fut))
        except ActorDead as exc:
            self._cell.fail(fut, exc)
        return fut

    def ask(self, message: M, *, timeout: float | None = 5.0) -> Any:
        """Send ``message`` and block for the reply.

        Raises:
            ActorDead: the actor is dead, or died before replying (at once, not at the timeout).
            AskTimeout: no reply within ``timeout`` seconds.
        """
        fut = self.ask_future(message)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            with self._cell.lock:
                self._cell.pending.discard(fut)
            raise AskTimeout(self.name, timeout or 0.0) from None

    async def ask_async(self, message: M, *, timeout: float | None = 5.0) -> Any:
        """Like :meth:`ask`, awaited from asyncio without blocking the event loop.

        The reply resolves an ``asyncio.Future`` through ``loop.call_soon_threadsafe`` (via
        :func:`asyncio.wrap_future`); the actor thread never touches the loop otherwise.
        """
        fut = self.ask_future(message)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except TimeoutError:
            with self._cell.lock:
                self._cell.pending.discard(fut)
            raise AskTimeout(self.name, timeout or 0.0) from None

    def stop(self, *, timeout: float | None = 5.0) -> bool:
        """Stop the actor after the messages already queued, and join its thread.

        Returns ``True`` once the actor is stopped (or already was), ``False`` if it did not stop
        within ``timeout``. Called from the actor's own thread it only requests the stop.
        """
        if self._cell.alive:
            try:
                self._pykka.stop(block=False)
            except pykka.ActorDeadError:
                pass
        return self.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the actor's thread to end; ``True`` if it has."""
        thread = self._cell.thread
        if thread is None or thread is threading.current_thread():
            return not self._cell.alive
        thread.join(timeout)
        return not thread.is_alive()

    def _deliver_system(self, down: Down) -> None:
        """Put a system message in the actor's mailbox, bypassing the message union."""
        try:
            self._pykka.tell(_SystemEnvelope(down))
        except pykka.ActorDeadError:
            pass  # a dead watcher needs no news

    def __repr__(self) -> str:
        state = "alive" if self._cell.alive else f"dead:{self._cell.exit_reason}"
        return f"<ActorRef {self.name} {state}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorRef) and other._cell is self._cell

    def __hash__(self) -> int:
        return id(self._cell)


class Reply:
    """A reply the actor will give later (see :meth:`Actor.defer`)."""

    __slots__ = ("_cell", "_fut")

    def __init__(self, cell: _Cell, fut: concurrent.futures.Future[Any]) -> None:
        self._cell = cell
        self._fut = fut

    def set(self, value: Any) -> None:
        """Answer the ask with ``value``."""
        self._cell.resolve(self._fut, value)

    def fail(self, exc: BaseException) -> None:
        """Answer the ask by raising ``exc`` in the asker."""
        self._cell.fail(self._fut, exc)

    @property
    def done(self) -> bool:
        """Whether the ask has been answered (or abandoned by the asker)."""
        return self._fut.done()
