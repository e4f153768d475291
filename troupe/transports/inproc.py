"""The in-process transport (``inproc://name``): the request plane without sockets.

Servers register under a name in an :class:`InprocRegistry` that the caller creates and passes
around explicitly (no module globals, so tests can run several side by side). Frames still go
through the codec, so requests and replies behave exactly as on the network planes: same size
limits, same decoding errors, same cancellation and deadline semantics. Everything runs on one
event loop. Meant for tests and for users testing their own handlers (``troupe.testing``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Mapping
from typing import Final, TypeAlias

from troupe._support._logging import get_logger
from troupe.errors import (
    ConfigError,
    ConnectionLost,
    MessageTooLarge,
    ProtocolError,
    TransportClosed,
    TransportError,
)
from troupe.messages._frames import Cancel, Error, Reply, Request, decode, encode
from troupe.transports._base import Client, ResponseStream, Server, TransportSettings
from troupe.transports._dispatch import SendReply
from troupe.transports._session import CallerSession, SessionStream

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "SCHEME",
    "InprocClient",
    "InprocRegistry",
    "InprocServer",
    "ReplySink",
    "create_client",
    "create_server",
]

SCHEME: Final = "inproc"
DEFAULT_MAX_MESSAGE_SIZE: Final = 32 * 1024 * 1024
_PREFIX: Final = "inproc://"

_log = get_logger("troupe.transports.inproc")

ReplySink: TypeAlias = Callable[[bytes], bool]
"""How a server hands an encoded reply frame back to its caller; ``False`` = caller gone."""


class InprocRegistry:
    """The names in-process servers listen on; create one per runtime or test.

    Args:
        max_message_size: the size limit of servers and clients built by the factories.
        request_timeout: the reply timeout of clients built by :func:`create_client`.
    """

    def __init__(
        self,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        request_timeout: float | None = 10.0,
    ) -> None:
        self.max_message_size = max_message_size
        self.request_timeout = request_timeout
        self._servers: dict[str, InprocServer] = {}
        self._counter = itertools.count(1)

    def __contains__(self, name: object) -> bool:
        return name in self._servers

    def lookup(self, name: str) -> InprocServer | None:
        """The server listening on ``name``, if any."""
        return self._servers.get(name)

    def bind(self, name: str | None, server: InprocServer) -> str:
        """Register ``server`` under ``name`` (a fresh ``worker-N`` name when ``None``).

        Raises:
            ConfigError: the name is taken.
        """
        if name is None:
            name = f"worker-{next(self._counter)}"
            while name in self._servers:
                name = f"worker-{next(self._counter)}"
        elif not name or "/" in name:
            raise ConfigError("inproc name", name, "a non-empty name without '/'")
        if name in self._servers:
            raise ConfigError("inproc name", name, "a name no other in-process server uses")
        self._servers[name] = server
        return name

    def unbind(self, name: str, server: InprocServer) -> None:
        """Remove ``server``'s registration (if it still holds ``name``)."""
        if self._servers.get(name) is server:
            del self._servers[name]


class InprocServer(Server):
    """A server reachable at ``inproc://name`` through its registry.

    Args:
        registry: where to register.
        name: the name to listen on; a fresh one when ``None``.
        max_message_size: the largest request accepted and chunk sent, in bytes (encoded).
    """

    def __init__(
        self,
        registry: InprocRegistry,
        name: str | None = None,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        super().__init__(f"inproc-{name or 'server'}")
        self._registry = registry
        self._wanted = name
        self._name: str | None = None
        self._max = max_message_size
        self._closed = False

    async def start(self) -> None:
        """Register the name.

        Raises:
            ConfigError: the name is already taken (names the name).
            TransportClosed: the server was closed.
        """
        if self._closed:
            raise TransportClosed("in-process server is closed")
        if self._name is None:
            self._name = self._registry.bind(self._wanted, self)

    @property
    def address(self) -> str:
        """``inproc://name``."""
        if self._name is None:
            raise TransportError("in-process server is not started")
        return _PREFIX + self._name

    def feed(self, data: bytes, peer: Hashable, reply: ReplySink) -> None:
        """Receive one encoded frame from ``peer``; replies go to ``reply``.

        Malformed or oversized frames are dropped (logged at debug level).
        """
        if self._closed or self._name is None:
            return
        if len(data) > self._max:
            _log.debug("dropping a frame over the size limit", size=len(data), limit=self._max)
            return
        try:
            frame = decode(data)
        except ProtocolError as exc:
            _log.debug("dropping an undecodable frame", error=str(exc))
            return
        if type(frame) is Request:
            self._runner.dispatch((peer, frame.id), frame, self._sender(reply, frame))
        elif type(frame) is Cancel:
            self._runner.cancel((peer, frame.id))
        else:
            _log.debug("dropping an unexpected frame from a caller", frame=type(frame).__name__)

    def _sender(self, reply: ReplySink, request: Request) -> SendReply:
        limit = self._max

        async def send(frame: Reply) -> bool:
            data = encode(frame)
            if len(data) > limit:
                exc = MessageTooLarge(len(data), limit)
                reply(encode(Error(request.id, "MessageTooLarge", str(exc))))
                return False
            return reply(data)

        return send

    async def close(self, grace: float = 0.0) -> None:
        """Stop serving; running requests are stopped after ``grace`` seconds."""
        if self._closed:
            return
        await self._runner.close(grace)
        self._closed = True
        if self._name is not None:
            self._registry.unbind(self._name, self)


class InprocClient(Client):
    """Calls in-process servers registered in ``registry``.

    Args:
        registry: where servers are looked up.
        max_message_size: the largest request sent, in bytes (encoded).
        request_timeout: the longest wait for the next reply frame, in seconds.
    """

    def __init__(
        self,
        registry: InprocRegistry,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        request_timeout: float | None = 10.0,
    ) -> None:
        self._registry = registry
        self._max = max_message_size
        self._timeout = request_timeout
        # A Cancel costs nothing here (the reply sink answers False), so none is remembered:
        # every chunk nobody reads stops its handler.
        self._session: CallerSession[SessionStream] = CallerSession(
            self._cancel, cancel_memory=0, log=_log
        )
        self._closed = False

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
        """Send a request to the in-process server at ``address``; see :meth:`Client.request`."""
        if self._closed:
            raise TransportClosed("in-process client is closed", address=address)
        if not address.startswith(_PREFIX):
            raise TransportError(f"not an in-process address: {address!r}", address=address)
        server = self._registry.lookup(address[len(_PREFIX) :])
        if server is None:
            raise ConnectionLost(f"no in-process server listening at {address}", address=address)
        session = self._session
        rid, data = session.ids.encode(
            address,
            endpoint,
            payload,
            deadline=deadline,
            headers=headers,
            attempt=attempt,
            received=received,
            limit=self._max,
        )
        stream = session.open(
            SessionStream(
                rid,
                address=address,
                endpoint=endpoint,
                request_timeout=self._timeout,
                deadline=deadline,
            )
        )
        server.feed(data, self, self._on_reply)
        return stream

    def _cancel(self, stream: SessionStream, cancel: Cancel) -> None:
        """The session's hook: tell the server of ``stream`` to stop its request."""
        target = self._registry.lookup(stream.address[len(_PREFIX) :])
        if target is not None:
            target.feed(encode(cancel), self, self._on_reply)

    def _on_reply(self, data: bytes) -> bool:
        if self._closed:
            return False
        # A Cancel for the reply means nobody reads the stream any more: stop the handler.
        return self._session.receive_data(data) is None

    async def close(self) -> None:
        """Fail open streams with ``TransportClosed`` and tell their servers to stop them."""
        if self._closed:
            return
        self._closed = True
        for stream, cancel in self._session.cancel_open():
            self._cancel(stream, cancel)
        self._session.fail_all(
            lambda stream: TransportClosed("in-process client closed", address=stream.address)
        )


def create_server(settings: TransportSettings) -> InprocServer:
    """An in-process server in ``settings.inproc``.

    Raises:
        ConfigError: no registry was given.
    """
    if settings.inproc is None:
        raise ConfigError("inproc registry", None, "an InprocRegistry (NetworkManager(inproc=))")
    registry = settings.inproc
    return InprocServer(registry, max_message_size=registry.max_message_size)


def create_client(settings: TransportSettings) -> InprocClient:
    """An in-process client for ``settings.inproc``.

    Raises:
        ConfigError: no registry was given.
    """
    if settings.inproc is None:
        raise ConfigError("inproc registry", None, "an InprocRegistry (NetworkManager(inproc=))")
    registry = settings.inproc
    return InprocClient(
        registry,
        max_message_size=registry.max_message_size,
        request_timeout=registry.request_timeout,
    )
