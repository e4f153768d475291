"""Choosing a store from the configuration, and what the discovery packages export."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from troupe.config import Config, DiscoveryConfig, FileKvConfig, NatsConfig
from troupe.discovery import (
    STORES,
    EtcdStore,
    FileStore,
    MemoryKvServer,
    MemoryStore,
    NatsStore,
    open_store,
)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("etcd", EtcdStore), ("file", FileStore), ("memory", MemoryStore), ("nats", NatsStore)],
)
def test_the_configured_store_is_chosen_by_name(name: str, kind: type) -> None:
    store = open_store(DiscoveryConfig(kv_store=name), NatsConfig())
    assert isinstance(store, kind)
    assert store.name == name
    assert set(STORES) == {"etcd", "file", "memory", "nats"}


def test_the_environment_reaches_the_store(tmp_path: Path) -> None:
    config = Config.from_env(
        {
            "DYN_KV_STORE": "file",
            "DYN_FILE_KV": str(tmp_path / "kv"),
            "ETCD_ENDPOINTS": "http://127.0.0.1:1,http://127.0.0.1:2",
            "NATS_SERVER": "nats://127.0.0.1:3",
        }
    )
    store = open_store(config.discovery, config.nats)
    assert isinstance(store, FileStore)
    assert store.endpoints == (str(tmp_path / "kv"),)
    etcd = open_store(DiscoveryConfig(kv_store="etcd", etcd=config.discovery.etcd), config.nats)
    assert etcd.endpoints == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    nats = open_store(DiscoveryConfig(kv_store="nats"), config.nats)
    assert nats.endpoints == ("nats://127.0.0.1:3",)


def test_a_memory_store_can_join_a_shared_server() -> None:
    server = MemoryKvServer()
    store = open_store(DiscoveryConfig(kv_store="memory"), NatsConfig(), memory_server=server)
    assert isinstance(store, MemoryStore)
    assert store.server is server


def test_file_config_defaults_to_the_reference_directory() -> None:
    assert FileKvConfig().path.endswith("dynamo_store_kv")


EXPECTED = {
    "troupe.discovery": {
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
    },
    "troupe.testing.servers": {
        "EtcdServer",
        "NatsServer",
        "TlsFiles",
        "find_binary",
        "free_port",
        "issue_client_cert",
        "make_tls_files",
    },
}


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_all_is_what_we_mean_to_export(module: str) -> None:
    mod = importlib.import_module(module)
    assert set(mod.__all__) == EXPECTED[module]
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name} is listed in __all__ but missing"
