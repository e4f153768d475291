"""The HTTP/2 request plane (``http(s)://host:port/root``): hypercorn serves, h2 calls.

The worker serves an ASGI app with hypercorn on the caller's running event loop (the runtime's I/O
loop), on a socket it binds itself, so port 0 reports the real port and a taken port fails with
one clear error. Both ends speak HTTP/2 with prior knowledge (h2c), or over TLS (ALPN h2, an
``https://`` address) when the worker has a certificate; HTTP/1.1 is served too, for debugging
with ``curl``.

Modules, one per role:

- ``_wire``: what both ends share: the scheme, paths, content type and limits of the wire format.
- ``_tls``: the ``ssl`` contexts of both ends (``DYN_HTTP_RPC_TLS_*``) and refused handshakes
  as :class:`~troupe.errors.TlsError`.
- ``_exchange``: the worker's ASGI plumbing: the bytes it holds for callers (``_Budget``) and the
  writer of one request's reply frames into its HTTP body (``_Exchange``).
- ``_server``: the worker side, :class:`Http2Server` (hypercorn, admission, cancels).
- ``_call``: the caller's side of one request: turns a response body into the stream's frames.
- ``_connection``: one HTTP/2 connection to one worker, an :class:`asyncio.Protocol` on ``h2``.
- ``_client``: the caller side, :class:`Http2Client`, its connection pools per ``host:port``.
"""

from troupe.transports.http2._client import Http2Client, create_client
from troupe.transports.http2._server import Http2Server, create_server
from troupe.transports.http2._wire import (
    CANCEL_PATH,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_SIZE,
    FRAMES_CONTENT_TYPE,
    SCHEME,
)

__all__ = [
    "CANCEL_PATH",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "FRAMES_CONTENT_TYPE",
    "SCHEME",
    "Http2Client",
    "Http2Server",
    "create_client",
    "create_server",
]

# Reprs and tracebacks show the public path (troupe.transports.http2.Http2Server), as before the
# split.
for _public in (Http2Client, Http2Server, create_client, create_server):
    _public.__module__ = __name__
del _public
