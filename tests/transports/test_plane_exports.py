"""Each plane package exports exactly its plane module interface, under its public path."""

from __future__ import annotations

import importlib

import pytest

EXPECTED = {
    "troupe.transports.tcp": {"SCHEME", "TcpClient", "TcpServer", "create_client", "create_server"},
    "troupe.transports.http2": {
        "CANCEL_PATH",
        "DEFAULT_CONNECT_TIMEOUT",
        "DEFAULT_MAX_MESSAGE_SIZE",
        "FRAMES_CONTENT_TYPE",
        "SCHEME",
        "Http2Client",
        "Http2Server",
        "create_client",
        "create_server",
    },
    "troupe.transports.nats": {
        "DEFAULT_PROBE_INTERVAL",
        "SCHEME",
        "SUBJECT_PREFIX",
        "NatsRpcClient",
        "NatsRpcServer",
        "create_client",
        "create_server",
        "subject_of",
    },
}


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_all_is_the_plane_interface(module: str) -> None:
    mod = importlib.import_module(module)
    assert set(mod.__all__) == EXPECTED[module]
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name} is listed in __all__ but missing"


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_classes_and_functions_show_the_package_path(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        value = getattr(mod, name)
        if callable(value):
            assert value.__module__ == module, name
