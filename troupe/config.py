"""Configuration: the one place that reads the environment, and the frozen objects it produces.

Every setting troupe understands is one row of :data:`SETTINGS`: the environment variable, the
config section and field it fills, the kind of value it takes (which parses text from the
environment and validates values built in code), whether it is a secret, and a line of help.
:meth:`Config.from_env`, :meth:`Config.describe`, :meth:`Config.to_env` and the documentation test
are all driven by that table. Defaults live on the dataclasses and follow the seeds.

Every dataclass validates itself in ``__post_init__``, so a config built in code is checked exactly
like one read from the environment; a bad value raises :class:`~troupe.errors.ConfigError` naming
the environment variable the field corresponds to, the value, and what would have been accepted.

Secrets never leave this module in the clear except through :meth:`Config.to_env` (the
environment of a child process): a secret setting shows as ``****`` in :meth:`Config.describe`,
in reprs and in a ConfigError, and credentials inside a URL (``nats://user:pass@host``) are
masked by :func:`redact_urls` wherever a URL is shown.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit

from troupe.errors import ConfigError

__all__ = [
    "DISCOVERY_BACKENDS",
    "KV_STORES",
    "LOG_LEVELS",
    "PLANES",
    "SETTINGS",
    "Config",
    "DiscoveryConfig",
    "EtcdConfig",
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

PLANES = ("tcp", "http", "nats")
"""Valid values of ``DYN_REQUEST_PLANE``."""

KV_STORES = ("etcd", "file", "memory", "nats")
"""Valid values of ``DYN_KV_STORE`` (``mem`` is accepted as an alias of ``memory``)."""

DISCOVERY_BACKENDS = ("kv_store", "kubernetes", *KV_STORES)
"""Valid values of ``DYN_DISCOVERY_BACKEND``; the store names are shorthands for ``kv_store``."""

LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical")
"""Valid levels in ``DYN_LOG`` (``warn`` is stored as ``warning``)."""

_T = TypeVar("_T")
_KIB = 1024
_MIB = 1024 * _KIB
_GIB = 1024 * _MIB
_HTTP2_MIN_FRAME = 16_384  # RFC 9113 §4.2: SETTINGS_MAX_FRAME_SIZE lies in 2**14 .. 2**24 - 1
_HTTP2_MAX_FRAME = 16_777_215
_MAX_PORT = 65_535


def _default_file_kv_path() -> str:
    return os.path.join(tempfile.gettempdir(), "dynamo_store_kv")


# --- value kinds ---------------------------------------------------------------------------------
#
# A kind turns environment text into a typed value (``parse``), validates and normalises a typed
# value given in code (``check``), and writes a value back as text that ``parse`` accepts
# (``show``). Kinds raise ``_RejectedError``; the owning :class:`Setting` turns that into a
# ConfigError that names the variable.


class _RejectedError(Exception):
    """A value was rejected; optionally overrides the kind's ``expected`` text and choices."""

    def __init__(self, expected: str | None = None, choices: tuple[str, ...] | None = None) -> None:
        super().__init__(expected or "")
        self.expected = expected
        self.choices = choices


class _Kind:
    """Base of the value kinds: parses environment text, checks code values, shows values."""

    expected: str = ""
    choices: tuple[str, ...] = ()

    def parse(self, text: str) -> object:
        """Convert stripped, non-empty environment text into a checked value."""
        return self.check(text)

    def check(self, value: object) -> object:
        """Validate a value given in code; return it normalised."""
        raise NotImplementedError

    def show(self, value: object) -> str:
        """Render a checked value as text that :meth:`parse` accepts."""
        return str(value)

    def redact(self, text: str) -> str:
        """Hide credentials embedded in a shown value (only URLs carry any)."""
        return text

    def mask(self, value: object) -> object:
        """A rejected value as an error may show it: ``redact`` applied to its text."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, tuple | list):
            return type(value)(self.redact(v) if isinstance(v, str) else v for v in value)
        return value

    def read(self, section: object, name: str) -> object:
        """Read the field's value from its section object."""
        return getattr(section, name)


_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": _KIB, "m": _MIB, "g": _GIB}
_HOST_RE = re.compile(r"[A-Za-z0-9._:%\[\]-]+")
_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})


class _Text(_Kind):
    """A string; optional ones map the empty string to None; ``pattern`` restricts the text."""

    def __init__(
        self,
        *,
        optional: bool,
        pattern: re.Pattern[str] | None = None,
        expected: str = "a non-empty string",
    ) -> None:
        self.optional = optional
        self.pattern = pattern
        self.expected = expected

    def check(self, value: object) -> object:
        if value is None and self.optional:
            return None
        if not isinstance(value, str):
            raise _RejectedError
        if value == "":
            if self.optional:
                return None
            raise _RejectedError
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise _RejectedError
        return value


class _UrlPath(_Kind):
    """A URL path starting with ``/``; ``strip_trailing`` removes trailing slashes."""

    def __init__(self, *, strip_trailing: bool) -> None:
        self.strip_trailing = strip_trailing
        self.expected = "a URL path starting with '/'"

    def check(self, value: object) -> object:
        if not isinstance(value, str) or any(c.isspace() or c in "?#" for c in value):
            raise _RejectedError
        if not value.startswith("/"):
            raise _RejectedError
        if self.strip_trailing:
            # "/v1/rpc/" -> "/v1/rpc"; a lone "/" (endpoints at the server root) stays "/".
            return value.rstrip("/") or "/"
        return value


class _Choice(_Kind):
    """One of a fixed set of words, case-insensitive, with optional aliases."""

    def __init__(self, choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> None:
        self.choices = choices
        self.aliases = dict(aliases or {})
        self.expected = "one of " + ", ".join(choices)

    def check(self, value: object) -> object:
        if not isinstance(value, str):
            raise _RejectedError
        word = value.strip().lower()
        word = self.aliases.get(word, word)
        if word not in self.choices:
            raise _RejectedError
        return word


class _Bool(_Kind):
    """A boolean; the environment spells it true/false/1/0/yes/no/on/off."""

    expected = "a boolean: true, false, 1, 0, yes, no, on or off"

    def parse(self, text: str) -> object:
        word = text.lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise _RejectedError

    def check(self, value: object) -> object:
        if not isinstance(value, bool):
            raise _RejectedError
        return value

    def show(self, value: object) -> str:
        return "true" if value else "false"


class _Int(_Kind):
    """An integer within ``[low, high]`` (``high`` None = unbounded)."""

    def __init__(self, low: int, high: int | None, expected: str) -> None:
        self.low = low
        self.high = high
        self.expected = expected

    def parse(self, text: str) -> object:
        if not _INT_RE.fullmatch(text):
            raise _RejectedError
        return self.check(int(text))

    def check(self, value: object) -> object:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _RejectedError
        if value < self.low or (self.high is not None and value > self.high):
            raise _RejectedError
        return value


class _Seconds(_Kind):
    """A duration in seconds: finite, ``>= 0`` (or ``> 0`` when ``positive``)."""

    def __init__(self, *, positive: bool) -> None:
        self.positive = positive
        self.expected = "seconds > 0" if positive else "seconds >= 0"

    def parse(self, text: str) -> object:
        if not _FLOAT_RE.fullmatch(text):
            raise _RejectedError
        return self.check(float(text))

    def check(self, value: object) -> object:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _RejectedError
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0 or (self.positive and seconds == 0):
            raise _RejectedError
        return seconds

    def show(self, value: object) -> str:
        assert isinstance(value, float)
        return str(int(value)) if value.is_integer() else repr(value)


class _Size(_Kind):
    """A byte count: an integer, or a number with a KB/MB/GB (= KiB/MiB/GiB) suffix."""

    def __init__(self, low: int, high: int | None) -> None:
        self.low = low
        self.high = high
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        self.expected = f"a size in bytes ({bounds}), optionally with a KB/MB/GB suffix (x1024)"

    def parse(self, text: str) -> object:
        match = _SIZE_RE.fullmatch(text)
        if match is None:
            raise _RejectedError
        number, unit = match.groups()
        size = Fraction(number) * _SIZE_UNITS[(unit or "")[:1].lower()]
        if size.denominator != 1:
            raise _RejectedError
        return self.check(int(size))

    def check(self, value: object) -> object:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _RejectedError
        if value < self.low or (self.high is not None and value > self.high):
            raise _RejectedError
        return value

    def show(self, value: object) -> str:
        assert isinstance(value, int)
        for unit, name in ((_GIB, "GiB"), (_MIB, "MiB"), (_KIB, "KiB")):
            if value % unit == 0:
                return f"{value // unit}{name}"
        return str(value)


def _split_url(text: str, default_scheme: str) -> SplitResult:
    """Split ``scheme://host[:port]``; a bare ``host[:port]`` gets ``default_scheme``."""
    if "://" not in text:
        text = f"{default_scheme}://{text}"
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        raise _RejectedError from None
    host = parts.hostname
    if (
        not host
        or not _HOST_RE.fullmatch(host)
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise _RejectedError
    return parts


_MASK = "****"


def redact_urls(text: str) -> str:
    """Mask the credentials of every URL in a comma-separated list (``nats://****@host:4222``).

    What lies between a URL's ``scheme://`` (or its start) and its last ``@`` is user
    information (``user:password``, or a token) and is replaced whole; the text need not be a
    valid URL, so a value refused for being malformed is masked too.
    """
    return ",".join(_redact_url(item) for item in text.split(","))


def _redact_url(item: str) -> str:
    scheme, sep, rest = item.partition("://")
    if not sep:
        scheme, rest = "", item
    _, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{_MASK}@{host}" if at else item


def _host_port(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


_ETCD_NO_CREDENTIALS = (
    "endpoints without credentials (http(s)://host:port); "
    "give them in ETCD_AUTH_USERNAME and ETCD_AUTH_PASSWORD"
)


class _EtcdEndpoints(_Kind):
    """Comma-separated etcd endpoints ``http(s)://host:port`` or ``host:port``.

    ``user:password@`` in an endpoint is refused (masked in the error): credentials belong in
    ``ETCD_AUTH_USERNAME`` / ``ETCD_AUTH_PASSWORD``, which every endpoint shares.
    """

    expected = "comma-separated http(s)://host:port or host:port endpoints"

    def check(self, value: object) -> object:
        if isinstance(value, str):
            items: Iterable[object] = value.split(",")
        elif isinstance(value, tuple | list):
            items = value
        else:
            raise _RejectedError
        endpoints = []
        for item in items:
            if not isinstance(item, str):
                raise _RejectedError
            if item.strip():
                endpoints.append(self._normalise(item.strip()))
        if not endpoints:
            raise _RejectedError
        return tuple(endpoints)

    @staticmethod
    def _normalise(item: str) -> str:
        if "@" in item:
            raise _RejectedError(_ETCD_NO_CREDENTIALS)
        parts = _split_url(item, "http")
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or parts.port in (None, 0):
            raise _RejectedError
        assert parts.hostname is not None
        return f"{scheme}://{_host_port(parts.hostname, parts.port)}"

    def show(self, value: object) -> str:
        assert isinstance(value, tuple)
        return ",".join(value)

    def redact(self, text: str) -> str:
        return redact_urls(text)


class _NatsServers(_Kind):
    """Comma-separated ``nats://`` or ``tls://`` URLs; a bare ``host[:port]`` gets ``nats://``."""

    expected = "comma-separated nats:// or tls:// URLs (or host:port)"

    def check(self, value: object) -> object:
        if not isinstance(value, str):
            raise _RejectedError
        servers = [self._normalise(item.strip()) for item in value.split(",") if item.strip()]
        if not servers:
            raise _RejectedError
        return ",".join(servers)

    @staticmethod
    def _normalise(item: str) -> str:
        parts = _split_url(item, "nats")
        scheme = parts.scheme.lower()
        if scheme not in ("nats", "tls") or parts.port == 0:
            raise _RejectedError
        userinfo = parts.netloc.rpartition("@")[0]
        assert parts.hostname is not None
        hostport = _host_port(parts.hostname, parts.port)
        return f"{scheme}://{userinfo}@{hostport}" if userinfo else f"{scheme}://{hostport}"

    def redact(self, text: str) -> str:
        return redact_urls(text)


_TARGET_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_LEVEL_ALIASES = {"warn": "warning"}


class _LogSpec(_Kind):
    """``DYN_LOG``: ``<level>[,<target>=<level>,...]``; targets are logger-name prefixes.

    The section object keeps the global level and the targets in two fields; this kind checks the
    combined text (``LogConfig.level`` may carry targets, which ``LogConfig`` then splits off) and
    reads both fields back into one string.
    """

    expected = "<level>[,<target>=<level>,...]"
    choices = LOG_LEVELS

    def check(self, value: object) -> object:
        if not isinstance(value, str):
            raise _RejectedError
        level, targets = self.split(value)
        return self.join(level, targets)

    def split(self, text: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        """Split a spec into the global level (default ``info``) and ``(target, level)`` pairs."""
        level: str | None = None
        targets: list[tuple[str, str]] = []
        for raw in text.split(","):
            item = raw.strip()
            if not item:
                continue
            if "=" in item:
                target, _, target_level = item.partition("=")
                targets.append(self.check_target((target, target_level)))
            elif level is not None:
                raise _RejectedError("a single global level, then <target>=<level> pairs", ())
            else:
                level = self.level(item)
        return level or "info", tuple(targets)

    @staticmethod
    def join(level: str, targets: Iterable[tuple[str, str]]) -> str:
        """Write a level and targets back as one ``DYN_LOG`` string."""
        return ",".join([level, *(f"{target}={lvl}" for target, lvl in targets)])

    @staticmethod
    def level(text: str) -> str:
        """Normalise one level name (case-insensitive, ``warn`` -> ``warning``)."""
        word = text.strip().lower()
        if word not in LOG_LEVELS:
            raise _RejectedError
        return _LEVEL_ALIASES.get(word, word)

    def check_target(self, pair: object) -> tuple[str, str]:
        """Validate one ``(target, level)`` pair; Rust-style ``a::b`` targets become ``a.b``."""
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise _RejectedError("(target, level) pairs", ())
        target, level = pair
        if not isinstance(target, str) or not isinstance(level, str):
            raise _RejectedError("(target, level) pairs", ())
        name = target.strip().replace("::", ".")
        if not _TARGET_RE.fullmatch(name):
            raise _RejectedError("a logger name such as troupe.transports before '='", ())
        return name, self.level(level)

    def read(self, section: object, name: str) -> object:
        assert isinstance(section, LogConfig)
        return self.join(section.level, section.targets)


# --- the settings table --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One environment variable: where it goes, how it is parsed, and how it is shown.

    Attributes:
        variable: the environment variable name.
        section: dotted path of the config section (``"request_plane.tcp"``).
        field: the field of that section the variable fills.
        kind: parses, checks and shows the value.
        help: one line of help.
        secret: the value is masked in :meth:`Config.describe`.
        auto: ``None`` means "detected at run time" (shown ``(auto)``) rather than unset.
        doc_default: the default as the docs write it, when it depends on the machine.
    """

    variable: str
    section: str
    field: str
    kind: _Kind
    help: str
    secret: bool = False
    auto: bool = False
    doc_default: str | None = None

    @property
    def expected(self) -> str:
        """What the setting accepts, in words."""
        return self.kind.expected

    @property
    def choices(self) -> tuple[str, ...]:
        """The valid values when the setting is an enumeration."""
        return self.kind.choices

    def parse(self, text: str) -> object:
        """Parse stripped, non-empty environment text; raise ConfigError naming the variable."""
        try:
            return self.kind.parse(text)
        except _RejectedError as exc:
            raise self._error(text, exc) from None

    def check(self, value: object) -> object:
        """Validate (and normalise) a value given in code; raise ConfigError naming the variable."""
        try:
            return self.kind.check(value)
        except _RejectedError as exc:
            raise self._error(value, exc) from None

    def read(self, config: Config) -> object:
        """The current value of this setting in ``config``."""
        section: object = config
        for part in self.section.split("."):
            section = getattr(section, part)
        return self.kind.read(section, self.field)

    def show(self, value: object) -> str | None:
        """The value as environment text (secrets in the clear), or None when unset."""
        return None if value is None else self.kind.show(value)

    def display(self, value: object) -> str:
        """The value for humans: secrets masked, unset values spelled out."""
        if value is None:
            return "(auto)" if self.auto else "(unset)"
        if self.secret:
            return _MASK
        return self.kind.redact(self.kind.show(value))

    def _error(self, value: object, exc: _RejectedError) -> ConfigError:
        # The error is printed and logged: it carries a secret only as "****", and a URL's
        # credentials masked (ConfigError.value too, not only its message).
        shown = _MASK if self.secret else self.kind.mask(value)
        choices = self.kind.choices if exc.choices is None else exc.choices
        return ConfigError(self.variable, shown, exc.expected or self.kind.expected, choices)


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


_HOST = _Text(optional=True, pattern=_HOST_RE, expected="a host name or IP address")
_OPTIONAL = _Text(optional=True)
_PORT = _Int(0, _MAX_PORT, "a port number 0..65535 (0 = OS-assigned)")
_TIMEOUT = _Seconds(positive=False)
_COUNT = _Int(1, None, "an integer >= 1")
_LOG = _LogSpec()
_NATS_SERVERS = _NatsServers()

SETTINGS: tuple[Setting, ...] = (
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
)
"""Every environment variable troupe reads, in display order."""


_VARIABLES = frozenset(s.variable for s in SETTINGS)


def _settings_of(section: str) -> tuple[Setting, ...]:
    return tuple(s for s in SETTINGS if s.section == section)


def _validate(obj: object, section: str) -> None:
    """Check every field of a section object that a setting describes, storing the normal form."""
    for setting in _settings_of(section):
        object.__setattr__(obj, setting.field, setting.check(getattr(obj, setting.field)))


# --- the config objects --------------------------------------------------------------------------


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
    """HTTP/2 request plane: the server side."""

    host: str | None = None
    port: int = 8888
    root_path: str = "/v1/rpc"
    request_timeout: float = 10.0

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
    """The OpenAI-compatible HTTP frontend's listening address (``troupe frontend``)."""

    host: str = "0.0.0.0"
    port: int = 8000

    def __post_init__(self) -> None:
        _validate(self, "frontend")


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
