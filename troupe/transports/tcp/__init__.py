"""The TCP request plane (the default): ZeroMQ ROUTER on the worker, pooled DEALERs on the caller.

The worker binds one ROUTER socket on ``DYN_TCP_RPC_HOST``:``DYN_TCP_RPC_PORT`` (port 0 lets the
OS pick; :attr:`TcpServer.address` reports the real one). A caller keeps up to
``DYN_TCP_POOL_SIZE`` DEALER sockets per worker address and multiplexes many requests on each by
request id. One message carries one codec frame, or a batch of small frames queued in the same
loop iteration (``_codec.encode_batch``, at most ``_codec.BATCH_MAX_BYTES``, and none when
``DYN_TCP_MAX_MESSAGE_SIZE`` is smaller: a batch must fit the peer's limit too); the ROUTER adds
the peer identity. A frame the peer cannot decode costs only its own request: the worker answers
it with a ``ProtocolError`` when its request id can be read, the caller fails that one stream.

Modules, one per role:

- ``_pump``: what both ends share: :data:`SCHEME`, heartbeat settings, message batching, and the
  pump that drives one ZeroMQ socket from the event loop (performance notes live there).
- ``_server``: the worker side, :class:`TcpServer` (its failure handling and memory bounds).
- ``_connection``: the caller side of one DEALER socket to one worker (connect, disconnect,
  collected streams).
- ``_client``: the caller side, :class:`TcpClient`, its pools of connections per worker address.
"""

from troupe.transports.tcp._client import TcpClient, create_client
from troupe.transports.tcp._pump import SCHEME
from troupe.transports.tcp._server import TcpServer, create_server

__all__ = ["SCHEME", "TcpClient", "TcpServer", "create_client", "create_server"]

# Reprs and tracebacks show the public path (troupe.transports.tcp.TcpServer), as before the split.
for _public in (TcpClient, TcpServer, create_client, create_server):
    _public.__module__ = __name__
del _public
