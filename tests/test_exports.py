"""Each package exports exactly what we mean it to (STYLE.md: small public surface)."""

from __future__ import annotations

import importlib

import pytest

EXPECTED = {
    "troupe": {
        "Cancelled",
        "Config",
        "ConfigError",
        "DeadlineExceeded",
        "NoInstances",
        "Overloaded",
        "RemoteError",
        "RequestContext",
        "Router",
        "Runtime",
        "StreamBroken",
        "TransportError",
        "TroupeError",
        "__version__",
        "handler_factory",
        "resumable",
    },
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
    "troupe.testing.conformance": {
        "STORE_CHECKS",
        "TRANSPORT_CHECKS",
        "WORKER_ENDPOINTS",
        "Check",
        "NotApplicable",
        "PortSetting",
        "StoreUnderTest",
        "TransportUnderTest",
        "UnreachableStore",
        "WatchReader",
        "WorkerProcess",
        "check_store",
        "check_transport",
        "parametrize",
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


def test_the_public_face_shows_public_paths() -> None:
    troupe = importlib.import_module("troupe")
    assert len(troupe.__all__) <= 20
    for name in ("Runtime", "Router", "RequestContext", "Config", "resumable"):
        assert getattr(troupe, name).__module__ == "troupe", name
    assert repr(troupe.Runtime) == "<class 'troupe.Runtime'>"


def test_the_conformance_kits_show_public_paths() -> None:
    kits = importlib.import_module("troupe.testing.conformance")
    for name in kits.__all__:
        value = getattr(kits, name)
        if isinstance(value, type) or callable(value):
            assert value.__module__ == "troupe.testing.conformance", name
