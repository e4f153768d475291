"""Tests of troupe.config: the settings table, seed defaults and environment overrides, and how
values are read. Errors are in ``test_config_errors.py``; describe, secrets and the docs in
``test_config_describe.py``."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe.config import (
    SETTINGS,
    Config,
    Http2Config,
    NatsConfig,
    RequestPlaneConfig,
    SystemConfig,
    TcpConfig,
)

MIB = 1024 * 1024
BY_VARIABLE = {s.variable: s for s in SETTINGS}


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
    "DYN_HTTP_RPC_TLS_CERT": None,
    "DYN_HTTP_RPC_TLS_KEY": None,
    "DYN_HTTP_RPC_TLS_CA": None,
    "DYN_HTTP_RPC_TLS_CLIENT_AUTH": False,
    "DYN_HTTP_RPC_TLS_CLIENT_CERT": None,
    "DYN_HTTP_RPC_TLS_CLIENT_KEY": None,
    "NATS_SERVER": "nats://localhost:4222",
    "NATS_AUTH_USERNAME": None,
    "NATS_AUTH_PASSWORD": None,
    "NATS_AUTH_TOKEN": None,
    "NATS_AUTH_CREDENTIALS_FILE": None,
    "NATS_AUTH_NKEY": None,
    "NATS_AUTH_NKEY_SEED_FILE": None,
    "NATS_TLS_CA_CERT_PATH": None,
    "NATS_TLS_CLIENT_CERT_PATH": None,
    "NATS_TLS_CLIENT_KEY_PATH": None,
    "DYN_NATS_INBOX_PREFIX": "_INBOX",
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
    "DYN_HTTP_HOST": "127.0.0.1",  # NVIDIA Dynamo binds 0.0.0.0; troupe keeps loopback
    "DYN_HTTP_PORT": 8000,
    "DYN_TLS_CERT_PATH": None,
    "DYN_TLS_KEY_PATH": None,
    "DYN_TLS_CLIENT_CA_CERT_PATH": None,
    "DYN_HTTP_API_KEY": None,
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
    "DYN_HTTP_RPC_TLS_CERT": ("/etc/w.crt", "/etc/w.crt"),
    "DYN_HTTP_RPC_TLS_KEY": ("/etc/w.key", "/etc/w.key"),
    "DYN_HTTP_RPC_TLS_CA": ("/etc/ca.crt", "/etc/ca.crt"),
    "DYN_HTTP_RPC_TLS_CLIENT_AUTH": ("yes", True),
    "DYN_HTTP_RPC_TLS_CLIENT_CERT": ("/etc/c.crt", "/etc/c.crt"),
    "DYN_HTTP_RPC_TLS_CLIENT_KEY": ("/etc/c.key", "/etc/c.key"),
    "NATS_SERVER": ("n1:4222, tls://n2:4223", "nats://n1:4222,tls://n2:4223"),
    "NATS_AUTH_USERNAME": ("alice", "alice"),
    "NATS_AUTH_PASSWORD": ("s3cret", "s3cret"),
    "NATS_AUTH_TOKEN": ("t0ken", "t0ken"),
    "NATS_AUTH_CREDENTIALS_FILE": ("/etc/nats.creds", "/etc/nats.creds"),
    "NATS_AUTH_NKEY": ("SUAM-not-a-real-seed", "SUAM-not-a-real-seed"),
    "NATS_AUTH_NKEY_SEED_FILE": ("/etc/nats.nk", "/etc/nats.nk"),
    "NATS_TLS_CA_CERT_PATH": ("/etc/nats-ca.crt", "/etc/nats-ca.crt"),
    "NATS_TLS_CLIENT_CERT_PATH": ("/etc/nats-c.crt", "/etc/nats-c.crt"),
    "NATS_TLS_CLIENT_KEY_PATH": ("/etc/nats-c.key", "/etc/nats-c.key"),
    "DYN_NATS_INBOX_PREFIX": ("_INBOX.alice", "_INBOX.alice"),
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
    "DYN_HTTP_HOST": ("0.0.0.0", "0.0.0.0"),
    "DYN_HTTP_PORT": ("8080", 8080),
    "DYN_TLS_CERT_PATH": ("/etc/fe.crt", "/etc/fe.crt"),
    "DYN_TLS_KEY_PATH": ("/etc/fe.key", "/etc/fe.key"),
    "DYN_TLS_CLIENT_CA_CERT_PATH": ("/etc/clients-ca.crt", "/etc/clients-ca.crt"),
    "DYN_HTTP_API_KEY": ("sk-abc", "sk-abc"),
    "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": ("30", 30.0),
    "DYN_WORKER_MAX_INFLIGHT": ("64", 64),
    "DYN_WORKER_MAX_INFLIGHT_PER_CALLER": ("0", 0),
}

SECRETS = (
    "ETCD_AUTH_PASSWORD",
    "NATS_AUTH_PASSWORD",
    "NATS_AUTH_TOKEN",
    "NATS_AUTH_NKEY",
    "DYN_HTTP_API_KEY",
)


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
