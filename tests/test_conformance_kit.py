"""The conformance kits themselves (``troupe.testing.conformance``): running checks, reporting a
failure by name, skipping what a subject cannot do, and the kit's own ``raises``."""

from __future__ import annotations

import asyncio

import pytest

from troupe.config import TcpConfig
from troupe.discovery import MemoryKvServer, MemoryStore
from troupe.errors import StreamBroken, TransportError
from troupe.testing.conformance import (
    STORE_CHECKS,
    TRANSPORT_CHECKS,
    Check,
    NotApplicable,
    StoreUnderTest,
    TransportUnderTest,
    UnreachableStore,
    check_store,
    check_transport,
    parametrize,
)
from troupe.testing.conformance._check import raises, run_checks
from troupe.transports.tcp import TcpClient, TcpServer


class Subject:
    def __init__(self, feature: object = None) -> None:
        self.feature = feature


async def _passes(subject: Subject) -> None:
    return None


async def _fails(subject: Subject) -> None:
    raise StreamBroken("the stream broke")


def test_check_names_are_unique_and_documented() -> None:
    for checks in (TRANSPORT_CHECKS, STORE_CHECKS):
        names = [check.name for check in checks]
        assert len(set(names)) == len(names)
        assert all(check.doc for check in checks), [c.name for c in checks if not c.doc]


async def test_run_checks_names_the_failing_check_and_chains_the_cause() -> None:
    checks = [Check("fine", "", (), _passes), Check("broken", "", (), _fails)]
    expected = "thing check 'broken' failed: the stream broke"
    with pytest.raises(AssertionError, match=expected) as info:
        await run_checks("thing", checks, Subject(), timeout=5)
    assert isinstance(info.value.__cause__, StreamBroken)


async def test_run_checks_skips_what_the_subject_cannot_do() -> None:
    checks = [Check("needs-feature", "", ("feature",), _fails), Check("fine", "", (), _passes)]
    assert await run_checks("thing", checks, Subject(), timeout=5) == ["fine"]
    assert checks[0].missing(Subject()) == ("feature",)
    assert checks[0].applies_to(Subject(feature=1))


async def test_run_checks_stops_a_check_at_its_timeout() -> None:
    async def hangs(subject: Subject) -> None:
        await asyncio.Event().wait()

    with pytest.raises(AssertionError, match="'hangs' failed: TimeoutError"):
        await run_checks("thing", [Check("hangs", "", (), hangs)], Subject(), timeout=0.05)


async def test_a_check_that_does_not_apply_skips_under_pytest() -> None:
    check = Check("needs-feature", "", ("feature",), _passes)
    with pytest.raises(pytest.skip.Exception, match="needs-feature needs feature"):
        await check(Subject())
    assert issubclass(NotApplicable, Exception)


def test_parametrize_gives_one_test_per_check_named_after_it() -> None:
    mark = parametrize(TRANSPORT_CHECKS)
    assert mark.args[0] == "check"
    assert mark.kwargs["ids"] == [check.name for check in TRANSPORT_CHECKS]


async def test_raises_names_what_was_expected_and_what_came() -> None:
    with raises(TransportError) as info:
        raise StreamBroken("gone")
    assert isinstance(info.value, StreamBroken)
    nothing = r"expected StreamBroken \(reading\), nothing"
    with pytest.raises(AssertionError, match=nothing), raises(StreamBroken, "reading"):
        pass
    other = "expected StreamBroken, got ValueError: no"
    with pytest.raises(AssertionError, match=other), raises(StreamBroken):
        raise ValueError("no")
    # Never swallowed unless expected.
    with pytest.raises(asyncio.CancelledError), raises(StreamBroken):
        raise asyncio.CancelledError


async def test_check_store_runs_every_check_on_the_memory_store() -> None:
    server = MemoryKvServer()

    def unreachable() -> UnreachableStore:
        down = MemoryKvServer(name="memory://down")
        down.set_available(False)
        return UnreachableStore(MemoryStore(down), "memory://down")

    subject = StoreUnderTest(lambda: MemoryStore(server), "memory", unreachable=unreachable)
    assert await check_store(subject) == [check.name for check in STORE_CHECKS]


async def test_check_transport_runs_what_applies_to_tcp() -> None:
    config = TcpConfig(host="127.0.0.1", max_message_size=1 << 20)
    subject = TransportUnderTest(
        server=lambda: TcpServer(config),
        client=lambda: TcpClient(config),
        request_limit=1 << 20,
    )
    ran = await check_transport(subject)
    optional = {"timed_client", "reply_limit", "port", "worker"}
    assert ran == [c.name for c in TRANSPORT_CHECKS if not set(c.needs) & optional]
