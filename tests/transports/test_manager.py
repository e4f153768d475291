"""The network manager: the server's plane from config, clients by address scheme."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from troupe.config import RequestPlaneConfig, TcpConfig
from troupe.errors import ConfigError, TransportClosed, TransportError
from troupe.transports import PLANES, InprocRegistry, NetworkManager
from troupe.transports._manager import plane_of
from troupe.transports.inproc import InprocClient, InprocServer
from troupe.transports.tcp import TcpClient, TcpServer


async def test_server_follows_the_configured_plane() -> None:
    manager = NetworkManager(RequestPlaneConfig(plane="tcp", tcp=TcpConfig(host="127.0.0.1")))
    server = manager.create_server()
    assert isinstance(server, TcpServer)
    await server.start()
    assert server.address.startswith("tcp://127.0.0.1:")
    await server.close()
    await manager.close()


async def test_clients_are_picked_by_scheme_and_cached() -> None:
    manager = NetworkManager(inproc=InprocRegistry())
    tcp = manager.client_for("tcp://127.0.0.1:1")
    assert isinstance(tcp, TcpClient)
    assert manager.client_for("tcp://10.0.0.9:2") is tcp
    assert isinstance(manager.client_for("inproc://w"), InprocClient)
    assert isinstance(manager.create_server("inproc"), InprocServer)
    with pytest.raises(TransportError, match="no request plane"):
        manager.client_for("ftp://127.0.0.1:1")
    await manager.close()
    with pytest.raises(TransportClosed):
        manager.client_for("tcp://127.0.0.1:1")


async def test_inproc_needs_a_registry() -> None:
    manager = NetworkManager()
    with pytest.raises(ConfigError, match="inproc registry"):
        manager.client_for("inproc://w")
    with pytest.raises(ConfigError, match="DYN_REQUEST_PLANE"):
        manager.create_server("carrier-pigeon")


def test_scheme_table() -> None:
    assert plane_of("tcp://h:1") == "tcp"
    assert plane_of("http://h:1/v1/rpc") == "http"
    assert plane_of("nats:troupe.rpc.0123456789abcdef") == "nats"
    assert plane_of("inproc://w") == "inproc"


@pytest.mark.parametrize("plane", list(PLANES))
def test_every_plane_module_provides_the_factories(plane: str) -> None:
    module = importlib.import_module(PLANES[plane])
    assert plane == module.SCHEME
    assert callable(module.create_server)
    assert callable(module.create_client)
