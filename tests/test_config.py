"""Tests of troupe.config: seed defaults, environment overrides, validation, describe, docs."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe.config import (
    SETTINGS,
    Config,
    DiscoveryConfig,
    EtcdConfig,
    Http2Config,
    HttpConfig,
    LogConfig,
    NatsConfig,
    RequestPlaneConfig,
    Setting,
    SystemConfig,
    TcpConfig,
    WorkerConfig,
    format_table,
    redact_urls,
)
from troupe.errors import ConfigError, TroupeError

MIB = 1024 * 1024
BY_VARIABLE = {s.variable: s for s in SETTINGS}
DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def value_of(config: Config, variable: str) -> object:
    return BY_VARIABLE[variable].read(config)


# Every setting's default, as the seeds give it (typed, as the config objects hold it).
SEED_DEFAULTS: dict[str, object] = {
    "DYN_DISCOVERY_BACKEND": "kv_store",
    "DYN_KV_STORE": "etcd",
    "DYN_LEASE_TTL": 10.0,
    "ETCD_ENDPOINTS": ("http://localhost:2379",),
    "ETCD_AUTH_USERNAME": None,
    "ETCD_AUTH_PASSWORD": None,
    "ETCD_AUTH_CA": None,
    "ETCD_AUTH_CLIENT_CERT": None,
    "ETCD_AUTH_CLIENT_KEY": None,
    "DYN_ETCD_CONNECT_TIMEOUT": 3.0,
    "DYN_FILE_KV": str(Path(tempfile.gettempdir()) / "dynamo_store_kv"),
    "POD_NAME": None,
    "POD_NAMESPACE": None,
    "POD_UID": None,
    "KUBECONFIG": None,
    "DYN_REQUEST_PLANE": "tcp",
    "DYN_TCP_RPC_HOST": None,
    "DYN_TCP_RPC_PORT": 0,
    "DYN_TCP_MAX_MESSAGE_SIZE": 32 * MIB,
    "DYN_TCP_REQUEST_TIMEOUT": 10.0,
    "DYN_TCP_POOL_SIZE": 50,
    "DYN_TCP_CONNECT_TIMEOUT": 3.0,
    "DYN_TCP_CHANNEL_BUFFER": 100,
    "DYN_HTTP_RPC_HOST": None,
    "DYN_HTTP_RPC_PORT": 8888,
    "DYN_HTTP_RPC_ROOT_PATH": "/v1/rpc",
    "DYN_HTTP_REQUEST_TIMEOUT": 10.0,
    "DYN_HTTP2_MAX_FRAME_SIZE": MIB,
    "DYN_HTTP2_MAX_CONCURRENT_STREAMS": 1000,
    "DYN_HTTP2_POOL_MAX_IDLE_PER_HOST": 100,
    "DYN_HTTP2_POOL_IDLE_TIMEOUT_SECS": 90.0,
    "DYN_HTTP2_KEEP_ALIVE_INTERVAL_SECS": 30.0,
    "DYN_HTTP2_KEEP_ALIVE_TIMEOUT_SECS": 10.0,
    "DYN_HTTP2_ADAPTIVE_WINDOW": True,
    "NATS_SERVER": "nats://localhost:4222",
    "NATS_AUTH_USERNAME": None,
    "NATS_AUTH_PASSWORD": None,
    "NATS_AUTH_TOKEN": None,
    "NATS_AUTH_CREDENTIALS_FILE": None,
    "DYN_NATS_CONNECT_TIMEOUT": 3.0,
    "DYN_NATS_REQUEST_TIMEOUT_SECS": 10.0,
    "DYN_EVENT_PLANE": "nats",
    "DYN_DURABLE_KV_EVENTS": False,
    "DYN_LOG": "info",
    "DYN_LOGGING_JSONL": False,
    "DYN_SYSTEM_HOST": "0.0.0.0",
    "DYN_SYSTEM_PORT": -1,
    "DYN_SYSTEM_HEALTH_PATH": "/health",
    "DYN_SYSTEM_LIVE_PATH": "/live",
    "DYN_HTTP_HOST": "0.0.0.0",
    "DYN_HTTP_PORT": 8000,
    "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": 5.0,
    "DYN_WORKER_MAX_INFLIGHT": 1024,
    "DYN_WORKER_MAX_INFLIGHT_PER_CALLER": 512,
}

# One override per variable: the environment text and the value it must produce.
OVERRIDES: dict[str, tuple[str, object]] = {
    "DYN_DISCOVERY_BACKEND": ("kubernetes", "kubernetes"),
    "DYN_KV_STORE": ("file", "file"),
    "DYN_LEASE_TTL": ("2.5", 2.5),
    "ETCD_ENDPOINTS": ("http://e1:2379,e2:2380", ("http://e1:2379", "http://e2:2380")),
    "ETCD_AUTH_USERNAME": ("root", "root"),
    "ETCD_AUTH_PASSWORD": ("hunter2", "hunter2"),
    "ETCD_AUTH_CA": ("/etc/ca.pem", "/etc/ca.pem"),
    "ETCD_AUTH_CLIENT_CERT": ("/etc/c.pem", "/etc/c.pem"),
    "ETCD_AUTH_CLIENT_KEY": ("/etc/k.pem", "/etc/k.pem"),
    "DYN_ETCD_CONNECT_TIMEOUT": ("0.5", 0.5),
    "DYN_FILE_KV": ("/srv/kv", "/srv/kv"),
    "POD_NAME": ("worker-0", "worker-0"),
    "POD_NAMESPACE": ("prod", "prod"),
    "POD_UID": ("1234-abcd", "1234-abcd"),
    "KUBECONFIG": ("/etc/kube/config", "/etc/kube/config"),
    "DYN_REQUEST_PLANE": ("nats", "nats"),
    "DYN_TCP_RPC_HOST": ("127.0.0.1", "127.0.0.1"),
    "DYN_TCP_RPC_PORT": ("9999", 9999),
    "DYN_TCP_MAX_MESSAGE_SIZE": ("64MB", 64 * MIB),
    "DYN_TCP_REQUEST_TIMEOUT": ("5", 5.0),
    "DYN_TCP_POOL_SIZE": ("8", 8),
    "DYN_TCP_CONNECT_TIMEOUT": ("1.25", 1.25),
    "DYN_TCP_CHANNEL_BUFFER": ("7", 7),
    "DYN_HTTP_RPC_HOST": ("localhost", "localhost"),
    "DYN_HTTP_RPC_PORT": ("0", 0),
    "DYN_HTTP_RPC_ROOT_PATH": ("/api/rpc/", "/api/rpc"),
    "DYN_HTTP_REQUEST_TIMEOUT": ("0", 0.0),
    "DYN_HTTP2_MAX_FRAME_SIZE": ("16KiB", 16384),
    "DYN_HTTP2_MAX_CONCURRENT_STREAMS": ("10", 10),
    "DYN_HTTP2_POOL_MAX_IDLE_PER_HOST": ("2", 2),
    "DYN_HTTP2_POOL_IDLE_TIMEOUT_SECS": ("1", 1.0),
    "DYN_HTTP2_KEEP_ALIVE_INTERVAL_SECS": ("3", 3.0),
    "DYN_HTTP2_KEEP_ALIVE_TIMEOUT_SECS": ("4", 4.0),
    "DYN_HTTP2_ADAPTIVE_WINDOW": ("off", False),
    "NATS_SERVER": ("n1:4222, tls://n2:4223", "nats://n1:4222,tls://n2:4223"),
    "NATS_AUTH_USERNAME": ("alice", "alice"),
    "NATS_AUTH_PASSWORD": ("s3cret", "s3cret"),
    "NATS_AUTH_TOKEN": ("t0ken", "t0ken"),
    "NATS_AUTH_CREDENTIALS_FILE": ("/etc/nats.creds", "/etc/nats.creds"),
    "DYN_NATS_CONNECT_TIMEOUT": ("6", 6.0),
    "DYN_NATS_REQUEST_TIMEOUT_SECS": ("7.5", 7.5),
    "DYN_EVENT_PLANE": ("ZMQ", "zmq"),
    "DYN_DURABLE_KV_EVENTS": ("true", True),
    "DYN_LOG": ("DEBUG,troupe.transports=trace", "debug,troupe.transports=trace"),
    "DYN_LOGGING_JSONL": ("1", True),
    "DYN_SYSTEM_HOST": ("127.0.0.1", "127.0.0.1"),
    "DYN_SYSTEM_PORT": ("9090", 9090),
    "DYN_SYSTEM_HEALTH_PATH": ("/healthz", "/healthz"),
    "DYN_SYSTEM_LIVE_PATH": ("/livez", "/livez"),
    "DYN_HTTP_HOST": ("127.0.0.1", "127.0.0.1"),
    "DYN_HTTP_PORT": ("8080", 8080),
    "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": ("30", 30.0),
    "DYN_WORKER_MAX_INFLIGHT": ("64", 64),
    "DYN_WORKER_MAX_INFLIGHT_PER_CALLER": ("0", 0),
}

SECRETS = ("ETCD_AUTH_PASSWORD", "NATS_AUTH_PASSWORD", "NATS_AUTH_TOKEN")


# --- the table ---------------------------------------------------------------------------------


def test_tables_of_this_test_cover_every_setting() -> None:
    assert set(SEED_DEFAULTS) == set(BY_VARIABLE)
    assert set(OVERRIDES) == set(BY_VARIABLE)


def test_settings_table_is_consistent() -> None:
    assert len(BY_VARIABLE) == len(SETTINGS), "duplicate variable in SETTINGS"
    config = Config()
    for setting in SETTINGS:
        section: object = config
        for part in setting.section.split("."):
            section = getattr(section, part)
        assert setting.field in {f.name for f in dataclasses.fields(section)}  # type: ignore[arg-type]
        assert setting.help
    assert {s.variable for s in SETTINGS if s.secret} == set(SECRETS)


# --- defaults and overrides ----------------------------------------------------------------------


@pytest.mark.parametrize("variable", sorted(SEED_DEFAULTS))
def test_seed_default(variable: str) -> None:
    assert value_of(Config(), variable) == SEED_DEFAULTS[variable]


def test_empty_environment_gives_the_defaults() -> None:
    config = Config.from_env({})
    assert config == Config()
    assert config.sources == frozenset()
    assert {row.source for row in config.describe()} == {"default"}


@pytest.mark.parametrize("variable", sorted(OVERRIDES))
def test_env_override(variable: str) -> None:
    text, expected = OVERRIDES[variable]
    config = Config.from_env({variable: text})
    assert value_of(config, variable) == expected
    assert variable in config.sources
    assert variable in {r.variable for r in config.describe() if r.source == "env"}


def test_all_overrides_at_once_and_round_trip_through_to_env() -> None:
    env = {variable: text for variable, (text, _) in OVERRIDES.items()}
    env["DYN_DISCOVERY_BACKEND"] = "kv_store"  # a shorthand would override DYN_KV_STORE
    config = Config.from_env(env)
    assert config.sources == frozenset(env)
    assert Config.from_env(config.to_env()) == config
    assert Config.from_env(Config().to_env()) == Config()


@settings(max_examples=60, deadline=None)
@given(
    seconds=st.floats(min_value=0, max_value=1e9, allow_nan=False),
    size=st.integers(min_value=1, max_value=1 << 40),
    frame=st.integers(min_value=16384, max_value=16_777_215),
)
def test_to_env_round_trips_any_valid_value(seconds: float, size: int, frame: int) -> None:
    config = Config(
        request_plane=RequestPlaneConfig(
            tcp=TcpConfig(request_timeout=seconds, max_message_size=size),
            http2=Http2Config(max_frame_size=frame),
        )
    )
    assert Config.from_env(config.to_env()) == config


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_REQUEST_PLANE", "http")
    monkeypatch.setenv("DYN_TCP_RPC_PORT", "4321")
    config = Config.from_env()
    assert config.request_plane.plane == "http"
    assert config.request_plane.tcp.port == 4321
    assert config.sources == {"DYN_REQUEST_PLANE", "DYN_TCP_RPC_PORT"}


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_value_counts_as_unset(text: str) -> None:
    config = Config.from_env({"DYN_REQUEST_PLANE": text, "DYN_HTTP_RPC_PORT": text})
    assert config == Config()
    assert config.sources == frozenset()


def test_values_are_stripped() -> None:
    config = Config.from_env({"DYN_TCP_RPC_PORT": " 80 ", "POD_NAME": "  w-1\n"})
    assert config.request_plane.tcp.port == 80
    assert config.discovery.pod.name == "w-1"


@pytest.mark.parametrize(("text", "plane"), [("TCP", "tcp"), ("Http", "http"), (" NaTs ", "nats")])
def test_request_plane_is_case_insensitive(text: str, plane: str) -> None:
    assert Config.from_env({"DYN_REQUEST_PLANE": text}).request_plane.plane == plane


@pytest.mark.parametrize(
    ("backend", "store"),
    [("etcd", "etcd"), ("file", "file"), ("memory", "memory"), ("mem", "memory"), ("NATS", "nats")],
)
def test_backend_shorthand_means_kv_store_and_overrides_kv_store(backend: str, store: str) -> None:
    other = "file" if store != "file" else "etcd"
    config = Config.from_env({"DYN_DISCOVERY_BACKEND": backend, "DYN_KV_STORE": other})
    assert config.discovery.backend == "kv_store"
    assert config.discovery.kv_store == store
    config = Config.from_env({"DYN_DISCOVERY_BACKEND": backend})
    assert config.sources == {"DYN_DISCOVERY_BACKEND", "DYN_KV_STORE"}


def test_kv_store_accepts_mem_alias() -> None:
    assert Config.from_env({"DYN_KV_STORE": "MEM"}).discovery.kv_store == "memory"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1024", 1024),
        ("32MB", 32 * MIB),
        ("32MiB", 32 * MIB),
        ("32 mb", 32 * MIB),
        ("1kb", 1024),
        ("1K", 1024),
        ("1.5MB", 1536 * 1024),
        ("2G", 2048 * MIB),
        ("3GiB", 3072 * MIB),
        ("512b", 512),
    ],
)
def test_size_units_are_powers_of_1024(text: str, size: int) -> None:
    config = Config.from_env({"DYN_TCP_MAX_MESSAGE_SIZE": text})
    assert config.request_plane.tcp.max_message_size == size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        *[("true", True), ("FALSE", False), ("1", True), ("0", False)],
        *[("Yes", True), ("no", False), ("on", True), ("OFF", False)],
    ],
)
def test_booleans(text: str, value: bool) -> None:
    assert Config.from_env({"DYN_LOGGING_JSONL": text}).log.json is value


@pytest.mark.parametrize(
    ("text", "endpoints"),
    [
        ("localhost:2379", ("http://localhost:2379",)),
        ("HTTPS://Etcd:2379/", ("https://etcd:2379",)),
        ("a:1,,b:2, ", ("http://a:1", "http://b:2")),
        ("[::1]:2379", ("http://[::1]:2379",)),
    ],
)
def test_etcd_endpoints_are_normalised(text: str, endpoints: tuple[str, ...]) -> None:
    assert Config.from_env({"ETCD_ENDPOINTS": text}).discovery.etcd.endpoints == endpoints


def test_nats_servers_are_normalised_and_split() -> None:
    config = Config.from_env({"NATS_SERVER": "h1:4222,tls://h2:4443,nats://h3"})
    assert config.nats.server == "nats://h1:4222,tls://h2:4443,nats://h3"
    assert config.nats.servers == ("nats://h1:4222", "tls://h2:4443", "nats://h3")
    assert NatsConfig().servers == ("nats://localhost:4222",)


@pytest.mark.parametrize(
    ("text", "level", "targets"),
    [
        ("WARN", "warning", ()),
        ("error,troupe.transports=debug", "error", (("troupe.transports", "debug"),)),
        ("troupe=trace", "info", (("troupe", "trace"),)),
        ("info, troupe::actors = Debug ,", "info", (("troupe.actors", "debug"),)),
    ],
)
def test_log_spec(text: str, level: str, targets: tuple[tuple[str, str], ...]) -> None:
    log = Config.from_env({"DYN_LOG": text}).log
    assert (log.level, log.targets) == (level, targets)


def test_system_port_minus_one_disables_and_zero_enables() -> None:
    assert not SystemConfig().enabled
    assert Config.from_env({"DYN_SYSTEM_PORT": "0"}).system.enabled
    assert Config.from_env({"DYN_SYSTEM_PORT": "-1"}).system.port == -1


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


# --- describe ----------------------------------------------------------------------------------


def test_describe_masks_secrets_everywhere() -> None:
    env = {
        "ETCD_AUTH_PASSWORD": "etcd-pw-123",
        "NATS_AUTH_PASSWORD": "nats-pw-456",
        "NATS_AUTH_TOKEN": "nats-tok-789",
        "NATS_SERVER": "nats://bob:url-pw-000@nats:4222",
    }
    config = Config.from_env(env)
    rows = {row.variable: row for row in config.describe()}
    for variable in SECRETS:
        assert rows[variable].value == "****"
        assert rows[variable].source == "env"
    assert rows["NATS_SERVER"].value == "nats://****@nats:4222"
    shown = format_table(config.describe()) + repr(config)
    for secret in ("etcd-pw-123", "nats-pw-456", "nats-tok-789", "url-pw-000"):
        assert secret not in shown
    assert config.to_env()["NATS_AUTH_TOKEN"] == "nats-tok-789"  # to_env is for child processes


# --- secrets never shown -----------------------------------------------------------------------

PASSWORD = "s3cr3t-Pw"  # appears nowhere in troupe's own texts


@pytest.mark.parametrize(
    "text",
    [
        f"http://bob:{PASSWORD}@etcd:2379",
        f"https://bob:{PASSWORD}@etcd:2379",
        f"bob:{PASSWORD}@etcd:2379",
        f"http://:{PASSWORD}@etcd:2379",
        f"http://{PASSWORD}@etcd:2379",
        f"http://etcd-0:2379, http://bob:{PASSWORD}@etcd-1:2379",
        f"http://bob:{PASSWORD}@etcd:notaport",
    ],
)
def test_credentials_in_etcd_endpoints_are_refused_without_echoing_them(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"ETCD_ENDPOINTS": text})
    err = info.value
    assert err.variable == "ETCD_ENDPOINTS"
    assert PASSWORD not in str(err)
    assert PASSWORD not in repr(err.value)
    assert "****@etcd" in str(err)
    if not text.endswith("notaport"):
        assert "ETCD_AUTH_USERNAME and ETCD_AUTH_PASSWORD" in str(err)
    with pytest.raises(ConfigError) as in_code:
        EtcdConfig(endpoints=tuple(text.split(",")))
    assert PASSWORD not in str(in_code.value)
    assert PASSWORD not in repr(in_code.value.value)


@pytest.mark.parametrize(
    "text",
    [
        f"nats://bob:{PASSWORD}@nats:99999",
        f"nats://bob:{PASSWORD}@nats:port",
        f"http://bob:{PASSWORD}@nats:4222",
        f"bob:{PASSWORD}@nats:0",
        f"nats://{PASSWORD}@nats:4222/path",
        f"nats://ok:4222,nats://bob:{PASSWORD}@nats:4222/x",
    ],
)
def test_a_refused_nats_server_url_does_not_echo_its_credentials(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"NATS_SERVER": text})
    assert info.value.variable == "NATS_SERVER"
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in repr(info.value.value)
    assert "****@nats" in str(info.value)
    with pytest.raises(ConfigError) as in_code:
        NatsConfig(server=text)
    assert PASSWORD not in str(in_code.value)


@pytest.mark.parametrize(
    "build",
    [
        lambda: EtcdConfig(password=PASSWORD.encode()),  # type: ignore[arg-type]
        lambda: NatsConfig(password=[PASSWORD]),  # type: ignore[arg-type]
        lambda: NatsConfig(token=(PASSWORD,)),  # type: ignore[arg-type]
    ],
)
def test_a_refused_secret_is_shown_masked(build: Callable[[], object]) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.value == "****"
    assert PASSWORD not in str(info.value)
    assert info.value.variable in SECRETS


def test_redact_urls_masks_user_information_only() -> None:
    assert redact_urls("nats://bob:pw@n1:4222,tls://tok@n2:4443") == (
        "nats://****@n1:4222,tls://****@n2:4443"
    )
    assert redact_urls("bob:pw@host:1") == "****@host:1"
    assert redact_urls("nats://a@b:c@host") == "nats://****@host"  # up to the last @
    assert redact_urls("nats://host:4222,http://etcd:2379") == "nats://host:4222,http://etcd:2379"


def test_troupe_config_and_its_errors_show_no_secret(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "ETCD_AUTH_USERNAME": "bob",
        "ETCD_AUTH_PASSWORD": PASSWORD,
        "NATS_SERVER": f"nats://bob:{PASSWORD}@nats:4222",
        "NATS_AUTH_TOKEN": PASSWORD,
    }

    def troupe_config(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "troupe", "config"],
            capture_output=True,
            text=True,
            env=env | extra,
            cwd=tmp_path,
            timeout=30,
            check=False,
        )

    shown = troupe_config({})
    assert shown.returncode == 0, shown.stderr
    assert "nats://****@nats:4222" in shown.stdout
    assert PASSWORD not in shown.stdout + shown.stderr
    refused = troupe_config({"ETCD_ENDPOINTS": f"http://bob:{PASSWORD}@etcd:2379"})
    assert refused.returncode != 0
    assert "ETCD_ENDPOINTS" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert PASSWORD not in refused.stdout + refused.stderr


def test_describe_shows_auto_and_unset() -> None:
    rows = {row.variable: row.value for row in Config().describe()}
    assert rows["DYN_TCP_RPC_HOST"] == "(auto)"
    assert rows["DYN_HTTP_RPC_HOST"] == "(auto)"
    assert rows["ETCD_AUTH_PASSWORD"] == "(unset)"
    assert rows["POD_NAME"] == "(unset)"
    assert rows["DYN_TCP_MAX_MESSAGE_SIZE"] == "32MiB"


def test_sources_record_only_environment_values() -> None:
    config = Config.from_env({"DYN_TCP_POOL_SIZE": "3", "DYN_LOG": "debug", "UNRELATED": "x"})
    assert config.sources == {"DYN_TCP_POOL_SIZE", "DYN_LOG"}
    sources = {row.variable: row.source for row in config.describe()}
    assert sources["DYN_TCP_POOL_SIZE"] == "env"
    assert sources["DYN_TCP_CHANNEL_BUFFER"] == "default"
    # sources are bookkeeping, not configuration: equal configs compare equal.
    assert config == Config.from_env(config.to_env())
    assert "sources" not in repr(config)


def test_format_table_groups_by_section_and_aligns_columns() -> None:
    rows = Config.from_env({"DYN_REQUEST_PLANE": "http"}).describe()
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["VARIABLE", "VALUE", "SOURCE"]
    headings = [line for line in lines if line.startswith("[")]
    assert headings == list(dict.fromkeys(f"[{row.section}]" for row in rows))
    body = [line for line in lines[1:] if not line.startswith("[")]
    assert len(body) == len(rows)
    value_column = lines[0].index("VALUE")
    source_column = lines[0].index("SOURCE")
    plane = next(line for line in body if "DYN_REQUEST_PLANE" in line)
    assert plane[value_column:].split()[0] == "http"
    assert plane[source_column:] == "env"


# --- docs --------------------------------------------------------------------------------------

_DOC_ROW = re.compile(r"^\|\s*`([A-Z0-9_]+)`\s*\|\s*([^|]*?)\s*\|")


def _doc_rows() -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = _DOC_ROW.match(line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} documented twice"
            rows[match.group(1)] = match.group(2).strip("`")
    return rows


def _doc_default(setting: Setting) -> str:
    return setting.doc_default or setting.display(setting.read(Config()))


def test_docs_list_every_setting_and_nothing_else() -> None:
    documented = set(_doc_rows())
    assert documented - set(BY_VARIABLE) == set(), "documented but not in SETTINGS"
    assert set(BY_VARIABLE) - documented == set(), "in SETTINGS but not documented"


def test_docs_defaults_match_the_code() -> None:
    rows = _doc_rows()
    mismatched = {
        s.variable: (rows[s.variable], _doc_default(s))
        for s in SETTINGS
        if rows[s.variable] != _doc_default(s)
    }
    assert mismatched == {}


def test_unknown_dyn_variables_are_collected_not_applied() -> None:
    config = Config.from_env({"DYN_REQEST_PLANE": "nats", "DYN_LOG": "debug", "HOME": "/root"})
    assert config.unknown == frozenset({"DYN_REQEST_PLANE"})
    assert config.request_plane.plane == "tcp"
    assert config == Config.from_env({"DYN_LOG": "debug"})  # not part of equality
