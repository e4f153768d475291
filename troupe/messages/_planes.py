"""The names of the planes and stores, listed once: configuration, factories and docs use these."""

from __future__ import annotations

__all__ = ["DISCOVERY_BACKENDS", "EVENT_PLANES", "KV_STORES", "PLANES"]

PLANES = ("tcp", "http", "nats")
"""Valid values of ``DYN_REQUEST_PLANE``."""

KV_STORES = ("etcd", "file", "memory", "nats")
"""Valid values of ``DYN_KV_STORE`` (``mem`` is accepted as an alias of ``memory``)."""

DISCOVERY_BACKENDS = ("kv_store", "kubernetes", *KV_STORES)
"""Valid values of ``DYN_DISCOVERY_BACKEND``; the store names are shorthands for ``kv_store``."""

EVENT_PLANES = ("nats", "zmq")
"""Valid values of ``DYN_EVENT_PLANE``: NATS subjects (and JetStream), or brokerless ZeroMQ."""
