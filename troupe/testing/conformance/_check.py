"""What every conformance kit shares: a named :class:`Check`, running a list of them, and the
small assertion helpers the checks use (they must work without pytest).
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["Check", "NotApplicable", "Raises", "parametrize", "raises", "run_checks"]

S = TypeVar("S")
E = TypeVar("E", bound=BaseException)


class NotApplicable(Exception):
    """A check was run against a subject that lacks what it needs (outside pytest)."""


@dataclass(frozen=True)
class Check(Generic[S]):
    """One conformance check: an async function of the subject under test, with a name.

    Call it with the subject (``await check(subject)``); it raises ``AssertionError`` (or the
    unexpected exception) when the subject does not behave. ``needs`` names the optional
    attributes of the subject the check uses: when one of them is ``None`` or ``False`` the
    check does not apply, and calling it skips the test under pytest (raises
    :class:`NotApplicable` elsewhere).

    Attributes:
        name: the check's name, also its pytest id.
        doc: one line: what the check proves.
        needs: the optional subject attributes it needs.
    """

    name: str
    doc: str
    needs: tuple[str, ...]
    run: Callable[[S], Awaitable[None]] = field(repr=False)

    def __str__(self) -> str:
        return self.name

    def missing(self, subject: S) -> tuple[str, ...]:
        """The attributes this check needs that ``subject`` does not provide."""
        return tuple(need for need in self.needs if getattr(subject, need) in (None, False))

    def applies_to(self, subject: S) -> bool:
        """Whether ``subject`` provides everything this check needs."""
        return not self.missing(subject)

    async def __call__(self, subject: S) -> None:
        missing = self.missing(subject)
        if missing:
            reason = f"{self.name} needs {', '.join(missing)}, which the subject does not provide"
            pytest = sys.modules.get("pytest")
            if pytest is not None:
                pytest.skip(reason)
            raise NotApplicable(reason)
        await self.run(subject)


async def run_checks(
    kind: str, checks: Iterable[Check[S]], subject: S, *, timeout: float
) -> list[str]:
    """Run every check that applies to ``subject``, one after the other; return their names.

    Raises:
        AssertionError: a check failed (or raised something unexpected, or ran past
            ``timeout`` seconds); the message names it, and the cause is chained.
    """
    ran: list[str] = []
    for check in checks:
        if not check.applies_to(subject):
            continue
        try:
            async with asyncio.timeout(timeout):
                await check(subject)
        except Exception as exc:
            detail = str(exc) or type(exc).__name__
            raise AssertionError(f"{kind} check {check.name!r} failed: {detail}") from exc
        ran.append(check.name)
    return ran


def parametrize(checks: Sequence[Check[Any]], argname: str = "check") -> Any:
    """``pytest.mark.parametrize`` over ``checks``: one test per check, with the check's name
    as its id. Needs pytest (imported when called)."""
    import pytest  # noqa: PLC0415 - the kits run without pytest too

    return pytest.mark.parametrize(argname, list(checks), ids=[check.name for check in checks])


class Raises(Generic[E]):
    """What :func:`raises` gives: after the block, :attr:`value` is the exception raised."""

    def __init__(self, expected: type[E] | tuple[type[E], ...], what: str) -> None:
        self._expected = expected
        self._what = what
        self._value: E | None = None

    @property
    def value(self) -> E:
        """The exception the block raised."""
        assert self._value is not None, "the block has not raised yet"
        return self._value

    def __enter__(self) -> Raises[E]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool:
        names = (
            " or ".join(cls.__name__ for cls in self._expected)
            if isinstance(self._expected, tuple)
            else self._expected.__name__
        )
        where = f" ({self._what})" if self._what else ""
        if exc is None:
            raise AssertionError(f"expected {names}{where}, nothing was raised")
        if not isinstance(exc, self._expected):
            if not isinstance(exc, Exception):
                return False  # CancelledError, KeyboardInterrupt: never swallowed
            raise AssertionError(
                f"expected {names}{where}, got {type(exc).__name__}: {exc}"
            ) from exc
        self._value = exc
        return True


def raises(expected: type[E] | tuple[type[E], ...], what: str = "") -> Raises[E]:
    """``pytest.raises`` for the kits: the block must raise ``expected`` (or a subclass).

    Anything else that derives from ``Exception`` becomes an ``AssertionError`` naming both;
    ``asyncio.CancelledError`` passes through untouched.
    """
    return Raises(expected, what)
