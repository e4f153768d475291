"""Tests of troupe.config: describing a config (secrets masked, sources, the table), secrets
never shown in errors, the configuration docs kept true, and unknown variables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from troupe.config import (
    SETTINGS,
    Config,
    EtcdConfig,
    NatsConfig,
    Setting,
    format_table,
    redact_urls,
)
from troupe.errors import ConfigError

BY_VARIABLE = {s.variable: s for s in SETTINGS}
DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
SECRETS = ("ETCD_AUTH_PASSWORD", "NATS_AUTH_PASSWORD", "NATS_AUTH_TOKEN")


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
