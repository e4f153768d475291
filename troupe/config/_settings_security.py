"""The settings of TLS and authentication that have no row elsewhere, one block per plane.

Rows are :class:`~troupe.config._setting.Setting` like every other; :data:`SECURITY_SETTINGS`
is appended to the table in :mod:`troupe.config._settings`.
"""

from __future__ import annotations

from troupe.config._setting import Setting

__all__ = ["SECURITY_SETTINGS"]

SECURITY_SETTINGS: tuple[Setting, ...] = (
    # --- NATS (request plane, event plane, KV store) ---
    # --- HTTP/2 request plane ---
    # --- etcd ---
    # --- frontend ---
)
"""TLS and authentication settings, by plane."""
