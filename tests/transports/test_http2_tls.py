"""TLS on the HTTP/2 plane: a worker with a certificate serves TLS (ALPN h2) and advertises
``https://``; callers verify it against ``DYN_HTTP_RPC_TLS_CA`` and, where the worker requires
one, present a client certificate. Every refusal is a :class:`TlsError` (or a
:class:`ConfigError`) naming the setting to look at, within a second, and the worker keeps
serving the callers it accepts."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import h2.config
import h2.connection
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from troupe import RequestContext, Runtime
from troupe.config import HttpConfig, RequestPlaneConfig
from troupe.discovery import MemoryKvServer
from troupe.errors import ConfigError, TlsError
from troupe.testing._tls import TlsFiles, issue_client_cert, make_tls_files
from troupe.testing.conformance import TRANSPORT_CHECKS, Check, TransportUnderTest
from troupe.transports import NetworkManager, TransportSettings
from troupe.transports.http2 import DEFAULT_MAX_MESSAGE_SIZE, Http2Client, Http2Server
from troupe.transports.http2 import _client as http2_client
from troupe.transports.http2 import _tls as http2_tls

from .conftest import Plane

# A refusal must come at once: far below the connect and request timeouts (3 s, 10 s).
REFUSED_WITHIN = 1.0


@dataclasses.dataclass(frozen=True)
class Pki:
    """The CA the worker trusts, another CA, and an expired client certificate."""

    ours: TlsFiles
    other: TlsFiles
    expired: tuple[str, str]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("tls")
    ours = make_tls_files(base / "ours")
    return Pki(
        ours=ours,
        other=make_tls_files(base / "other"),
        expired=issue_client_cert(ours, base / "ours", "expired", expired=True),
    )


def worker_config(pki: Pki, *, client_auth: bool = True) -> HttpConfig:
    files = pki.ours
    return HttpConfig(
        host="127.0.0.1",
        port=0,
        tls_cert=files.server_cert,
        tls_key=files.server_key,
        tls_ca=files.ca,
        tls_client_auth=client_auth,
    )


def caller_config(pki: Pki) -> HttpConfig:
    files = pki.ours
    return HttpConfig(
        tls_ca=files.ca, tls_client_cert=files.client_cert, tls_client_key=files.client_key
    )


async def count(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    for i in range(int(payload)):
        yield b"%d" % i


@pytest.fixture
async def worker(pki: Pki) -> AsyncIterator[Http2Server]:
    server = Http2Server(worker_config(pki))
    server.add_endpoint("count", count)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def call(config: HttpConfig, address: str, n: int = 3) -> list[bytes]:
    client = Http2Client(config)
    try:
        stream = await client.request(address, "count", b"%d" % n)
        return await stream.collect()
    finally:
        await client.close()


async def refused(config: HttpConfig, address: str) -> TlsError:
    """The error a call with ``config`` gets, checked to come within REFUSED_WITHIN."""
    start = time.monotonic()
    with pytest.raises(TlsError) as caught:
        await call(config, address)
    assert time.monotonic() - start < REFUSED_WITHIN
    assert caught.value.address == address
    return caught.value


# --- the worker serves TLS and says so ------------------------------------------------------


async def test_a_worker_with_a_certificate_advertises_https_and_streams_over_tls(
    pki: Pki, worker: Http2Server
) -> None:
    parts = urlsplit(worker.address)
    assert (parts.scheme, parts.hostname, parts.path) == ("https", "127.0.0.1", "/v1/rpc")
    assert await call(caller_config(pki), worker.address, 50) == [b"%d" % i for i in range(50)]


async def test_the_worker_negotiates_h2_and_never_speaks_plain_http2(
    pki: Pki, worker: Http2Server
) -> None:
    port = urlsplit(worker.address).port
    context = ssl.create_default_context(cafile=pki.ours.ca)
    context.load_cert_chain(pki.ours.client_cert, pki.ours.client_key)
    context.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() == "h2"
        assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        writer.close()
    # h2c (prior knowledge, no TLS) on the same port gets no HTTP/2 SETTINGS back.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        plain = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        plain.initiate_connection()
        writer.write(plain.data_to_send())
        try:
            answer = await asyncio.wait_for(reader.read(65536), REFUSED_WITHIN)
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"\x00")  # not an HTTP/2 frame (a TLS alert or nothing)
    finally:
        writer.close()


async def test_a_worker_without_client_auth_takes_callers_without_a_certificate(
    pki: Pki,
) -> None:
    server = Http2Server(worker_config(pki, client_auth=False))
    server.add_endpoint("count", count)
    await server.start()
    try:
        assert await call(HttpConfig(tls_ca=pki.ours.ca), server.address) == [b"0", b"1", b"2"]
    finally:
        await server.close()


# --- callers the worker refuses, at once and by name ---------------------------------------


async def test_a_caller_without_a_ca_is_refused_before_dialling(worker: Http2Server) -> None:
    error = await refused(HttpConfig(), worker.address)
    assert error.setting == "DYN_HTTP_RPC_TLS_CA"
    assert "DYN_HTTP_RPC_TLS_CA" in str(error)


def _tls12_client_context(http: HttpConfig) -> ssl.SSLContext:
    context = http2_tls.client_context(http)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def _without_cert(pki: Pki) -> HttpConfig:
    return HttpConfig(tls_ca=pki.ours.ca)


def _other_ca_cert(pki: Pki) -> HttpConfig:
    other = pki.other
    return HttpConfig(
        tls_ca=pki.ours.ca, tls_client_cert=other.client_cert, tls_client_key=other.client_key
    )


def _expired_cert(pki: Pki) -> HttpConfig:
    cert, key = pki.expired
    return HttpConfig(tls_ca=pki.ours.ca, tls_client_cert=cert, tls_client_key=key)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_without_cert, "requires a client certificate: set DYN_HTTP_RPC_TLS_CLIENT_CERT"),
        (_other_ca_cert, "refused the client certificate DYN_HTTP_RPC_TLS_CLIENT_CERT"),
        (_expired_cert, "refused the client certificate DYN_HTTP_RPC_TLS_CLIENT_CERT"),
    ],
    ids=["no-client-certificate", "client-certificate-of-another-ca", "expired-certificate"],
)
@pytest.mark.parametrize("version", ["tls1.3", "tls1.2"])
async def test_a_caller_the_worker_does_not_accept_is_refused_at_once(
    pki: Pki,
    worker: Http2Server,
    make: object,
    says: str,
    version: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert callable(make)
    if version == "tls1.2":  # the worker refuses during the handshake, not after it
        monkeypatch.setattr(http2_client, "client_context", _tls12_client_context)
    error = await refused(make(pki), worker.address)
    assert error.setting == "DYN_HTTP_RPC_TLS_CLIENT_CERT"
    assert says in str(error)
    assert "\n" not in str(error)
    # The worker keeps serving the callers it accepts.
    assert await call(caller_config(pki), worker.address) == [b"0", b"1", b"2"]


async def test_a_worker_whose_certificate_another_ca_signed_is_refused_by_the_caller(
    pki: Pki,
) -> None:
    other = pki.other
    server = Http2Server(
        HttpConfig(host="127.0.0.1", port=0, tls_cert=other.server_cert, tls_key=other.server_key)
    )
    server.add_endpoint("count", count)
    await server.start()
    try:
        error = await refused(caller_config(pki), server.address)
        assert error.setting == "DYN_HTTP_RPC_TLS_CA"
        assert "certificate was refused" in str(error)
    finally:
        await server.close()


async def test_a_worker_whose_certificate_expired_is_refused_by_the_caller(
    pki: Pki, tmp_path: Path
) -> None:
    cert, key = _expired_server_cert(pki.ours, tmp_path)
    server = Http2Server(HttpConfig(host="127.0.0.1", port=0, tls_cert=cert, tls_key=key))
    server.add_endpoint("count", count)
    await server.start()
    try:
        error = await refused(caller_config(pki), server.address)
        assert error.setting == "DYN_HTTP_RPC_TLS_CA"
        assert "expired" in str(error)
    finally:
        await server.close()


def _expired_server_cert(files: TlsFiles, directory: Path) -> tuple[str, str]:
    """A server certificate for 127.0.0.1 signed by ``files``' CA that expired an hour ago."""
    ca_cert = x509.load_pem_x509_certificate(Path(files.ca).read_bytes())
    ca_key = serialization.load_pem_private_key(Path(files.ca_key).read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired server")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now - datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "expired-server.crt", directory / "expired-server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "variable"),
    [
        ({"tls_cert": "cert"}, "DYN_HTTP_RPC_TLS_KEY"),
        ({"tls_key": "key"}, "DYN_HTTP_RPC_TLS_CERT"),
        ({"tls_client_auth": True}, "DYN_HTTP_RPC_TLS_CERT"),
        ({"tls_cert": "cert", "tls_key": "key", "tls_client_auth": True}, "DYN_HTTP_RPC_TLS_CA"),
    ],
    ids=["cert-without-key", "key-without-cert", "client-auth-without-tls", "client-auth-no-ca"],
)
async def test_an_incomplete_worker_setting_fails_the_start_naming_the_missing_one(
    pki: Pki, fields: dict[str, object], variable: str
) -> None:
    files = {"cert": pki.ours.server_cert, "key": pki.ours.server_key}
    given = {name: files.get(value, value) if isinstance(value, str) else value
             for name, value in fields.items()}  # fmt: skip
    server = Http2Server(HttpConfig(host="127.0.0.1", port=0, **given))  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as caught:
        await server.start()
    assert caught.value.variable == variable
    await server.close()


async def test_a_client_certificate_without_its_key_is_a_config_error(
    pki: Pki, worker: Http2Server
) -> None:
    config = HttpConfig(tls_ca=pki.ours.ca, tls_client_cert=pki.ours.client_cert)
    with pytest.raises(ConfigError) as caught:
        await call(config, worker.address)
    assert caught.value.variable == "DYN_HTTP_RPC_TLS_CLIENT_KEY"


async def test_a_missing_or_wrong_file_fails_the_start_naming_its_variable(
    pki: Pki, tmp_path: Path
) -> None:
    missing = str(tmp_path / "nope.pem")
    files = pki.ours
    cases = {
        "DYN_HTTP_RPC_TLS_CERT": HttpConfig(tls_cert=missing, tls_key=files.server_key),
        "DYN_HTTP_RPC_TLS_KEY": HttpConfig(tls_cert=files.server_cert, tls_key=missing),
    }
    for variable, config in cases.items():
        server = Http2Server(dataclasses.replace(config, host="127.0.0.1", port=0))
        with pytest.raises(ConfigError) as caught:
            await server.start()
        assert caught.value.variable == variable
        await server.close()
    # A key that is not the certificate's.
    server = Http2Server(
        HttpConfig(host="127.0.0.1", port=0, tls_cert=files.server_cert, tls_key=files.client_key)
    )
    with pytest.raises(ConfigError) as caught:
        await server.start()
    assert caught.value.variable == "DYN_HTTP_RPC_TLS_CERT"
    await server.close()


async def test_a_caller_with_an_unreadable_ca_gets_a_config_error(
    worker: Http2Server, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as caught:
        await call(HttpConfig(tls_ca=str(tmp_path / "nope.pem")), worker.address)
    assert caught.value.variable == "DYN_HTTP_RPC_TLS_CA"


async def test_the_network_manager_sends_https_addresses_to_the_http2_client(
    pki: Pki, worker: Http2Server
) -> None:
    manager = NetworkManager(RequestPlaneConfig(plane="http", http=caller_config(pki)))
    try:
        client = manager.client_for(worker.address)
        assert isinstance(client, Http2Client)
        stream = await client.request(worker.address, "count", b"2")
        assert await stream.collect() == [b"0", b"1"]
    finally:
        await manager.close()


# --- end to end through a runtime ---------------------------------------------------------


def _environ(pki: Pki, **tls: str) -> dict[str, str]:
    return {
        "DYN_KV_STORE": "memory",
        "DYN_REQUEST_PLANE": "http",
        "DYN_HTTP_RPC_HOST": "127.0.0.1",
        "DYN_HTTP_RPC_PORT": "0",
        "DYN_SYSTEM_PORT": "-1",
        **tls,
    }


@pytest.fixture
def runtimes(pki: Pki) -> Iterator[tuple[Runtime, Runtime, Runtime]]:
    """A worker requiring client certificates, a caller with one, a caller without one."""
    files = pki.ours
    memory = MemoryKvServer()
    worker = Runtime.from_env(
        _environ(
            pki,
            DYN_HTTP_RPC_TLS_CERT=files.server_cert,
            DYN_HTTP_RPC_TLS_KEY=files.server_key,
            DYN_HTTP_RPC_TLS_CA=files.ca,
            DYN_HTTP_RPC_TLS_CLIENT_AUTH="true",
        ),
        handle_signals=False,
        memory_server=memory,
    )
    trusted = Runtime.from_env(
        _environ(
            pki,
            DYN_HTTP_RPC_TLS_CA=files.ca,
            DYN_HTTP_RPC_TLS_CLIENT_CERT=files.client_cert,
            DYN_HTTP_RPC_TLS_CLIENT_KEY=files.client_key,
        ),
        handle_signals=False,
        memory_server=memory,
    )
    stranger = Runtime.from_env(
        _environ(pki, DYN_HTTP_RPC_TLS_CA=files.ca), handle_signals=False, memory_server=memory
    )
    with worker, trusted, stranger:
        yield worker, trusted, stranger


def test_a_runtime_serves_over_tls_and_routers_stream_from_it(
    runtimes: tuple[Runtime, Runtime, Runtime],
) -> None:
    worker, trusted, stranger = runtimes

    def words(request: dict[str, str], ctx: RequestContext) -> Iterator[dict[str, str]]:
        for word in request["text"].split():
            yield {"word": word}

    worker.serve("demo.secure.words", words)
    router = trusted.router("demo.secure.words")
    router.wait_for_instances_sync(timeout=5)
    (instance,) = router.snapshot.instances
    assert instance.record.transport["http"].startswith("https://127.0.0.1:")
    chunks = router.generate_sync({"text": "over tls end to end"})
    assert [chunk["word"] for chunk in chunks] == ["over", "tls", "end", "to", "end"]

    refused_router = stranger.router("demo.secure.words")
    refused_router.wait_for_instances_sync(timeout=5)
    start = time.monotonic()
    with pytest.raises(TlsError, match="DYN_HTTP_RPC_TLS_CLIENT_CERT"):
        list(refused_router.generate_sync({"text": "no certificate"}))
    assert time.monotonic() - start < REFUSED_WITHIN
    # The worker still serves the caller it accepts.
    chunks = router.generate_sync({"text": "still here"})
    assert [chunk["word"] for chunk in chunks] == ["still", "here"]


# --- the transport conformance kit, over TLS ----------------------------------------------

TLS_CHECKS = [
    pytest.param(check, id=check.name)
    for check in TRANSPORT_CHECKS
    if "worker" not in check.needs  # a worker in another process: plain http covers it
]


@pytest.fixture
async def tls_plane(pki: Pki) -> AsyncIterator[Plane]:
    """The http plane with mutual TLS: servers need client certificates, clients present one."""
    files = pki.ours
    http = dataclasses.replace(
        worker_config(pki), tls_client_cert=files.client_cert, tls_client_key=files.client_key
    )
    config = RequestPlaneConfig(plane="http", http=http)
    plane = Plane(
        "http",
        TransportSettings(config),
        "DYN_HTTP_RPC_PORT",
        request_limit=DEFAULT_MAX_MESSAGE_SIZE,
        reply_limit=DEFAULT_MAX_MESSAGE_SIZE,
        remote=False,
    )
    try:
        yield plane
    finally:
        await plane.aclose()


@pytest.mark.parametrize("check", TLS_CHECKS)
async def test_transport_conformance_over_mutual_tls(
    tls_plane: Plane, check: Check[TransportUnderTest]
) -> None:
    subject = tls_plane.under_test()
    assert check.applies_to(subject), f"TLS plane lacks {check.missing(subject)}"
    server = await tls_plane.server()
    assert server.address.startswith("https://")  # the checks below run over TLS
    await check(subject)
