"""The request plane: one Server/Client interface, one module per transport, a sans-IO codec.

Transports: ``tcp`` (ZeroMQ, the default), ``http`` (HTTP/2), ``nats`` and ``inproc`` (in-process,
for tests). :class:`NetworkManager` builds the server for the configured plane and picks a client
by the scheme of the address it is given, so one process can call workers on every plane. What
every plane shares is written once: the caller's side of a request (``_session``, a sans-IO
``CallerSession`` each client drives), the server's (:class:`RequestRunner`), and the adapter that
runs a handler of any kind (:class:`HandlerAdapter`).
"""

from troupe.transports._adapt import HandlerAdapter
from troupe.transports._base import (
    Client,
    PlaneModule,
    ResponseStream,
    Server,
    TransportSettings,
    remote_error,
)
from troupe.transports._context import (
    Handler,
    RequestContext,
    StopReason,
    is_resumable,
    resumable,
)
from troupe.transports._dispatch import RequestRunner, SendReply
from troupe.transports._manager import PLANES, NetworkManager
from troupe.transports.inproc import InprocClient, InprocRegistry, InprocServer

__all__ = [
    "PLANES",
    "Client",
    "Handler",
    "HandlerAdapter",
    "InprocClient",
    "InprocRegistry",
    "InprocServer",
    "NetworkManager",
    "PlaneModule",
    "RequestContext",
    "RequestRunner",
    "ResponseStream",
    "SendReply",
    "Server",
    "StopReason",
    "TransportSettings",
    "is_resumable",
    "remote_error",
    "resumable",
]
