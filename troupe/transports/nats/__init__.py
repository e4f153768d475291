"""The NATS request plane: requests and reply streams carried by a NATS server (``NATS_SERVER``).

Exchange. The caller publishes an encoded :class:`~troupe.messages._frames.Request` to the
worker's subject with a reply subject ``<inbox>.<request id>``; the worker publishes ``Chunk``,
``End`` or ``Error`` frames to that reply subject. Each client holds ONE connection and ONE
wildcard subscription ``<inbox>.*`` and routes replies to their streams by request id (no
subscription per request). ``Cancel`` goes to the worker's control subject ``<subject>.ctl``,
with the request's reply subject as its reply (together with the id, that names the request).

Modules, one per role:

- ``_subjects``: addresses and subjects, what both ends share (:func:`subject_of`).
- ``_connection``: opening and closing a NATS connection (reconnects, start-up failures).
- ``_server``: the worker side, :class:`NatsRpcServer`.
- ``_client``: the caller side, :class:`NatsRpcClient` (failures seen by callers, probes).
"""

from troupe.transports.nats._client import DEFAULT_PROBE_INTERVAL, NatsRpcClient, create_client
from troupe.transports.nats._server import NatsRpcServer, create_server
from troupe.transports.nats._subjects import SCHEME, SUBJECT_PREFIX, subject_of

__all__ = [
    "DEFAULT_PROBE_INTERVAL",
    "SCHEME",
    "SUBJECT_PREFIX",
    "NatsRpcClient",
    "NatsRpcServer",
    "create_client",
    "create_server",
    "subject_of",
]

# Reprs and tracebacks show the public path (troupe.transports.nats.NatsRpcServer), as before the
# split.
for _public in (NatsRpcClient, NatsRpcServer, create_client, create_server, subject_of):
    _public.__module__ = __name__
del _public
