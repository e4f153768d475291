"""Configuration: the one place that reads the environment, and the frozen objects it produces.

One module per role:

- ``_kinds``: the value kinds, which parse environment text, check values given in code and show
  values (host names, ports, URL paths, sizes, durations, choices, etcd and NATS URLs,
  ``DYN_LOG``), the words the choices accept (:data:`PLANES`, :data:`KV_STORES`, ...) and
  :func:`redact_urls`.
- ``_settings``: the settings table, :data:`SETTINGS`: one :class:`Setting` per environment
  variable, and the check every section runs on construction.
- ``_sections``: the config sections, frozen dataclasses holding the seeds' defaults
  (:class:`TcpConfig`, :class:`NatsConfig`, :class:`DiscoveryConfig`, ...).
- ``_config``: the root :class:`Config`, the only code that reads the environment
  (:meth:`Config.from_env`), and its display (:meth:`Config.describe`, :class:`SettingRow`,
  :func:`format_table`).

Secrets never leave this package in the clear except through :meth:`Config.to_env` (the
environment of a child process): a secret setting shows as ``****`` in :meth:`Config.describe`,
in reprs and in a ConfigError, and credentials inside a URL (``nats://user:pass@host``) are
masked by :func:`redact_urls` wherever a URL is shown.
"""

from troupe.config._config import Config, SettingRow, format_table
from troupe.config._kinds import (
    DISCOVERY_BACKENDS,
    EVENT_PLANES,
    KV_STORES,
    LOG_LEVELS,
    PLANES,
    redact_urls,
)
from troupe.config._sections import (
    DiscoveryConfig,
    EtcdConfig,
    EventPlaneConfig,
    FileKvConfig,
    FrontendConfig,
    Http2Config,
    HttpConfig,
    KubernetesConfig,
    LogConfig,
    NatsConfig,
    PodInfo,
    RequestPlaneConfig,
    SystemConfig,
    TcpConfig,
    WorkerConfig,
)
from troupe.config._settings import SETTINGS, Setting

__all__ = [
    "DISCOVERY_BACKENDS",
    "EVENT_PLANES",
    "KV_STORES",
    "LOG_LEVELS",
    "PLANES",
    "SETTINGS",
    "Config",
    "DiscoveryConfig",
    "EtcdConfig",
    "EventPlaneConfig",
    "FileKvConfig",
    "FrontendConfig",
    "Http2Config",
    "HttpConfig",
    "KubernetesConfig",
    "LogConfig",
    "NatsConfig",
    "PodInfo",
    "RequestPlaneConfig",
    "Setting",
    "SettingRow",
    "SystemConfig",
    "TcpConfig",
    "WorkerConfig",
    "format_table",
    "redact_urls",
]

# Reprs and tracebacks show the public path (troupe.config.TcpConfig, not
# troupe.config._sections.TcpConfig), as they did when the package was one module.
for _public in (
    Config,
    DiscoveryConfig,
    EtcdConfig,
    EventPlaneConfig,
    FileKvConfig,
    FrontendConfig,
    Http2Config,
    HttpConfig,
    KubernetesConfig,
    LogConfig,
    NatsConfig,
    PodInfo,
    RequestPlaneConfig,
    Setting,
    SettingRow,
    SystemConfig,
    TcpConfig,
    WorkerConfig,
    format_table,
    redact_urls,
):
    _public.__module__ = __name__
del _public
