"""troupe: a Python actor runtime for distributed serving.

Workers serve named endpoints; frontends discover them at run time through a discovery plane and
send them requests over a swappable request plane whose answers stream back.

``import troupe`` gives what a script needs: :class:`Runtime` (serve, route, supervise),
:class:`Router` (what ``rt.router(...)`` returns), :class:`RequestContext` (what a handler
receives), :func:`resumable` and :func:`handler_factory` (for handlers a worker process builds
with its runtime), :class:`Config`, and the errors a caller catches most (every
error is in :mod:`troupe.errors`, rooted at :class:`TroupeError`).
"""

from troupe._handlers import handler_factory
from troupe._version import __version__
from troupe.actors import Router
from troupe.config import Config
from troupe.errors import (
    Cancelled,
    ConfigError,
    DeadlineExceeded,
    NoInstances,
    Overloaded,
    RemoteError,
    StreamBroken,
    TransportError,
    TroupeError,
)
from troupe.runtime import Runtime
from troupe.transports import RequestContext, resumable

__all__ = [
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
]

# Reprs and tracebacks show the public path (troupe.Runtime, not troupe.runtime.Runtime).
for _public in (Config, Router, Runtime, RequestContext, handler_factory, resumable):
    _public.__module__ = __name__
del _public
