"""Quiets gRPC's C core before it loads (imported by :mod:`troupe.discovery._etcd` first).

Unless ``GRPC_VERBOSITY`` says otherwise, the core prints every failed TLS handshake to stderr
at INFO level, a line a user never asked for beside the one-line error the etcd store raises for
it. The variable is read once, when gRPC loads; a value already set is kept.
"""

from __future__ import annotations

import os

__all__: list[str] = []

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
