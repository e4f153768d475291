"""``troupe frontend`` and ``troupe worker ... troupe.demo.mocker:generate --model`` as real
processes on file discovery; the demo that ``make demo`` runs."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from troupe.demo.mocker import VOCABULARY
from troupe.testing import eventually

ROOT = Path(__file__).resolve().parent.parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    return env | {"DYN_LEASE_TTL": "2"}


def troupe(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "troupe", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def test_frontend_and_mock_worker_processes(
    env: dict[str, str], processes: list[subprocess.Popen[str]]
) -> None:
    worker = troupe(
        env, "worker", "demo.mocker.generate", "troupe.demo.mocker:generate", "--model", "m"
    )
    processes.append(worker)
    frontend = troupe(env, "frontend", "--host", "127.0.0.1", "--port", "0")
    processes.append(frontend)
    assert frontend.stdout is not None
    line = frontend.stdout.readline()
    assert line.startswith("frontend listening on http://127.0.0.1:"), line
    url = line.split()[-1]

    def listed() -> bool:
        return "m" in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]

    eventually(listed, timeout=20, what="model m listed")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], stream=True, max_tokens=4
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == " ".join(VOCABULARY[:4])

    frontend.send_signal(signal.SIGTERM)
    assert frontend.wait(15) == 0
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 0


def test_bad_router_mode_is_one_line(env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "troupe", "frontend", "--router-mode", "fastest"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--router-mode" in result.stderr
