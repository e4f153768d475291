"""The frontend's HTTPS (with optional client certificates), its API key and its default bind
address: what a client sees, and the one-line errors of a bad configuration."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from troupe import Config
from troupe._cli_frontend import add_arguments
from troupe.config import FrontendConfig
from troupe.discovery import MemoryKvServer
from troupe.errors import ConfigError
from troupe.frontend import Frontend, FrontendSettings, FrontendTls
from troupe.testing import TlsFiles, make_tls_files
from troupe.testing._tls import issue_client_cert

from ._http import CHAT, FAST, HELLO, assert_openai_error
from .conftest import Workers, running_frontend, wait_for_model

KEY = "sk-troupe-test-key"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA the frontend does not trust, with its own server and client certificates."""
    return make_tls_files(tmp_path_factory.mktemp("other-tls"))


def client_context(files: TlsFiles, *, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    """A client context trusting ``files``' CA, presenting ``cert`` (certificate, key) if any."""
    context = ssl.create_default_context(cafile=files.ca)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def https(files: TlsFiles, *, client_ca: bool = False) -> FrontendTls:
    return FrontendTls(files.server_cert, files.server_key, files.ca if client_ca else None)


@pytest.fixture
async def secured(
    kv: MemoryKvServer, settings: FrontendSettings, workers: Workers, tls_files: TlsFiles
) -> AsyncIterator[Frontend]:
    """HTTPS and an API key, serving the mock model."""
    async with running_frontend(kv, settings, tls=https(tls_files), api_key=KEY) as fe:
        await workers.serve("demo.mocker.generate", FAST, model="mock")
        await wait_for_model(fe, "mock")
        yield fe


# --- HTTPS ---------------------------------------------------------------------------------------


async def test_https_url_and_a_generation_over_it(secured: Frontend, tls_files: TlsFiles) -> None:
    assert secured.url == secured.bound_url == f"https://127.0.0.1:{secured.port}"
    assert secured.listening == secured.url
    auth = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(
        base_url=secured.url, verify=client_context(tls_files), headers=auth, timeout=10
    ) as http:
        response = await http.post(CHAT, json={"model": "mock", "messages": HELLO})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]


async def test_https_speaks_http2_when_the_client_offers_it(
    secured: Frontend, tls_files: TlsFiles
) -> None:
    async with httpx.AsyncClient(
        base_url=secured.url, verify=client_context(tls_files), http2=True, timeout=10
    ) as http:
        response = await http.get("/live")
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"


async def test_the_openai_client_works_unchanged_over_https_with_the_key(
    secured: Frontend, tls_files: TlsFiles
) -> None:
    async with httpx.AsyncClient(verify=client_context(tls_files)) as transport:
        client = openai.AsyncOpenAI(
            base_url=f"{secured.url}/v1", api_key=KEY, http_client=transport, max_retries=0
        )
        stream = await client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=4
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text
        wrong = openai.AsyncOpenAI(
            base_url=f"{secured.url}/v1", api_key="sk-wrong", http_client=transport, max_retries=0
        )
        with pytest.raises(openai.AuthenticationError) as caught:
            await wrong.models.list()
        assert caught.value.code == "invalid_api_key"


async def test_a_client_that_does_not_trust_the_ca_or_speaks_plain_http_gets_nothing(
    secured: Frontend, tls_files: TlsFiles, other_ca: TlsFiles
) -> None:
    async with httpx.AsyncClient(verify=client_context(other_ca), timeout=5) as http:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await http.get(f"{secured.url}/live")
    async with httpx.AsyncClient(timeout=5) as http:
        with pytest.raises(httpx.TransportError):
            await http.get(f"http://127.0.0.1:{secured.port}/live")
    async with httpx.AsyncClient(verify=client_context(tls_files), timeout=5) as http:
        assert (await http.get(f"{secured.url}/live")).status_code == 200  # still serving


# --- client certificates -------------------------------------------------------------------------


async def test_client_certificates_are_required_when_a_client_ca_is_set(
    kv: MemoryKvServer, settings: FrontendSettings, tls_files: TlsFiles, other_ca: TlsFiles
) -> None:
    async with running_frontend(kv, settings, tls=https(tls_files, client_ca=True)) as fe:
        refused = [
            client_context(tls_files),  # no certificate
            client_context(tls_files, cert=(other_ca.client_cert, other_ca.client_key)),
        ]
        for context in refused:
            async with httpx.AsyncClient(verify=context, timeout=5) as http:
                with pytest.raises(httpx.TransportError):
                    await http.get(f"{fe.url}/live")
        mine = client_context(tls_files, cert=(tls_files.client_cert, tls_files.client_key))
        async with httpx.AsyncClient(verify=mine, timeout=5) as http:
            assert (await http.get(f"{fe.url}/live")).status_code == 200


async def test_an_expired_client_certificate_is_refused(
    kv: MemoryKvServer, settings: FrontendSettings, tls_files: TlsFiles, tmp_path: Path
) -> None:
    expired = issue_client_cert(tls_files, tmp_path, "expired", expired=True)
    async with (
        running_frontend(kv, settings, tls=https(tls_files, client_ca=True)) as fe,
        httpx.AsyncClient(verify=client_context(tls_files, cert=expired)) as http,
    ):
        with pytest.raises(httpx.TransportError):
            await http.get(f"{fe.url}/live")


# --- bad TLS settings ----------------------------------------------------------------------------


def test_a_certificate_without_its_key_names_the_missing_option() -> None:
    with pytest.raises(ConfigError) as caught:
        FrontendTls.from_paths("/x/server.crt", None, None)
    assert caught.value.variable == "--tls-key-path"
    assert "DYN_TLS_KEY_PATH" in str(caught.value)
    with pytest.raises(ConfigError, match="--tls-cert-path"):
        FrontendTls.from_paths(None, "/x/server.key", None)
    with pytest.raises(ConfigError, match="--tls-client-ca-cert-path"):
        FrontendTls.from_paths(None, None, "/x/ca.crt")
    assert FrontendTls.from_paths(None, None, None) is None


async def test_bad_tls_files_fail_the_start_with_one_line_naming_the_option(
    kv: MemoryKvServer,
    settings: FrontendSettings,
    tls_files: TlsFiles,
    other_ca: TlsFiles,
    tmp_path: Path,
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (FrontendTls(str(tmp_path / "missing.crt"), tls_files.server_key), "--tls-cert-path"),
        (FrontendTls(tls_files.server_cert, other_ca.server_key), "--tls-cert-path"),
        (FrontendTls(str(garbage), tls_files.server_key), "--tls-cert-path"),
        (FrontendTls(tls_files.server_cert, str(tmp_path / "none.key")), "--tls-key-path"),
        (
            FrontendTls(tls_files.server_cert, tls_files.server_key, str(garbage)),
            "--tls-client-ca-cert-path",
        ),
    ]
    for tls, option in cases:
        with pytest.raises(ConfigError) as caught:
            async with running_frontend(kv, settings, tls=tls):
                pass
        assert caught.value.variable == option, caught.value
        assert "\n" not in str(caught.value)


# --- API key -------------------------------------------------------------------------------------


async def test_without_the_key_every_route_but_health_and_live_answers_401(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    async with (
        running_frontend(kv, settings, api_key=KEY) as fe,
        httpx.AsyncClient(base_url=fe.url, timeout=5) as http,
    ):
        for path in ("/health", "/live"):
            assert (await http.get(path)).status_code == 200
        for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": KEY}):
            for path in ("/metrics", "/v1/models", "/v1/models/mock", "/nowhere"):
                response = await http.get(path, headers=headers)
                error = assert_openai_error(response, 401, code="invalid_api_key")
                assert error["type"] == "invalid_request_error"
                assert response.headers["www-authenticate"] == "Bearer"
            response = await http.post(CHAT, json={"model": "mock", "messages": HELLO})
            assert_openai_error(response, 401, code="invalid_api_key")
            assert response.headers["connection"] == "close"  # its body was not read
        good = {"authorization": f"bearer {KEY}"}
        assert (await http.get("/v1/models", headers=good)).status_code == 200
        assert (await http.get("/metrics", headers=good)).status_code == 200


async def test_a_refused_http2_request_leaves_its_connection_serving(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    async with (
        running_frontend(kv, settings, api_key=KEY) as fe,
        httpx.AsyncClient(base_url=fe.url, http1=False, http2=True, timeout=5) as http,
    ):
        body = {"model": "mock", "messages": HELLO, "pad": "x" * 200_000}
        refused = await http.post(CHAT, json=body)
        assert refused.http_version == "HTTP/2"
        assert_openai_error(refused, 401, code="invalid_api_key")
        ok = await http.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200


def test_the_key_is_a_masked_secret_and_never_in_a_repr() -> None:
    config = Config.from_env({"DYN_HTTP_API_KEY": KEY})
    assert config.frontend.api_key == KEY
    rows = {row.variable: row for row in config.describe()}
    assert rows["DYN_HTTP_API_KEY"].value == "****"
    assert KEY not in repr(config)
    assert KEY not in repr(FrontendSettings(api_key=KEY))
    with pytest.raises(ConfigError) as caught:
        FrontendSettings(api_key="")
    assert caught.value.variable == "--api-key"
    with pytest.raises(ConfigError) as caught:
        FrontendConfig(api_key=[KEY])  # type: ignore[arg-type]
    assert caught.value.variable == "DYN_HTTP_API_KEY"
    assert KEY not in str(caught.value)


# --- bind address --------------------------------------------------------------------------------


def test_the_default_bind_address_is_loopback() -> None:
    assert FrontendConfig().host == "127.0.0.1"
    assert FrontendSettings().host == "127.0.0.1"
    assert Config.from_env({}).frontend.host == "127.0.0.1"
    parser = argparse.ArgumentParser(prog="troupe frontend")
    add_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    assert "else 127.0.0.1: this host only" in help_text


async def test_the_address_printed_is_the_one_bound(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    async with running_frontend(kv, dataclasses.replace(settings, host="127.0.0.1")) as fe:
        assert fe.listening == fe.bound_url == f"http://127.0.0.1:{fe.port}"


# --- the command ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_troupe_frontend_serves_https_with_a_key_from_the_environment(
    env: dict[str, str], tls_files: TlsFiles
) -> None:
    env = env | {
        "DYN_TLS_CERT_PATH": tls_files.server_cert,
        "DYN_TLS_KEY_PATH": tls_files.server_key,
        "DYN_HTTP_API_KEY": KEY,
        "DYN_HTTP_PORT": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "troupe", "frontend"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("frontend listening on https://127.0.0.1:"), line
        url = line.split()[-1]
        context = client_context(tls_files)
        assert httpx.get(f"{url}/live", verify=context).status_code == 200
        assert httpx.get(f"{url}/v1/models", verify=context).status_code == 401
        auth = {"authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{url}/v1/models", verify=context, headers=auth).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_troupe_frontend_refuses_a_certificate_without_its_key(
    env: dict[str, str], tls_files: TlsFiles
) -> None:
    env = env | {"DYN_HTTP_PORT": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "troupe", "frontend", "--tls-cert-path", tls_files.server_cert],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "--tls-key-path" in result.stderr
    assert "Traceback" not in result.stderr
