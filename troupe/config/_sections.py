"""The config sections: frozen dataclasses, one per plane or component, holding the defaults.

Defaults live on the dataclasses and follow the seeds. Every dataclass validates itself in
``__post_init__``, so a config built in code is checked exactly like one read from the
environment; a bad value raises :class:`~troupe.errors.ConfigError` naming the environment
variable the field corresponds to, the value, and what would have been accepted. The root,
:class:`~troupe.config.Config`, which gathers the sections, is in ``_config``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, fields

from troupe.config._kinds import _MIB, KV_STORES, LOG_LEVELS, _RejectedError
from troupe.config._setting import _LOG, _NATS_SERVERS
from troupe.config._settings import _validate
from troupe.errors import ConfigError


def _default_file_kv_path() -> str:
    return os.path.join(tempfile.gettempdir(), "dynamo_store_kv")


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """TCP (ZeroMQ) request plane."""

    host: str | None = None
    port: int = 0
    max_message_size: int = 32 * _MIB
    request_timeout: float = 10.0
    pool_size: int = 50
    connect_timeout: float = 3.0
    channel_buffer: int = 100

    def __post_init__(self) -> None:
        _validate(self, "request_plane.tcp")


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """HTTP/2 request plane: the server side, and TLS on both sides (``DYN_HTTP_RPC_TLS_*``)."""

    host: str | None = None
    port: int = 8888
    root_path: str = "/v1/rpc"
    request_timeout: float = 10.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_client_auth: bool = False
    tls_client_cert: str | None = None
    tls_client_key: str | None = None

    def __post_init__(self) -> None:
        _validate(self, "request_plane.http")


@dataclass(frozen=True, slots=True)
class Http2Config:
    """HTTP/2 request plane: protocol and client pool settings."""

    max_frame_size: int = _MIB
    max_concurrent_streams: int = 1000
    pool_max_idle_per_host: int = 100
    pool_idle_timeout: float = 90.0
    keep_alive_interval: float = 30.0
    keep_alive_timeout: float = 10.0
    adaptive_window: bool = True

    def __post_init__(self) -> None:
        _validate(self, "request_plane.http2")


@dataclass(frozen=True, slots=True)
class NatsConfig:
    """NATS connection (request plane, and KV store when ``DYN_KV_STORE=nats``)."""

    server: str = "nats://localhost:4222"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    credentials_file: str | None = None
    connect_timeout: float = 3.0
    request_timeout: float = 10.0
    nkey_seed: str | None = field(default=None, repr=False)
    nkey_seed_file: str | None = None
    tls_ca_file: str | None = None
    tls_client_cert_file: str | None = None
    tls_client_key_file: str | None = None
    inbox_prefix: str = "_INBOX"

    def __post_init__(self) -> None:
        _validate(self, "nats")

    def __repr__(self) -> str:
        # Credentials embedded in NATS_SERVER URLs are masked, like the password and token fields.
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        shown["server"] = _NATS_SERVERS.redact(self.server)
        return "NatsConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @property
    def servers(self) -> tuple[str, ...]:
        """The server URLs, ``NATS_SERVER`` split on commas."""
        return tuple(self.server.split(","))


@dataclass(frozen=True, slots=True)
class EventPlaneConfig:
    """The event plane (KV events): its transport, and whether NATS keeps events in a stream."""

    plane: str = "nats"
    durable: bool = False

    def __post_init__(self) -> None:
        _validate(self, "events")


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """etcd connection of the ``etcd`` KV store."""

    endpoints: tuple[str, ...] = ("http://localhost:2379",)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    connect_timeout: float = 3.0

    def __post_init__(self) -> None:
        _validate(self, "discovery.etcd")


@dataclass(frozen=True, slots=True)
class FileKvConfig:
    """The ``file`` KV store: a directory shared by the processes of one host."""

    path: str = field(default_factory=_default_file_kv_path)

    def __post_init__(self) -> None:
        _validate(self, "discovery.file")


@dataclass(frozen=True, slots=True)
class PodInfo:
    """This pod's identity, injected by the Kubernetes operator."""

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None

    def __post_init__(self) -> None:
        _validate(self, "discovery.pod")


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    """The ``kubernetes`` backend's API-server connection (the pod identity is :class:`PodInfo`).

    ``kubeconfig`` is a path (or ``:``-separated paths) as in ``KUBECONFIG``; when it is unset the
    client tries ``~/.kube/config`` and then the in-cluster service account (token and CA) in
    ``serviceaccount`` (default ``/var/run/secrets/kubernetes.io/serviceaccount``).
    """

    kubeconfig: str | None = None
    serviceaccount: str | None = None
    connect_timeout: float = 5.0
    request_timeout: float = 10.0

    def __post_init__(self) -> None:
        _validate(self, "discovery.kubernetes")
        for name in ("connect_timeout", "request_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"KubernetesConfig.{name}", value, "a number of seconds > 0")


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Discovery plane: backend, KV store and lease.

    A store name given as ``backend`` (``"etcd"``, ``"file"``, ``"memory"``/``"mem"``, ``"nats"``)
    is the shorthand of ``backend="kv_store"`` with that store; it is normalised on construction.
    """

    backend: str = "kv_store"
    kv_store: str = "etcd"
    lease_ttl: float = 10.0
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    file: FileKvConfig = field(default_factory=FileKvConfig)
    pod: PodInfo = field(default_factory=PodInfo)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)

    def __post_init__(self) -> None:
        _validate(self, "discovery")
        if self.backend in KV_STORES:
            object.__setattr__(self, "kv_store", self.backend)
            object.__setattr__(self, "backend", "kv_store")


@dataclass(frozen=True, slots=True)
class RequestPlaneConfig:
    """Request plane: which transport this process serves on, and each transport's settings."""

    plane: str = "tcp"
    tcp: TcpConfig = field(default_factory=TcpConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    http2: Http2Config = field(default_factory=Http2Config)

    def __post_init__(self) -> None:
        _validate(self, "request_plane")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Logging: global level, per-target levels, JSON or console output.

    ``level`` also accepts a whole ``DYN_LOG`` spec (``"info,troupe.transports=debug"``); its
    targets are split off and appended to ``targets``. ``trace`` is one step below ``debug``.
    """

    level: str = "info"
    targets: tuple[tuple[str, str], ...] = ()
    json: bool = False

    def __post_init__(self) -> None:
        _validate(self, "log")
        level, extra = _LOG.split(self.level)
        if not isinstance(self.targets, tuple | list):
            raise ConfigError("DYN_LOG", self.targets, "a tuple of (target, level) pairs")
        try:
            targets = tuple(_LOG.check_target(pair) for pair in self.targets)
        except _RejectedError as exc:
            choices = LOG_LEVELS if exc.choices is None else exc.choices
            raise ConfigError(
                "DYN_LOG", self.targets, exc.expected or _LOG.expected, choices
            ) from None
        object.__setattr__(self, "level", level)
        object.__setattr__(self, "targets", targets + extra)


@dataclass(frozen=True, slots=True)
class SystemConfig:
    """The system status server (``/health``, ``/live``, ``/metrics``); off when port is -1."""

    host: str = "0.0.0.0"
    port: int = -1
    health_path: str = "/health"
    live_path: str = "/live"

    def __post_init__(self) -> None:
        _validate(self, "system")

    @property
    def enabled(self) -> bool:
        """Whether the status server should run (``DYN_SYSTEM_PORT`` is not -1)."""
        return self.port != -1


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Worker lifecycle and admission."""

    graceful_shutdown_timeout: float = 5.0
    # Admission (see docs/configuration.md): 1024 is far above what one process serves usefully at
    # once, and bounds what a flood of requests can make it hold; a caller gets half of it at most,
    # which is also what a troupe tcp caller carries on one connection before it opens another.
    max_inflight: int = 1024
    max_inflight_per_caller: int = 512

    def __post_init__(self) -> None:
        _validate(self, "worker")


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    """The OpenAI-compatible HTTP frontend's listening address, HTTPS and API key (``troupe
    frontend``); the default address is loopback: other hosts reach it only when asked for."""

    host: str = "127.0.0.1"
    port: int = 8000
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    tls_client_ca_cert_path: str | None = None
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _validate(self, "frontend")
