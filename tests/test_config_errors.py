"""Tests of troupe.config: a bad value is a ConfigError naming its variable and value, from the
environment or built in code; configs are normalised, frozen and hashable."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest

from troupe.config import (
    Config,
    DiscoveryConfig,
    EtcdConfig,
    Http2Config,
    HttpConfig,
    LogConfig,
    NatsConfig,
    RequestPlaneConfig,
    SystemConfig,
    TcpConfig,
    WorkerConfig,
)
from troupe.errors import ConfigError, TroupeError

# --- errors ------------------------------------------------------------------------------------


BAD_VALUES = [
    ("DYN_REQUEST_PLANE", "udp"),
    ("DYN_REQUEST_PLANE", "http2"),
    ("DYN_DISCOVERY_BACKEND", "zookeeper"),
    ("DYN_KV_STORE", "redis"),
    ("DYN_TCP_RPC_PORT", "eighty"),
    ("DYN_TCP_RPC_PORT", "1_000"),
    ("DYN_HTTP_RPC_PORT", "65536"),
    ("DYN_TCP_RPC_PORT", "-1"),
    ("DYN_SYSTEM_PORT", "-2"),
    ("DYN_TCP_REQUEST_TIMEOUT", "-1"),
    ("DYN_NATS_REQUEST_TIMEOUT_SECS", "soon"),
    ("DYN_HTTP2_KEEP_ALIVE_TIMEOUT_SECS", "inf"),
    ("DYN_LEASE_TTL", "0"),
    ("DYN_LEASE_TTL", "-5"),
    ("DYN_TCP_MAX_MESSAGE_SIZE", "0"),
    ("DYN_TCP_MAX_MESSAGE_SIZE", "32XB"),
    ("DYN_TCP_MAX_MESSAGE_SIZE", "1.5"),
    ("DYN_HTTP2_MAX_FRAME_SIZE", "16MB"),
    ("DYN_HTTP2_MAX_FRAME_SIZE", "1000"),
    ("DYN_TCP_POOL_SIZE", "0"),
    ("DYN_HTTP2_MAX_CONCURRENT_STREAMS", "many"),
    ("DYN_WORKER_MAX_INFLIGHT", "-1"),
    ("DYN_WORKER_MAX_INFLIGHT_PER_CALLER", "-1"),
    ("DYN_HTTP2_ADAPTIVE_WINDOW", "maybe"),
    ("DYN_LOGGING_JSONL", "2"),
    ("ETCD_ENDPOINTS", "ftp://etcd:2379"),
    ("ETCD_ENDPOINTS", "etcd"),
    ("ETCD_ENDPOINTS", "http://etcd:2379/v3/path"),
    ("ETCD_ENDPOINTS", ",,"),
    ("NATS_SERVER", "http://nats:4222"),
    ("NATS_SERVER", "nats://nats:port"),
    ("DYN_LOG", "verbose"),
    ("DYN_LOG", "info,troupe=loud"),
    ("DYN_LOG", "info,debug"),
    ("DYN_LOG", "info,bad target=debug"),
    ("DYN_HTTP_RPC_ROOT_PATH", "v1/rpc"),
    ("DYN_SYSTEM_HEALTH_PATH", "health"),
    ("DYN_TCP_RPC_HOST", "my host"),
]


@pytest.mark.parametrize(("variable", "text"), BAD_VALUES)
def test_bad_value_is_a_config_error_naming_variable_and_value(variable: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({variable: text})
    err = info.value
    assert (err.variable, err.value) == (variable, text)
    assert variable in str(err)
    assert repr(text) in str(err)
    assert err.expected or err.choices


@pytest.mark.parametrize(
    ("variable", "choices"),
    [
        ("DYN_REQUEST_PLANE", ("tcp", "http", "nats")),
        ("DYN_DISCOVERY_BACKEND", ("kv_store", "kubernetes", "etcd", "file", "memory", "nats")),
        ("DYN_KV_STORE", ("etcd", "file", "memory", "nats")),
        ("DYN_LOG", ("trace", "debug", "info", "warn", "warning", "error", "critical")),
    ],
)
def test_enumeration_error_lists_every_choice(variable: str, choices: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({variable: "bogus"})
    assert info.value.choices == choices
    message = str(info.value)
    for choice in choices:
        assert re.search(rf"\b{choice}\b", message), choice


def test_config_error_is_in_the_troupe_tree() -> None:
    with pytest.raises(TroupeError):
        Config.from_env({"DYN_REQUEST_PLANE": "udp"})
    with pytest.raises(ValueError, match="DYN_REQUEST_PLANE"):
        Config.from_env({"DYN_REQUEST_PLANE": "udp"})


CODE_ERRORS: list[tuple[str, Callable[[], object]]] = [
    ("DYN_REQUEST_PLANE", lambda: RequestPlaneConfig(plane="zmq")),
    ("DYN_DISCOVERY_BACKEND", lambda: DiscoveryConfig(backend="consul")),
    ("DYN_LEASE_TTL", lambda: DiscoveryConfig(lease_ttl=0)),
    ("DYN_TCP_RPC_PORT", lambda: TcpConfig(port=70000)),
    ("DYN_TCP_RPC_PORT", lambda: TcpConfig(port="80")),  # type: ignore[arg-type]
    ("DYN_TCP_REQUEST_TIMEOUT", lambda: TcpConfig(request_timeout=-0.1)),
    ("DYN_TCP_POOL_SIZE", lambda: TcpConfig(pool_size=True)),
    ("DYN_HTTP2_MAX_FRAME_SIZE", lambda: Http2Config(max_frame_size=1 << 24)),
    ("DYN_HTTP2_ADAPTIVE_WINDOW", lambda: Http2Config(adaptive_window="yes")),  # type: ignore[arg-type]
    ("DYN_HTTP_RPC_ROOT_PATH", lambda: HttpConfig(root_path="rpc")),
    ("ETCD_ENDPOINTS", lambda: EtcdConfig(endpoints=())),
    ("ETCD_ENDPOINTS", lambda: EtcdConfig(endpoints=("mailto:x",))),
    ("NATS_SERVER", lambda: NatsConfig(server="ws://nats")),
    ("DYN_LOG", lambda: LogConfig(level="chatty")),
    ("DYN_LOG", lambda: LogConfig(targets=(("troupe", "chatty"),))),
    ("DYN_SYSTEM_PORT", lambda: SystemConfig(port=-7)),
    ("DYN_WORKER_MAX_INFLIGHT", lambda: WorkerConfig(max_inflight=-1)),
    ("DYN_WORKER_MAX_INFLIGHT_PER_CALLER", lambda: WorkerConfig(max_inflight_per_caller=-1)),
]


@pytest.mark.parametrize(("variable", "build"), CODE_ERRORS)
def test_configs_built_in_code_are_validated(variable: str, build: Callable[[], object]) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.variable == variable


def test_configs_built_in_code_are_normalised() -> None:
    assert RequestPlaneConfig(plane="HTTP").plane == "http"
    discovery = DiscoveryConfig(backend="mem")
    assert (discovery.backend, discovery.kv_store) == ("kv_store", "memory")
    assert dataclasses.replace(discovery, lease_ttl=3).kv_store == "memory"
    assert HttpConfig(root_path="/rpc//").root_path == "/rpc"
    assert HttpConfig(root_path="/").root_path == "/"
    assert EtcdConfig(endpoints=["e:1"]).endpoints == ("http://e:1",)  # type: ignore[arg-type]
    assert TcpConfig(request_timeout=2).request_timeout == 2.0
    log = LogConfig(level="WARN,troupe=debug", targets=(("nats", "error"),))
    assert (log.level, log.targets) == ("warning", (("nats", "error"), ("troupe", "debug")))
    assert dataclasses.replace(log, json=True).targets == log.targets


def test_configs_are_frozen_and_hashable() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.request_plane.tcp.port = 1  # type: ignore[misc]
    assert hash(config) == hash(Config())
