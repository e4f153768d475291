"""The network manager: builds this process's server and the clients it calls workers with.

The plane a worker serves on comes from ``DYN_REQUEST_PLANE`` (``RequestPlaneConfig.plane``); the
plane a caller uses comes from the scheme of the worker's address, so one process can call
workers on every plane at once. Choosing is a lookup in :data:`PLANES`; transport modules are
imported on first use, so a process that never touches NATS never imports ``nats``.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Mapping
from typing import Final, cast
from urllib.parse import urlsplit

from troupe.config import NatsConfig, RequestPlaneConfig
from troupe.errors import ConfigError, TransportClosed, TransportError
from troupe.transports._base import Client, PlaneModule, Server, TransportSettings
from troupe.transports.inproc import InprocRegistry

__all__ = ["PLANES", "NetworkManager"]

PLANES: Final[Mapping[str, str]] = {
    "tcp": "troupe.transports.tcp",
    "http": "troupe.transports.http2",
    "nats": "troupe.transports.nats",
    "inproc": "troupe.transports.inproc",
}
"""Plane name → the module implementing it (see :class:`~troupe.transports.PlaneModule`)."""

_SCHEMES: Final[Mapping[str, str]] = {
    "tcp": "tcp",
    "http": "http",
    "https": "http",  # an HTTP/2 worker serving TLS
    "nats": "nats",
    "inproc": "inproc",
}
"""Address scheme → plane name."""

_ADDRESS_CACHE: Final = 4096
"""Worker addresses whose client :meth:`NetworkManager.client_for` remembers."""


def _plane_module(plane: str) -> PlaneModule:
    try:
        name = PLANES[plane]
    except KeyError:
        raise ConfigError("DYN_REQUEST_PLANE", plane, choices=tuple(PLANES)) from None
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise TransportError(f"request plane {plane!r} is not available: {exc}") from exc
    return cast(PlaneModule, module)


def plane_of(address: str) -> str:
    """The plane serving ``address``, from its scheme.

    Raises:
        TransportError: the scheme names no plane.
    """
    scheme = urlsplit(address).scheme
    plane = _SCHEMES.get(scheme)
    if plane is None:
        raise TransportError(
            f"no request plane for address {address!r}; known schemes: {', '.join(_SCHEMES)}",
            address=address,
        )
    return plane


class NetworkManager:
    """Owns the clients of one process (one per plane, created on first use) and builds servers.

    Must be used on the event loop that owns the transports (the runtime's I/O loop).

    Args:
        request_plane: the request-plane settings; ``plane`` selects the server's transport.
        nats: the NATS connection settings.
        inproc: the registry of the in-process plane, if it is used.
    """

    def __init__(
        self,
        request_plane: RequestPlaneConfig | None = None,
        nats: NatsConfig | None = None,
        inproc: InprocRegistry | None = None,
    ) -> None:
        self.settings = TransportSettings(
            request_plane=request_plane if request_plane is not None else RequestPlaneConfig(),
            nats=nats if nats is not None else NatsConfig(),
            inproc=inproc,
        )
        self._clients: dict[str, Client] = {}
        # address -> its client: routers call client_for() once per request, and parsing the
        # scheme (urlsplit) costs more than the lookup. Bounded: cleared when it grows large.
        self._by_address: dict[str, Client] = {}
        self._closed = False

    @property
    def plane(self) -> str:
        """The plane this process serves on."""
        return self.settings.request_plane.plane

    def create_server(self, plane: str | None = None) -> Server:
        """A server (not yet started) for the configured plane, or for ``plane`` if given.

        Raises:
            ConfigError: the plane is unknown.
            TransportError: the plane's module cannot be imported.
        """
        return _plane_module(plane or self.plane).create_server(self.settings)

    def client_for(self, address: str) -> Client:
        """The client that reaches ``address``, picked by its scheme and cached.

        Raises:
            TransportError: the address's scheme names no plane.
            TransportClosed: the manager is closed.
        """
        client = self._by_address.get(address)
        if client is not None and not self._closed:
            return client
        client = self.client(plane_of(address))
        if len(self._by_address) >= _ADDRESS_CACHE:
            self._by_address.clear()
        self._by_address[address] = client
        return client

    def client(self, plane: str) -> Client:
        """The client of ``plane`` (``"tcp"``, ``"http"``, ``"nats"``, ``"inproc"``), cached.

        Raises:
            ConfigError: the plane is unknown.
            TransportError: the plane's module cannot be imported.
            TransportClosed: the manager is closed.
        """
        if self._closed:
            raise TransportClosed("network manager is closed")
        client = self._clients.get(plane)
        if client is None:
            client = _plane_module(plane).create_client(self.settings)
            self._clients[plane] = client
        return client

    async def close(self) -> None:
        """Close every client. Idempotent."""
        self._closed = True
        clients = list(self._clients.values())
        self._clients.clear()
        self._by_address.clear()
        if clients:
            await asyncio.gather(*(client.close() for client in clients))
