"""The errors of configuration, the actor core and discovery (see :mod:`troupe.errors`)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ActorDead",
    "ActorError",
    "AskTimeout",
    "ConfigError",
    "DiscoveryError",
    "DiscoveryUnavailable",
    "InvalidName",
    "KeyExists",
    "LeaseLost",
    "StartFailed",
    "SupervisorEscalation",
    "TroupeError",
    "UnexpectedMessage",
]


_SAME: object = object()  # ConfigError.naming: keep the value


class TroupeError(Exception):
    """Root of every error troupe raises on purpose."""


# --- configuration -----------------------------------------------------------------------------


class ConfigError(TroupeError, ValueError):
    """A setting has a value troupe cannot use.

    Attributes:
        variable: the environment variable (or code-level field) that holds the bad value.
        value: the value as given.
        expected: what would have been accepted, in words.
        choices: the valid values when the setting is an enumeration.
    """

    def __init__(
        self,
        variable: str,
        value: object,
        expected: str = "",
        choices: Sequence[str] = (),
    ) -> None:
        self.variable = variable
        self.value = value
        self.expected = expected
        self.choices = tuple(choices)
        parts = [f"invalid {variable}={value!r}"]
        if self.choices:
            parts.append("valid values: " + ", ".join(self.choices))
        elif expected:
            parts.append(f"expected {expected}")
        super().__init__("; ".join(parts))

    def naming(self, variable: str, value: object = _SAME) -> ConfigError:
        """The same refusal under another name: the command-line flag that set a code-level
        field (``--block-size`` for ``block_size``), and the value as it may be shown."""
        shown = self.value if value is _SAME else value
        return ConfigError(variable, shown, self.expected, self.choices)


class InvalidName(ConfigError):
    """A namespace, component or endpoint name (or endpoint path) is malformed."""


# --- actors ------------------------------------------------------------------------------------


class ActorError(TroupeError):
    """Base for errors of the actor core."""


class ActorDead(ActorError):
    """The actor is stopped, or stopped while the request was pending.

    Attributes:
        actor: the actor's name.
        reason: why it stopped (``"normal"``, ``"shutdown"`` or ``"error"``), if known.
    """

    def __init__(self, actor: str, reason: str | None = None, detail: str = "") -> None:
        self.actor = actor
        self.reason = reason
        msg = f"actor {actor} is dead"
        if reason:
            msg += f" (reason: {reason}{': ' + detail if detail else ''})"
        super().__init__(msg)


class AskTimeout(ActorError, TimeoutError):
    """An ``ask`` got no reply within its timeout; the actor is still alive."""

    def __init__(self, actor: str, timeout: float) -> None:
        self.actor = actor
        self.timeout = timeout
        super().__init__(f"actor {actor} did not reply within {timeout:g} s")


class UnexpectedMessage(ActorError, TypeError):
    """A message was sent to an actor that does not declare it in its message union."""

    def __init__(self, actor: str, message: object, accepted: Sequence[str]) -> None:
        self.actor = actor
        self.message_type = type(message).__name__
        self.accepted = tuple(accepted)
        super().__init__(
            f"actor {actor} does not accept {self.message_type}; it accepts: "
            + ", ".join(self.accepted)
        )


class SupervisorEscalation(ActorError):
    """A supervisor exceeded its restart intensity and gave up on its children."""

    def __init__(self, supervisor: str, restarts: int, window: float) -> None:
        self.supervisor = supervisor
        self.restarts = restarts
        self.window = window
        super().__init__(
            f"supervisor {supervisor} exceeded {restarts} restarts in {window:g} s; escalating"
        )


class StartFailed(ActorError):
    """An actor (a worker process) failed before it finished starting.

    The cause is usually in the configuration or the environment (a port in use, the discovery
    store unreachable, a handler that cannot be imported), so starting it again would fail the
    same way: a supervisor does not restart a child whose first start fails; it stops its other
    children and stops with this error.

    Attributes:
        actor: the actor's name.
        detail: what went wrong, in one line (a worker process's own error message).
        code: the process's exit status, when it exited (negative: killed by that signal).
    """

    def __init__(self, actor: str, detail: str, *, code: int | None = None) -> None:
        self.actor = actor
        self.detail = detail
        self.code = code
        super().__init__(f"{actor} failed to start: {detail}")


# --- discovery ---------------------------------------------------------------------------------


class DiscoveryError(TroupeError):
    """The discovery plane failed (store unreachable, bad record, lease trouble)."""


class DiscoveryUnavailable(DiscoveryError):
    """The discovery store cannot be reached.

    Attributes:
        backend: the store kind (``etcd``, ``nats``, ...).
        endpoints: the addresses that were tried.
    """

    def __init__(self, backend: str, endpoints: Sequence[str], detail: str = "") -> None:
        self.backend = backend
        self.endpoints = tuple(endpoints)
        msg = f"{backend} discovery store unreachable at {', '.join(self.endpoints)}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class KeyExists(DiscoveryError):
    """A create-if-absent write found the key already present."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"key already exists: {key}")


class LeaseLost(DiscoveryError):
    """The lease expired or was revoked; keys bound to it are gone."""

    def __init__(self, lease_id: int | str, detail: str = "") -> None:
        self.lease_id = lease_id
        super().__init__(f"lease {lease_id} lost" + (f": {detail}" if detail else ""))
