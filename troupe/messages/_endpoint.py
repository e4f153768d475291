"""The seed's object model: ``Namespace`` → ``Component`` → ``Endpoint``, and endpoint paths.

``rt.namespace("ns").component("c").endpoint("e")`` and ``rt.endpoint("ns.c.e")`` (also
``"dyn://ns.c.e"``) name the same endpoint. Constructing one registers nothing; names are
validated (``[a-z0-9_-]+``) so a bad name is a clear error, never a bad key.
"""

from __future__ import annotations

from dataclasses import dataclass

from troupe.errors import InvalidName
from troupe.messages._records import endpoint_prefix, validate_name

__all__ = ["Component", "Endpoint", "Namespace", "parse_endpoint"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A named endpoint: what workers serve and routers call."""

    namespace: str
    component: str
    name: str

    def __post_init__(self) -> None:
        validate_name("namespace", self.namespace)
        validate_name("component", self.component)
        validate_name("endpoint", self.name)

    @property
    def path(self) -> str:
        """``ns.component.endpoint``: the name on the request plane."""
        return f"{self.namespace}.{self.component}.{self.name}"

    @property
    def prefix(self) -> str:
        """``/services/ns/component/endpoint``: where its instances are registered."""
        return endpoint_prefix(self.namespace, self.component, self.name)

    def __str__(self) -> str:
        return f"dyn://{self.path}"


@dataclass(frozen=True, slots=True)
class Component:
    """A component of a namespace."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        validate_name("namespace", self.namespace)
        validate_name("component", self.name)

    def endpoint(self, name: str) -> Endpoint:
        """An endpoint of this component."""
        return Endpoint(self.namespace, self.name, name)


@dataclass(frozen=True, slots=True)
class Namespace:
    """A namespace."""

    name: str

    def __post_init__(self) -> None:
        validate_name("namespace", self.name)

    def component(self, name: str) -> Component:
        """A component of this namespace."""
        return Component(self.name, name)


def parse_endpoint(path: str | Endpoint) -> Endpoint:
    """``"ns.comp.ep"`` or ``"dyn://ns.comp.ep"`` (or an Endpoint) → :class:`Endpoint`.

    Raises:
        InvalidName: not exactly three dot-separated valid names (a ``ConfigError``).
    """
    if isinstance(path, Endpoint):
        return path
    parts = path.removeprefix("dyn://").split(".")
    if len(parts) != 3:
        raise InvalidName(
            "endpoint path", path, "ns.component.endpoint (or dyn://ns.component.endpoint)"
        )
    return Endpoint(*parts)
