"""The troupe command: --version, config, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from troupe import __version__
from troupe.cli import main


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = dict(os.environ)  # already scrubbed of troupe variables by conftest._scrub_env
    return subprocess.run(
        [sys.executable, "-m", "troupe", *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=30,
        check=False,
    )


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"troupe {__version__}"


def test_config_prints_a_table_with_masked_secrets() -> None:
    result = run(
        "config",
        env={
            "ETCD_AUTH_PASSWORD": "hunter2",
            "DYN_REQUEST_PLANE": "HTTP",
            "NATS_AUTH_TOKEN": "t0k",
        },
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "hunter2" not in out
    assert "t0k" not in out
    assert "DYN_REQUEST_PLANE" in out
    line = next(ln for ln in out.splitlines() if "DYN_REQUEST_PLANE" in ln)
    assert "http" in line
    assert "env" in line
    assert "ETCD_ENDPOINTS" in out
    assert "http://localhost:2379" in out


@pytest.mark.parametrize(
    ("variable", "value", "mentions"),
    [
        ("DYN_REQUEST_PLANE", "carrier-pigeon", ["tcp", "http", "nats"]),
        ("DYN_DISCOVERY_BACKEND", "zookeeper", ["kv_store", "kubernetes"]),
        ("DYN_TCP_RPC_PORT", "eighty", ["DYN_TCP_RPC_PORT"]),
        ("DYN_LEASE_TTL", "-3", ["DYN_LEASE_TTL"]),
    ],
)
def test_bad_configuration_is_one_clear_line_not_a_traceback(
    variable: str, value: str, mentions: list[str]
) -> None:
    result = run("config", env={variable: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert variable in lines[0]
    assert value in lines[0]
    for word in mentions:
        assert word in lines[0]


def test_main_without_a_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "config" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "env", "mentions"),
    [
        (["--port", "70000"], {}, "--port"),
        (["--overload-tries", "0"], {}, "--overload-tries"),
        (["--max-body-size", "0"], {}, "--max-body-size"),
        ([], {"DYN_HTTP_PORT": "http"}, "DYN_HTTP_PORT"),
    ],
)
def test_frontend_rejects_a_bad_port_in_one_line(
    args: list[str], env: dict[str, str], mentions: str
) -> None:
    result = run("frontend", *args, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert mentions in result.stderr.strip().splitlines()[0]


def test_config_names_unknown_dyn_variables() -> None:
    result = run("config", env={"DYN_REQEST_PLANE": "nats"})
    assert result.returncode == 0, result.stderr
    assert "DYN_REQEST_PLANE" in result.stderr
    assert "DYN_REQEST_PLANE" not in result.stdout
