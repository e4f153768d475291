"""The request plane's one interface: :class:`Server`, :class:`Client`, :class:`ResponseStream`.

Every transport (``inproc``, ``tcp``, ``http2``, ``nats``) implements :class:`Server` and
:class:`Client` in its own module and exposes two factories, ``create_server(settings)`` and
``create_client(settings)``, plus its address ``SCHEME`` (see :class:`PlaneModule`); the
:class:`~troupe.transports.NetworkManager` picks one by table lookup.

This module holds the interfaces and the settings handed to the factories. The shared semantics
live beside it so that each transport only moves frames: the server hands decoded requests to a
:class:`~troupe.transports._dispatch.RequestRunner`; the client feeds reply frames to its
:class:`~troupe.transports._session.CallerSession`, which hands each to its
:class:`ResponseStream` (:mod:`troupe.transports._stream`, re-exported here with
:class:`TimeoutSweep` and :func:`remote_error`), which turns them into chunks or typed errors and
enforces timeouts, deadlines and cancellation. All methods must be called on the event loop that
owns the transport (the runtime's I/O loop).
"""

from __future__ import annotations

import types
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from troupe._support._metrics import ServerMetrics
from troupe.config import NatsConfig, RequestPlaneConfig
from troupe.transports._context import Handler
from troupe.transports._dispatch import RequestRunner
from troupe.transports._stream import ResponseStream, TimeoutSweep, remote_error

if TYPE_CHECKING:
    from troupe.transports.inproc import InprocRegistry

__all__ = [
    "Client",
    "PlaneModule",
    "ResponseStream",
    "Server",
    "TimeoutSweep",
    "TransportSettings",
    "remote_error",
]


# --- the interface --------------------------------------------------------------------------------


class Server(ABC):
    """Hosts endpoint handlers and serves requests for them on one transport address.

    Subclasses implement :meth:`start`, :attr:`address` and :meth:`close`, and hand every decoded
    request to ``self._runner`` (a :class:`~troupe.transports._dispatch.RequestRunner`), which
    owns the handlers, deadlines, cancellation and in-flight accounting.

    Args:
        name: names the request tasks and log lines.
    """

    def __init__(self, name: str) -> None:
        self._runner = RequestRunner(name)

    def add_endpoint(self, name: str, handler: Handler) -> None:
        """Serve ``handler`` as endpoint ``name`` (before or after :meth:`start`).

        Raises:
            InvalidName: the name is empty.
            ConfigError: the endpoint is already served.
        """
        self._runner.add_endpoint(name, handler)

    def remove_endpoint(self, name: str) -> None:
        """Stop serving ``name`` to new requests (they get ``UnknownEndpoint``)."""
        self._runner.remove_endpoint(name)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoint names served."""
        return self._runner.endpoints

    @property
    def inflight(self) -> int:
        """Requests being served right now."""
        return self._runner.inflight

    def limit(self, max_inflight: int, max_inflight_per_caller: int) -> None:
        """Hold at most ``max_inflight`` requests at once, and ``max_inflight_per_caller`` for one
        caller (0 = no limit); beyond them new requests get ``Overloaded`` at once.

        Raises:
            ConfigError: a limit is not an integer >= 0.
        """
        self._runner.limit(max_inflight, max_inflight_per_caller)

    @property
    def metrics(self) -> ServerMetrics:
        """What this server refused or dropped, by reason (``Runtime`` exports it)."""
        return self._runner.metrics

    @abstractmethod
    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            ConfigError: the configured address cannot be bound (an explicit port already in
                use: the error names the port and its environment variable).
        """

    @property
    @abstractmethod
    def address(self) -> str:
        """The address the server actually listens on, with its scheme (``tcp://10.0.0.5:40123``).

        Raises:
            TransportError: the server is not started.
        """

    @abstractmethod
    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting requests, let running ones finish for ``grace`` seconds, stop the
        rest (their callers get ``StreamBroken``) and release the address. Idempotent."""

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.close()


class Client(ABC):
    """Sends requests to workers on one transport; one client serves many concurrent requests."""

    @abstractmethod
    async def request(
        self,
        address: str,
        endpoint: str,
        payload: bytes,
        *,
        deadline: float | None = None,
        headers: Mapping[str, str] | None = None,
        attempt: int = 0,
        received: int = 0,
    ) -> ResponseStream:
        """Send a request; return the stream of its response chunks.

        Args:
            address: the worker's address, as its server reports it.
            endpoint: the endpoint name.
            payload: the request body.
            deadline: UNIX epoch seconds; the worker does not start the request after it, and
                the stream raises ``DeadlineExceeded`` when it passes.
            headers: string metadata passed to the handler's context.
            attempt: how many times this request was sent before.
            received: how many chunks of the answer the caller already holds from earlier
                attempts (the handler sees it as ``ctx.received`` and may skip them).

        Raises:
            MessageTooLarge: the request exceeds the transport's limit; nothing was sent.
            ConnectTimeout: no connection to the worker within the connect timeout.
            ConnectionLost: the connection (or broker) is down.
            TransportClosed: the client is closed.
        """

    @abstractmethod
    async def close(self) -> None:
        """Fail every open stream with ``TransportClosed`` and release connections. Idempotent."""

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        await self.close()


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """Everything a transport factory may need: request-plane and NATS settings, and the
    in-process registry (``inproc`` only)."""

    request_plane: RequestPlaneConfig = field(default_factory=RequestPlaneConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    inproc: InprocRegistry | None = None


class PlaneModule(Protocol):
    """What each transport module provides to the :class:`~troupe.transports.NetworkManager`."""

    SCHEME: str
    """The scheme of the addresses its servers report (``"tcp"``, ``"http"``, ...)."""

    def create_server(self, settings: TransportSettings) -> Server:
        """A server for this plane, not yet started."""
        ...

    def create_client(self, settings: TransportSettings) -> Client:
        """A client for this plane."""
        ...
