"""The settings of TLS and authentication that have no row elsewhere, one block per plane.

Rows are :class:`~troupe.config._setting.Setting` like every other; :data:`SECURITY_SETTINGS`
is appended to the table in :mod:`troupe.config._settings`.
"""

from __future__ import annotations

import re

from troupe.config._kinds import _Bool, _Text
from troupe.config._setting import _OPTIONAL, Setting

__all__ = ["SECURITY_SETTINGS"]

# NATS: a subject prefix (what NATS permissions name), never a wildcard.
_NATS_INBOX_PREFIX = _Text(
    optional=False,
    pattern=re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*"),
    expected="dot-separated tokens of letters, digits, '_' and '-' (no wildcards)",
)

SECURITY_SETTINGS: tuple[Setting, ...] = (
    # --- NATS (request plane, event plane, KV store) ---
    Setting(
        "NATS_AUTH_NKEY",
        "nats",
        "nkey_seed",
        _OPTIONAL,
        "NATS NKey seed (SU...) to sign the server's challenge with",
        secret=True,
    ),
    Setting(
        "NATS_AUTH_NKEY_SEED_FILE",
        "nats",
        "nkey_seed_file",
        _OPTIONAL,
        "file holding the NATS NKey seed (instead of NATS_AUTH_NKEY)",
    ),
    Setting(
        "NATS_TLS_CA_CERT_PATH",
        "nats",
        "tls_ca_file",
        _OPTIONAL,
        "PEM CA certificates that sign the NATS server's certificate (turns TLS on)",
    ),
    Setting(
        "NATS_TLS_CLIENT_CERT_PATH",
        "nats",
        "tls_client_cert_file",
        _OPTIONAL,
        "PEM client certificate shown to NATS (with NATS_TLS_CLIENT_KEY_PATH)",
    ),
    Setting(
        "NATS_TLS_CLIENT_KEY_PATH",
        "nats",
        "tls_client_key_file",
        _OPTIONAL,
        "PEM private key of NATS_TLS_CLIENT_CERT_PATH",
    ),
    Setting(
        "DYN_NATS_INBOX_PREFIX",
        "nats",
        "inbox_prefix",
        _NATS_INBOX_PREFIX,
        "subject prefix of this process's NATS reply inboxes (what NATS permissions grant it)",
    ),
    # --- HTTP/2 request plane ---
    Setting(
        "DYN_HTTP_RPC_TLS_CERT",
        "request_plane.http",
        "tls_cert",
        _OPTIONAL,
        "PEM certificate (chain) of the HTTP/2 worker; with DYN_HTTP_RPC_TLS_KEY it serves "
        "TLS (ALPN h2) and advertises https://",
    ),
    Setting(
        "DYN_HTTP_RPC_TLS_KEY",
        "request_plane.http",
        "tls_key",
        _OPTIONAL,
        "PEM private key of DYN_HTTP_RPC_TLS_CERT",
    ),
    Setting(
        "DYN_HTTP_RPC_TLS_CA",
        "request_plane.http",
        "tls_ca",
        _OPTIONAL,
        "PEM CA certificates: callers verify https:// workers with them; workers verify "
        "client certificates with them (DYN_HTTP_RPC_TLS_CLIENT_AUTH)",
    ),
    Setting(
        "DYN_HTTP_RPC_TLS_CLIENT_AUTH",
        "request_plane.http",
        "tls_client_auth",
        _Bool(),
        "HTTP/2 worker with TLS requires a client certificate signed by DYN_HTTP_RPC_TLS_CA "
        "(mutual TLS)",
    ),
    Setting(
        "DYN_HTTP_RPC_TLS_CLIENT_CERT",
        "request_plane.http",
        "tls_client_cert",
        _OPTIONAL,
        "PEM client certificate a caller presents to https:// workers (mutual TLS)",
    ),
    Setting(
        "DYN_HTTP_RPC_TLS_CLIENT_KEY",
        "request_plane.http",
        "tls_client_key",
        _OPTIONAL,
        "PEM private key of DYN_HTTP_RPC_TLS_CLIENT_CERT",
    ),
    # --- etcd ---
    # --- frontend ---
    Setting(
        "DYN_TLS_CERT_PATH",
        "frontend",
        "tls_cert_path",
        _OPTIONAL,
        "PEM certificate (chain) of the frontend's HTTPS server; with DYN_TLS_KEY_PATH turns on "
        "HTTPS",
    ),
    Setting(
        "DYN_TLS_KEY_PATH",
        "frontend",
        "tls_key_path",
        _OPTIONAL,
        "PEM private key of DYN_TLS_CERT_PATH",
    ),
    Setting(
        "DYN_TLS_CLIENT_CA_CERT_PATH",
        "frontend",
        "tls_client_ca_cert_path",
        _OPTIONAL,
        "PEM CA certificates that sign client certificates; set: every HTTPS client must "
        "present one (mutual TLS)",
    ),
    Setting(
        "DYN_HTTP_API_KEY",
        "frontend",
        "api_key",
        _OPTIONAL,
        "API key the frontend requires as `Authorization: Bearer <key>` on every route but "
        "/health and /live",
        secret=True,
    ),
)
"""TLS and authentication settings, by plane."""
