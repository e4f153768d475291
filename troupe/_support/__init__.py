"""The support layer below every wing: what a process needs whatever it serves.

The I/O loop thread (``_ioloop``), injected time (``_clock``), logging (``_logging``: structlog
on the ``troupe`` logger, the one style every module uses), Prometheus metrics (``_metrics``),
hypercorn start-up (``_hypercorn``) and socket and address helpers (``_net``). It imports only
:mod:`troupe.config`, :mod:`troupe.errors` and its own modules; nothing here knows a plane.
Private: import the modules themselves.
"""
