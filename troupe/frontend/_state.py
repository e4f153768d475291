"""What the frontend's handlers share: its settings, its state, and how its routers retry.

:class:`FrontendSettings` is the frontend's configuration; :class:`FrontendState` is what every
handler reads (registry, metrics, settings) and the drain state. Instances: each generation
leases its (model, endpoint) router from the registry and calls ``router.generate``; the router
chooses the worker (its policy, ``router_mode``, seeing the load of every caller of that router)
and does every retry, as :func:`route_options` sets it up from the settings. A worker answering
``Overloaded`` is skipped for another, up to ``overload_tries`` tries in all, after a short
jittered pause once every worker refused (503 when the tries are spent). When a worker fails
mid-generation (connect failure, broken stream) and ``migration_limit`` allows it, the generation
continues on a worker it has not tried (waiting up to ``instance_wait`` for a replacement to
register when none is left), with ``"resume"`` telling the engine how many tokens (and which
text) the client already has (:func:`resume_request`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from troupe.actors.routing import KvRouterSettings, Retries
from troupe.errors import ConfigError
from troupe.frontend._metrics import FrontendMetrics
from troupe.frontend._models import ModelRegistry, RouteOptions
from troupe.frontend._tls import FrontendTls
from troupe.frontend._tokenizer import Tokenizer, WordTokenizer
from troupe.runtime import Runtime

__all__ = ["ROUTER_MODES", "FrontendSettings", "FrontendState", "resume_request", "route_options"]

ROUTER_MODES = ("round_robin", "random", "least_loaded", "kv")
"""The frontend's ``--router-mode`` values."""


@dataclass(frozen=True, slots=True)
class FrontendSettings:
    """How the frontend serves.

    Attributes:
        host: address to bind (``0.0.0.0``: every interface); loopback by default, so that
            other hosts reach the frontend only when asked for.
        port: port to bind; ``0`` lets the OS pick (see ``Frontend.port``).
        router_mode: the routers' policy: ``round_robin``, ``random``, ``least_loaded`` or
            ``kv`` (KV-aware: each request to the worker that holds most of its prefix, weighed
            against load; see docs/routing.md).
        kv: the ``kv`` policy's settings (block size, overlap weight, temperature, busy
            threshold, approximate mode: ``--no-kv-events``); None: the defaults.
        migration_limit: how many times a generation whose worker fails is resumed on another.
        grace: seconds in-flight requests get to finish on shutdown (``/health`` is 503 then).
        instance_wait: seconds a request waits for a just-discovered model's router to see its
            instances before answering 503, and a migration for a replacement worker to
            register when every known one was tried.
        max_body_size: the largest request body accepted, in bytes (a larger one is answered
            413 without being read further over HTTP/1.1; over HTTP/2 it is discarded first);
            ``None``: the runtime's ``request_plane.tcp.max_message_size``
            (``DYN_TCP_MAX_MESSAGE_SIZE``, 32 MiB), since a larger request could not be sent to
            a worker anyway.
        overload_tries: how many tries a generation makes when workers answer ``Overloaded``
            (the first included; ``1``: no retry), each to a worker it has not tried yet while
            there is one.
        overload_pause: seconds before the next round of tries once every worker answered
            ``Overloaded``: doubled at each round, times a random factor in [0.5, 1.5).
        router_idle: seconds a (model, endpoint) router is kept after its last instance left.
        tokenizer: turns each prompt into the ``token_ids`` sent to the worker; ``None``: the
            built-in :class:`~troupe.frontend._tokenizer.WordTokenizer`.
        tls: serve HTTPS with these files (and require client certificates when it names a
            client CA); ``None``: plain HTTP.
        api_key: the key every route but ``/health`` and ``/live`` requires as
            ``Authorization: Bearer <key>`` (401 without it); ``None``: no key.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    router_mode: str = "round_robin"
    migration_limit: int = 0
    grace: float = 5.0
    instance_wait: float = 2.0
    max_body_size: int | None = None
    overload_tries: int = 3
    overload_pause: float = 0.01
    router_idle: float = 30.0
    tokenizer: Tokenizer | None = None
    kv: KvRouterSettings | None = None
    tls: FrontendTls | None = None
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65_535:
            raise ConfigError("--port", self.port, "a port number 0..65535 (0 = OS-assigned)")
        if self.router_mode not in ROUTER_MODES:
            raise ConfigError("--router-mode", self.router_mode, choices=ROUTER_MODES)
        if self.kv is not None and not isinstance(self.kv, KvRouterSettings):
            raise ConfigError("kv", self.kv, "a KvRouterSettings")
        if not isinstance(self.migration_limit, int) or self.migration_limit < 0:
            raise ConfigError("--migration-limit", self.migration_limit, "an integer >= 0")
        if not self.grace >= 0:
            raise ConfigError("--grace", self.grace, "seconds >= 0")
        if not self.instance_wait >= 0:
            raise ConfigError("instance_wait", self.instance_wait, "seconds >= 0")
        if self.max_body_size is not None and (
            not isinstance(self.max_body_size, int) or self.max_body_size < 1
        ):
            raise ConfigError("--max-body-size", self.max_body_size, "a number of bytes >= 1")
        if not isinstance(self.overload_tries, int) or self.overload_tries < 1:
            raise ConfigError("--overload-tries", self.overload_tries, "an integer >= 1")
        if not self.overload_pause >= 0:
            raise ConfigError("overload_pause", self.overload_pause, "seconds >= 0")
        if not self.router_idle > 0:
            raise ConfigError("--router-idle", self.router_idle, "seconds > 0")
        if self.tokenizer is not None and not callable(getattr(self.tokenizer, "encode", None)):
            raise ConfigError("tokenizer", self.tokenizer, "an object with encode(text) -> ids")
        if self.tls is not None and not isinstance(self.tls, FrontendTls):
            raise ConfigError("tls", self.tls, "a FrontendTls")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigError("--api-key", "****", "a non-empty string (DYN_HTTP_API_KEY)")

    def retries(self) -> Retries:
        """The routers' retries: ``overload_tries`` and ``overload_pause``, and ``instance_wait``
        for a replacement worker."""
        return Retries(
            overload_tries=self.overload_tries,
            overload_pause=self.overload_pause,
            replacement_wait=self.instance_wait,
        )


def route_options(settings: FrontendSettings, metrics: FrontendMetrics) -> RouteOptions:
    """How the frontend's routers retry, migrate and resume, counting into ``metrics``."""
    return RouteOptions(
        migration_limit=settings.migration_limit,
        retries=settings.retries(),
        resume=resume_request,
        observer=lambda model: _Counted(metrics, model),
    )


class _Counted:
    """The observer of one model's router: counts its retries and migrations."""

    __slots__ = ("_migrations", "_retries")

    def __init__(self, metrics: FrontendMetrics, model: str) -> None:
        self._retries = metrics.retries.labels(model)
        self._migrations = metrics.migrations.labels(model)

    def retried(self, endpoint: str) -> None:
        self._retries.inc()

    def migrated(self, endpoint: str) -> None:
        self._migrations.inc()


def resume_request(request: dict[str, Any], received: list[Any]) -> dict[str, Any]:
    """The router's ``resume`` hook: ``request`` with a ``"resume"`` field saying what the
    client already has (``tokens`` generated and their ``text``), counted from the engine
    chunks ``received`` as the response counts them (malformed chunks are skipped: the
    response fails on them anyway)."""
    tokens = 0
    texts: list[str] = []
    for chunk in received:
        if not isinstance(chunk, dict):
            continue
        text = chunk.get("text", "")
        if not isinstance(text, str):
            continue
        count = chunk.get("tokens", 1 if text else 0)
        if isinstance(count, int) and count > 0:
            tokens += count
        if text:
            texts.append(text)
    return request | {"resume": {"tokens": tokens, "text": "".join(texts)}}


class FrontendState:
    """What the handlers share: registry, metrics, settings, and the drain state."""

    def __init__(
        self,
        rt: Runtime,
        registry: ModelRegistry,
        metrics: FrontendMetrics,
        settings: FrontendSettings,
    ) -> None:
        self.rt = rt
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self.max_body_size = (
            settings.max_body_size
            if settings.max_body_size is not None
            else rt.config.request_plane.tcp.max_message_size
        )
        self.tokenizer: Tokenizer = (
            settings.tokenizer if settings.tokenizer is not None else WordTokenizer()
        )
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        """A generation starts."""
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        """A generation ended."""
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no generation is in flight; ``False`` on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
