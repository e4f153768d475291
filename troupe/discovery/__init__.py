"""The discovery plane: where workers register their endpoints and frontends find them.

One :class:`KeyValueStore` interface (leases, put/create/get/delete/list, prefix watches that yield
a :class:`Snapshot` and then :class:`Put`/:class:`Delete` events with no gap) and four backends:
:class:`EtcdStore` (the default), :class:`MemoryStore` (one process), :class:`FileStore` (a
directory shared by the processes of one host) and :class:`NatsStore` (a JetStream KV bucket); and
:class:`KubernetesStore`, which keeps the keys in per-pod custom resources and shows them while the
pod is ready in an EndpointSlice.
:func:`open_store` picks one from the configuration. The registration layout (keys under
``/services/``, JSON :class:`InstanceRecord` values) lives here too.
"""

from troupe.discovery._etcd import EtcdStore
from troupe.discovery._factory import STORES, open_store
from troupe.discovery._file import FileStore
from troupe.discovery._kubernetes import KubernetesStore
from troupe.discovery._memory import MemoryKvServer, MemoryStore
from troupe.discovery._nats import NatsStore
from troupe.discovery._store import (
    Delete,
    KeyValue,
    KeyValueStore,
    MonotonicClock,
    Put,
    Snapshot,
    TimeSource,
    Watch,
    WatchEvent,
    key_matches,
    normalize_prefix,
)

__all__ = [
    "STORES",
    "Delete",
    "EtcdStore",
    "FileStore",
    "KeyValue",
    "KeyValueStore",
    "KubernetesStore",
    "MemoryKvServer",
    "MemoryStore",
    "MonotonicClock",
    "NatsStore",
    "Put",
    "Snapshot",
    "TimeSource",
    "Watch",
    "WatchEvent",
    "key_matches",
    "normalize_prefix",
    "open_store",
]
