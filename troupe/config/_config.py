"""The root :class:`Config`: the one place that reads the environment, and how it is shown.

:meth:`Config.from_env` reads every setting of the table (nothing else in troupe reads
``os.environ``) and builds the sections deepest first; :meth:`Config.describe` and
:func:`format_table` show the settings for humans, :meth:`Config.to_env` writes them back for a
child process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from troupe.config._kinds import KV_STORES
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
from troupe.config._settings import _VARIABLES, SETTINGS

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class SettingRow:
    """One line of :meth:`Config.describe`.

    Attributes:
        section: the heading the setting is listed under (``"Request plane: TCP"``).
        variable: the environment variable.
        value: the value for display (secrets ``****``; ``(auto)`` / ``(unset)`` for None).
        source: ``"env"`` when the environment set it, else ``"default"``.
        help: one line of help.
    """

    section: str
    variable: str
    value: str
    source: str
    help: str


# Sections: dotted path, class, heading. The tree is built deepest first by Config.from_env.
_SECTIONS: tuple[tuple[str, type, str], ...] = (
    ("discovery", DiscoveryConfig, "Discovery"),
    ("discovery.etcd", EtcdConfig, "Discovery: etcd"),
    ("discovery.file", FileKvConfig, "Discovery: file store"),
    ("discovery.pod", PodInfo, "Discovery: Kubernetes pod"),
    ("discovery.kubernetes", KubernetesConfig, "Discovery: Kubernetes API server"),
    ("request_plane", RequestPlaneConfig, "Request plane"),
    ("request_plane.tcp", TcpConfig, "Request plane: TCP"),
    ("request_plane.http", HttpConfig, "Request plane: HTTP/2 server"),
    ("request_plane.http2", Http2Config, "Request plane: HTTP/2 protocol and client"),
    ("nats", NatsConfig, "NATS"),
    ("events", EventPlaneConfig, "Event plane"),
    ("log", LogConfig, "Logging"),
    ("system", SystemConfig, "System status server"),
    ("frontend", FrontendConfig, "Frontend"),
    ("worker", WorkerConfig, "Worker"),
)
_TITLES = {path: title for path, _, title in _SECTIONS}


@dataclass(frozen=True, slots=True)
class Config:
    """Everything a troupe process is configured with.

    Build it from the environment with :meth:`from_env`, or in code (every field has the seed's
    default, and every value is validated either way).

    Attributes:
        sources: the environment variables that set a value (empty for configs built in code);
            not part of equality or repr.
        unknown: ``DYN_*`` variables in the environment that troupe does not read (often a
            typo, or a reference-system setting troupe does not implement); the runtime logs
            them once at start and ``troupe config`` lists them. Not part of equality or repr.
    """

    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    request_plane: RequestPlaneConfig = field(default_factory=RequestPlaneConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    events: EventPlaneConfig = field(default_factory=EventPlaneConfig)
    log: LogConfig = field(default_factory=LogConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    sources: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    unknown: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", frozenset(self.sources))
        object.__setattr__(self, "unknown", frozenset(self.unknown))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read every setting from the environment (``os.environ`` when ``environ`` is None).

        Values are stripped; an empty value counts as unset. A backend shorthand in
        ``DYN_DISCOVERY_BACKEND`` (``etcd``, ``file``, ``memory``, ``nats``) overrides
        ``DYN_KV_STORE``.

        Raises:
            ConfigError: a variable holds a value troupe cannot use.
        """
        env = os.environ if environ is None else environ
        values: dict[str, dict[str, object]] = {path: {} for path, _, _ in _SECTIONS}
        sources: set[str] = set()
        for setting in SETTINGS:
            text = env.get(setting.variable, "").strip()
            if text:
                values[setting.section][setting.field] = setting.parse(text)
                sources.add(setting.variable)
        if values["discovery"].get("backend") in KV_STORES:
            sources.add("DYN_KV_STORE")  # set through the DYN_DISCOVERY_BACKEND shorthand
        built: dict[str, object] = {}
        for path, section_cls, _ in sorted(_SECTIONS, key=lambda s: -s[0].count(".")):
            parent, _, name = path.rpartition(".")
            built[path] = section_cls(**values[path])
            if parent:
                values[parent][name] = built[path]
        return cls(
            discovery=_as(built["discovery"], DiscoveryConfig),
            request_plane=_as(built["request_plane"], RequestPlaneConfig),
            nats=_as(built["nats"], NatsConfig),
            events=_as(built["events"], EventPlaneConfig),
            log=_as(built["log"], LogConfig),
            system=_as(built["system"], SystemConfig),
            frontend=_as(built["frontend"], FrontendConfig),
            worker=_as(built["worker"], WorkerConfig),
            sources=frozenset(sources),
            unknown=frozenset(
                name for name in env if name.startswith("DYN_") and name not in _VARIABLES
            ),
        )

    def describe(self) -> list[SettingRow]:
        """Every setting with its value for display and where it came from, in table order."""
        return [
            SettingRow(
                section=_TITLES[s.section],
                variable=s.variable,
                value=s.display(s.read(self)),
                source="env" if s.variable in self.sources else "default",
                help=s.help,
            )
            for s in SETTINGS
        ]

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces this config (secrets in the clear; unset omitted).

        Useful to hand a config to a child process: ``Config.from_env(cfg.to_env()) == cfg``.
        """
        env: dict[str, str] = {}
        for setting in SETTINGS:
            text = setting.show(setting.read(self))
            if text is not None:
                env[setting.variable] = text
        return env

    def child_environment(self) -> dict[str, str]:
        """The environment for a child process that should run with this config.

        This process's environment (PATH, PYTHONPATH, ...) minus every variable troupe reads,
        plus :meth:`to_env`: the child resolves exactly this config, whatever was set here.
        """
        ours = {setting.variable for setting in SETTINGS}
        inherited = {k: v for k, v in os.environ.items() if k not in ours}
        return inherited | self.to_env()


def _as(value: object, cls: type[_T]) -> _T:
    assert isinstance(value, cls)
    return value


def format_table(rows: Iterable[SettingRow]) -> str:
    """Lay out :meth:`Config.describe` rows as fixed-width text, one heading per section."""
    rows = list(rows)
    headers = ("VARIABLE", "VALUE", "SOURCE")
    indent = "  "
    var_width = max([len(headers[0]), *(len(r.variable) for r in rows)])
    value_width = max([len(headers[1]), *(len(r.value) for r in rows)])
    lines = [f"{indent}{headers[0]:<{var_width}}  {headers[1]:<{value_width}}  {headers[2]}"]
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines.append(f"[{section}]")
        lines.append(
            f"{indent}{row.variable:<{var_width}}  {row.value:<{value_width}}  {row.source}"
        )
    return "\n".join(line.rstrip() for line in lines)
