"""The settings table: every environment variable troupe reads, one :class:`Setting` a row.

Every setting troupe understands is one row of :data:`SETTINGS`: the environment variable, the
config section and field it fills, the kind of value it takes (which parses text from the
environment and validates values built in code), whether it is a secret, and a line of help.
:meth:`Config.from_env`, :meth:`Config.describe`, :meth:`Config.to_env` and the documentation test
are all driven by that table. Every config section checks its fields against it on construction
(``_validate``).
"""

from __future__ import annotations

from troupe.config._kinds import (
    _HOST_RE,
    DISCOVERY_BACKENDS,
    EVENT_PLANES,
    KV_STORES,
    PLANES,
    _Bool,
    _Choice,
    _EtcdEndpoints,
    _Int,
    _Seconds,
    _Size,
    _Text,
    _UrlPath,
)
from troupe.config._setting import (
    _COUNT,
    _HOST,
    _HTTP2_MAX_FRAME,
    _HTTP2_MIN_FRAME,
    _LOG,
    _MAX_PORT,
    _NATS_SERVERS,
    _OPTIONAL,
    _PORT,
    _TIMEOUT,
    Setting,
)
from troupe.config._settings_security import SECURITY_SETTINGS

__all__ = ["SETTINGS", "Setting"]


def _by_section(rows: tuple[Setting, ...]) -> tuple[Setting, ...]:
    """``rows`` grouped by section, in order of each section's first row (a stable sort): the
    TLS and authentication rows join their plane's section in the tables and the docs."""
    order = {section: rank for rank, section in enumerate(dict.fromkeys(r.section for r in rows))}
    return tuple(sorted(rows, key=lambda row: order[row.section]))


SETTINGS: tuple[Setting, ...] = _by_section((
    # discovery
    Setting(
        "DYN_DISCOVERY_BACKEND",
        "discovery",
        "backend",
        _Choice(DISCOVERY_BACKENDS, {"mem": "memory"}),
        "kv_store or kubernetes; etcd/file/memory/nats mean kv_store with that store",
    ),
    Setting(
        "DYN_KV_STORE",
        "discovery",
        "kv_store",
        _Choice(KV_STORES, {"mem": "memory"}),
        "store used by the kv_store backend",
    ),
    Setting(
        "DYN_LEASE_TTL",
        "discovery",
        "lease_ttl",
        _Seconds(positive=True),
        "lease time-to-live in seconds; keep-alives run at a third of it",
    ),
    Setting(
        "ETCD_ENDPOINTS",
        "discovery.etcd",
        "endpoints",
        _EtcdEndpoints(),
        "comma-separated etcd endpoints",
    ),
    Setting("ETCD_AUTH_USERNAME", "discovery.etcd", "username", _OPTIONAL, "etcd user name"),
    Setting(
        "ETCD_AUTH_PASSWORD",
        "discovery.etcd",
        "password",
        _OPTIONAL,
        "etcd password",
        secret=True,
    ),
    Setting("ETCD_AUTH_CA", "discovery.etcd", "ca", _OPTIONAL, "CA certificate file for etcd TLS"),
    Setting(
        "ETCD_AUTH_CLIENT_CERT",
        "discovery.etcd",
        "client_cert",
        _OPTIONAL,
        "client certificate file for etcd TLS",
    ),
    Setting(
        "ETCD_AUTH_CLIENT_KEY",
        "discovery.etcd",
        "client_key",
        _OPTIONAL,
        "client key file for etcd TLS",
    ),
    Setting(
        "DYN_ETCD_CONNECT_TIMEOUT",
        "discovery.etcd",
        "connect_timeout",
        _TIMEOUT,
        "seconds to wait for etcd at start-up",
    ),
    Setting(
        "DYN_FILE_KV",
        "discovery.file",
        "path",
        _Text(optional=False),
        "directory of the file store",
        doc_default="$TMPDIR/dynamo_store_kv",
    ),
    Setting("POD_NAME", "discovery.pod", "name", _OPTIONAL, "this pod's name (Kubernetes)"),
    Setting(
        "POD_NAMESPACE",
        "discovery.pod",
        "namespace",
        _OPTIONAL,
        "this pod's namespace (Kubernetes)",
    ),
    Setting("POD_UID", "discovery.pod", "uid", _OPTIONAL, "this pod's UID (Kubernetes)"),
    Setting(
        "KUBECONFIG",
        "discovery.kubernetes",
        "kubeconfig",
        _OPTIONAL,
        "kubeconfig file(s) of the kubernetes backend; unset = ~/.kube/config, then in-cluster",
    ),
    # request plane
    Setting(
        "DYN_REQUEST_PLANE",
        "request_plane",
        "plane",
        _Choice(PLANES),
        "transport this worker serves on (case-insensitive)",
    ),
    Setting(
        "DYN_TCP_RPC_HOST",
        "request_plane.tcp",
        "host",
        _HOST,
        "address the TCP server binds and advertises",
        auto=True,
    ),
    Setting(
        "DYN_TCP_RPC_PORT",
        "request_plane.tcp",
        "port",
        _PORT,
        "TCP server port; 0 lets the OS pick",
    ),
    Setting(
        "DYN_TCP_MAX_MESSAGE_SIZE",
        "request_plane.tcp",
        "max_message_size",
        _Size(1, None),
        "largest message the TCP transport sends or accepts",
    ),
    Setting(
        "DYN_TCP_REQUEST_TIMEOUT",
        "request_plane.tcp",
        "request_timeout",
        _TIMEOUT,
        "seconds a TCP request may take",
    ),
    Setting(
        "DYN_TCP_POOL_SIZE",
        "request_plane.tcp",
        "pool_size",
        _COUNT,
        "TCP client connections per worker address",
    ),
    Setting(
        "DYN_TCP_CONNECT_TIMEOUT",
        "request_plane.tcp",
        "connect_timeout",
        _TIMEOUT,
        "seconds to wait for a TCP connection",
    ),
    Setting(
        "DYN_TCP_CHANNEL_BUFFER",
        "request_plane.tcp",
        "channel_buffer",
        _COUNT,
        "messages queued per TCP connection before senders wait",
    ),
    Setting(
        "DYN_HTTP_RPC_HOST",
        "request_plane.http",
        "host",
        _HOST,
        "address the HTTP/2 server binds and advertises",
        auto=True,
    ),
    Setting(
        "DYN_HTTP_RPC_PORT",
        "request_plane.http",
        "port",
        _PORT,
        "HTTP/2 server port; 0 lets the OS pick",
    ),
    Setting(
        "DYN_HTTP_RPC_ROOT_PATH",
        "request_plane.http",
        "root_path",
        _UrlPath(strip_trailing=True),
        "URL path under which endpoints are served",
    ),
    Setting(
        "DYN_HTTP_REQUEST_TIMEOUT",
        "request_plane.http",
        "request_timeout",
        _TIMEOUT,
        "seconds an HTTP/2 request may take",
    ),
    Setting(
        "DYN_HTTP2_MAX_FRAME_SIZE",
        "request_plane.http2",
        "max_frame_size",
        _Size(_HTTP2_MIN_FRAME, _HTTP2_MAX_FRAME),
        "largest HTTP/2 frame",
    ),
    Setting(
        "DYN_HTTP2_MAX_CONCURRENT_STREAMS",
        "request_plane.http2",
        "max_concurrent_streams",
        _COUNT,
        "concurrent HTTP/2 streams per connection",
    ),
    Setting(
        "DYN_HTTP2_POOL_MAX_IDLE_PER_HOST",
        "request_plane.http2",
        "pool_max_idle_per_host",
        _COUNT,
        "idle HTTP/2 connections kept per host",
    ),
    Setting(
        "DYN_HTTP2_POOL_IDLE_TIMEOUT_SECS",
        "request_plane.http2",
        "pool_idle_timeout",
        _TIMEOUT,
        "seconds an idle HTTP/2 connection is kept",
    ),
    Setting(
        "DYN_HTTP2_KEEP_ALIVE_INTERVAL_SECS",
        "request_plane.http2",
        "keep_alive_interval",
        _TIMEOUT,
        "seconds between HTTP/2 keep-alive pings",
    ),
    Setting(
        "DYN_HTTP2_KEEP_ALIVE_TIMEOUT_SECS",
        "request_plane.http2",
        "keep_alive_timeout",
        _TIMEOUT,
        "seconds to wait for a keep-alive answer",
    ),
    Setting(
        "DYN_HTTP2_ADAPTIVE_WINDOW",
        "request_plane.http2",
        "adaptive_window",
        _Bool(),
        "adapt the HTTP/2 flow-control window",
    ),
    # NATS
    Setting("NATS_SERVER", "nats", "server", _NATS_SERVERS, "comma-separated NATS server URLs"),
    Setting("NATS_AUTH_USERNAME", "nats", "username", _OPTIONAL, "NATS user name"),
    Setting("NATS_AUTH_PASSWORD", "nats", "password", _OPTIONAL, "NATS password", secret=True),
    Setting("NATS_AUTH_TOKEN", "nats", "token", _OPTIONAL, "NATS token", secret=True),
    Setting(
        "NATS_AUTH_CREDENTIALS_FILE",
        "nats",
        "credentials_file",
        _OPTIONAL,
        "NATS .creds file",
    ),
    Setting(
        "DYN_NATS_CONNECT_TIMEOUT",
        "nats",
        "connect_timeout",
        _TIMEOUT,
        "seconds to wait for a NATS connection",
    ),
    Setting(
        "DYN_NATS_REQUEST_TIMEOUT_SECS",
        "nats",
        "request_timeout",
        _TIMEOUT,
        "seconds a NATS request may take",
    ),
    # event plane
    Setting(
        "DYN_EVENT_PLANE",
        "events",
        "plane",
        _Choice(EVENT_PLANES),
        "transport of the event plane (KV events): nats, or brokerless zmq (case-insensitive)",
    ),
    Setting(
        "DYN_DURABLE_KV_EVENTS",
        "events",
        "durable",
        _Bool(),
        "keep events in a JetStream stream, replayable by late subscribers (nats only)",
    ),
    # logging
    Setting("DYN_LOG", "log", "level", _LOG, "log level, then optional <target>=<level> pairs"),
    Setting(
        "DYN_LOGGING_JSONL",
        "log",
        "json",
        _Bool(),
        "write JSON lines instead of console text",
    ),
    # system status server
    Setting(
        "DYN_SYSTEM_HOST",
        "system",
        "host",
        _Text(optional=False, pattern=_HOST_RE, expected="a host name or IP address"),
        "address of the status server",
    ),
    Setting(
        "DYN_SYSTEM_PORT",
        "system",
        "port",
        _Int(-1, _MAX_PORT, "a port number 0..65535, or -1 to disable"),
        "status server port; -1 disables it, 0 lets the OS pick",
    ),
    Setting(
        "DYN_SYSTEM_HEALTH_PATH",
        "system",
        "health_path",
        _UrlPath(strip_trailing=False),
        "path of the health (readiness) route",
    ),
    Setting(
        "DYN_SYSTEM_LIVE_PATH",
        "system",
        "live_path",
        _UrlPath(strip_trailing=False),
        "path of the liveness route",
    ),
    # OpenAI-compatible frontend (`troupe frontend`)
    Setting(
        "DYN_HTTP_HOST",
        "frontend",
        "host",
        _Text(optional=False, pattern=_HOST_RE, expected="a host name or IP address"),
        "address the frontend's HTTP server binds",
    ),
    Setting(
        "DYN_HTTP_PORT",
        "frontend",
        "port",
        _PORT,
        "port of the frontend's HTTP server; 0 lets the OS pick",
    ),
    # worker
    Setting(
        "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS",
        "worker",
        "graceful_shutdown_timeout",
        _TIMEOUT,
        "seconds a stopping worker keeps serving in-flight requests",
    ),
    Setting(
        "DYN_WORKER_MAX_INFLIGHT",
        "worker",
        "max_inflight",
        _Int(0, None, "an integer >= 0 (0 = unlimited)"),
        "requests a worker process holds at once, over all its endpoints, before answering "
        "overloaded (also each endpoint's default limit); 0 = unlimited",
    ),
    Setting(
        "DYN_WORKER_MAX_INFLIGHT_PER_CALLER",
        "worker",
        "max_inflight_per_caller",
        _Int(0, None, "an integer >= 0 (0 = no per-caller limit)"),
        "requests one caller (connection, or NATS inbox) may have in a worker process at "
        "once before answering overloaded; 0 = no per-caller limit",
    ),
    *SECURITY_SETTINGS,
))  # fmt: skip
"""Every environment variable troupe reads, in display order."""


_VARIABLES = frozenset(s.variable for s in SETTINGS)


def _settings_of(section: str) -> tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if s.section == section)


def _validate(obj: object, section: str) -> None:
    """Check every field of a section object that a setting describes, storing the normal form."""
    for setting in _settings_of(section):
        object.__setattr__(obj, setting.field, setting.check(getattr(obj, setting.field)))
