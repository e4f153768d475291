"""The support layer below every wing: what a process needs whatever it serves.

The I/O loop thread (``_ioloop``), injected time (``_clock``), logging (``_logging``: structlog
on the ``troupe`` logger, the one style every module uses), Prometheus metrics (``_metrics``),
hypercorn start-up (``_hypercorn``), socket and address helpers (``_net``) and the NATS connection
that the NATS request plane and the NATS event plane both open (``_nats``). It imports only
:mod:`troupe.config`, :mod:`troupe.errors` and its own modules; nothing here knows a plane.
Private: import the modules themselves.
"""
