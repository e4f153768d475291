"""Value kinds: how each setting's text is parsed, checked and shown (URLs, ports, sizes, ...).

A kind turns environment text into a typed value (``parse``), validates and normalises a typed
value given in code (``check``), and writes a value back as text that ``parse`` accepts
(``show``). Kinds raise ``_RejectedError``; the owning :class:`~troupe.config.Setting` turns that
into a ConfigError that names the variable.

Credentials inside a URL (``nats://user:pass@host``) are masked by :func:`redact_urls` wherever a
URL is shown.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from fractions import Fraction
from urllib.parse import SplitResult, urlsplit

from troupe.messages._planes import DISCOVERY_BACKENDS, EVENT_PLANES, KV_STORES, PLANES

__all__ = [
    "DISCOVERY_BACKENDS",
    "EVENT_PLANES",
    "KV_STORES",
    "LOG_LEVELS",
    "PLANES",
    "redact_urls",
]

LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical")
"""Valid levels in ``DYN_LOG`` (``warn`` is stored as ``warning``)."""

_KIB = 1024
_MIB = 1024 * _KIB
_GIB = 1024 * _MIB


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
        # LogConfig is built from this kind (through the settings table): import it on use.
        from troupe.config._sections import LogConfig  # noqa: PLC0415 - import cycle

        assert isinstance(section, LogConfig)
        return self.join(section.level, section.targets)
