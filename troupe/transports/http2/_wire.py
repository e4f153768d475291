"""What both ends of the HTTP/2 plane share: the wire format's scheme, paths, content type, limits.

Wire format: ``POST {root}/{endpoint}`` carries one msgpack-encoded
:class:`~troupe.messages._frames.Request`; the response body is a stream of length-prefixed reply
frames (``Chunk``... then ``End`` or ``Error``) written as the handler produces them.
``POST {root}/_cancel`` carries a :class:`~troupe.messages._frames.Cancel`. The body decides what
a POST means (the path is for people and proxies), so an endpoint may even be called ``_cancel``.
A stream that goes away (reset, or its connection closed: ``http.disconnect``) cancels its
request too.
"""

from __future__ import annotations

from typing import Final

SCHEME: Final = "http"
TLS_SCHEME: Final = "https"
"""The scheme of a worker that serves TLS: its callers must dial it with TLS."""
CANCEL_PATH: Final = "_cancel"
"""The path segment (under the root path) that cancel messages are posted to."""
DEFAULT_MAX_MESSAGE_SIZE: Final = 32 * 1024 * 1024
"""Largest encoded request or reply frame, in bytes (no ``DYN_HTTP_*`` setting exists for it)."""
DEFAULT_CONNECT_TIMEOUT: Final = 3.0
"""Seconds to wait for a connection (no ``DYN_HTTP_*`` setting exists for it)."""

FRAMES_CONTENT_TYPE: Final = b"application/vnd.troupe.frames"
"""The content type of request bodies and of response bodies that carry reply frames."""
