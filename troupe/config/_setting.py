"""One row of the settings table: :class:`Setting`, and the value kinds rows share.

The table itself is :data:`troupe.config._settings.SETTINGS` (with the TLS and authentication
rows of :mod:`troupe.config._settings_security`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from troupe.config._kinds import (
    _HOST_RE,
    _MASK,
    _Int,
    _Kind,
    _LogSpec,
    _NatsServers,
    _RejectedError,
    _Seconds,
    _Text,
)
from troupe.errors import ConfigError

if TYPE_CHECKING:
    from troupe.config._config import Config

__all__ = ["Setting"]

_HTTP2_MIN_FRAME = 16_384  # RFC 9113 §4.2: SETTINGS_MAX_FRAME_SIZE lies in 2**14 .. 2**24 - 1
_HTTP2_MAX_FRAME = 16_777_215
_MAX_PORT = 65_535


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


_HOST = _Text(optional=True, pattern=_HOST_RE, expected="a host name or IP address")
_OPTIONAL = _Text(optional=True)
_PORT = _Int(0, _MAX_PORT, "a port number 0..65535 (0 = OS-assigned)")
_TIMEOUT = _Seconds(positive=False)
_COUNT = _Int(1, None, "an integer >= 1")
_LOG = _LogSpec()
_NATS_SERVERS = _NatsServers()
