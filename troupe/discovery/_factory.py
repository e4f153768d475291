"""Choosing a store: ``DYN_KV_STORE`` looked up in one table, or the ``kubernetes`` backend."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from troupe.config import DiscoveryConfig, NatsConfig
from troupe.discovery._etcd import EtcdStore
from troupe.discovery._file import FileStore
from troupe.discovery._kubernetes import KubernetesStore
from troupe.discovery._memory import MemoryKvServer, MemoryStore
from troupe.discovery._nats import NatsStore
from troupe.discovery._store import KeyValueStore, TimeSource
from troupe.errors import ConfigError

__all__ = ["STORES", "open_store"]

_Factory = Callable[
    [DiscoveryConfig, NatsConfig, TimeSource | None, MemoryKvServer | None], KeyValueStore
]


def _etcd(
    config: DiscoveryConfig, nats: NatsConfig, clock: TimeSource | None, _: MemoryKvServer | None
) -> KeyValueStore:
    return EtcdStore(config.etcd)


def _file(
    config: DiscoveryConfig, nats: NatsConfig, clock: TimeSource | None, _: MemoryKvServer | None
) -> KeyValueStore:
    return FileStore(config.file, clock=clock)


def _memory(
    config: DiscoveryConfig,
    nats: NatsConfig,
    clock: TimeSource | None,
    server: MemoryKvServer | None,
) -> KeyValueStore:
    return MemoryStore(server, clock=clock)


def _nats(
    config: DiscoveryConfig, nats: NatsConfig, clock: TimeSource | None, _: MemoryKvServer | None
) -> KeyValueStore:
    return NatsStore(nats, clock=clock)


STORES: Mapping[str, _Factory] = {"etcd": _etcd, "file": _file, "memory": _memory, "nats": _nats}
"""Store constructors by ``DYN_KV_STORE`` value."""


def open_store(
    config: DiscoveryConfig,
    nats: NatsConfig,
    *,
    clock: TimeSource | None = None,
    memory_server: MemoryKvServer | None = None,
) -> KeyValueStore:
    """Build (not connect) the store of ``config.backend`` (for ``kv_store``: of ``kv_store``).

    Args:
        config: the discovery section; ``backend`` and ``kv_store`` pick the store
            (``kubernetes`` uses ``config.kubernetes`` and ``config.pod``).
        nats: the NATS connection settings (used by the ``nats`` store).
        clock: time source for lease bookkeeping (memory, file and nats stores).
        memory_server: the shared state of a ``memory`` store (a private one when omitted), so
            that several runtimes in one process can see each other.

    Raises:
        ConfigError: ``kv_store`` names no known store, or the kubernetes backend is chosen
            but kr8s is not installed.
    """
    if config.backend == "kubernetes":
        return KubernetesStore(config.kubernetes, config.pod)
    factory = STORES.get(config.kv_store)
    if factory is None:
        raise ConfigError("DYN_KV_STORE", config.kv_store, choices=tuple(STORES))
    return factory(config, nats, clock, memory_server)
