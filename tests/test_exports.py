"""Each package exports exactly what we mean it to (STYLE.md: small public surface)."""

from __future__ import annotations

import importlib

import pytest

EXPECTED = {
    "troupe": {"Config", "Runtime", "__version__"},
    "troupe.actors": {
        "POLICIES",
        "ProcessActor",
        "Router",
        "RouterActor",
        "RouterSnapshot",
        "SetAside",
        "WorkerActor",
        "Actor",
        "ActorRef",
        "Joined",
        "LeaseActor",
        "LeaseInfo",
        "Left",
        "Register",
        "Subscribe",
        "Unregister",
        "Unsubscribe",
        "WatcherActor",
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
    },
}


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_all_is_what_we_mean_to_export(module: str) -> None:
    mod = importlib.import_module(module)
    assert set(mod.__all__) == EXPECTED[module]
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name} is listed in __all__ but missing"


def test_every_error_derives_from_troupe_error() -> None:
    errors = importlib.import_module("troupe.errors")
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.TroupeError), name
