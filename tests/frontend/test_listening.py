"""The frontend says where it really listens: the address bound and the OS's port; and its
migration default is the documented one (0: off)."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import httpx
import pytest

from troupe._cli_frontend import add_arguments
from troupe.discovery import MemoryKvServer
from troupe.frontend import FrontendSettings

from .conftest import running_frontend


async def test_bound_to_every_interface_it_names_that_and_a_url_that_reaches_it(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    async with running_frontend(kv, settings, host="0.0.0.0", port=0) as fe:
        assert fe.port > 0
        assert fe.bound_url == f"http://0.0.0.0:{fe.port}"
        assert fe.url == f"http://127.0.0.1:{fe.port}"
        assert fe.listening == (
            f"http://0.0.0.0:{fe.port} (every interface); from this host: {fe.url}"
        )
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.get(f"{fe.url}/live")).status_code == 200


async def test_bound_to_one_address_it_names_that_one(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    async with running_frontend(kv, settings, host="127.0.0.1", port=0) as fe:
        assert fe.port > 0
        assert fe.listening == fe.url == fe.bound_url == f"http://127.0.0.1:{fe.port}"


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this machine")
async def test_bound_to_every_ipv6_interface_it_gives_the_ipv6_loopback(
    kv: MemoryKvServer, settings: FrontendSettings
) -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::", 0))
        probe.close()
    except OSError:
        pytest.skip("IPv6 cannot be bound here")
    async with running_frontend(kv, settings, host="::", port=0) as fe:
        assert fe.bound_url == f"http://[::]:{fe.port}"
        assert fe.url == f"http://[::1]:{fe.port}"


def test_the_help_states_the_migration_default() -> None:
    parser = argparse.ArgumentParser(prog="troupe frontend")
    add_arguments(parser)
    assert parser.parse_args([]).migration_limit == 0
    text = " ".join(parser.format_help().split())
    assert "--migration-limit N resume a generation on another worker" in text
    assert "(default 0: off" in text


def test_the_docs_state_the_migration_default_where_the_demo_shows_migration() -> None:
    root = Path(__file__).resolve().parent.parent.parent
    readme = " ".join((root / "README.md").read_text().split())
    demo = readme.split("`make demo` starts the OpenAI-compatible frontend", 1)[1]
    demo = demo.split("Docs:", 1)[0]
    assert "`troupe frontend` defaults to 0" in demo
    assert "`troupe frontend --migration-limit 2` behaves as the demo does" in demo
    frontend_block = readme.split("## The OpenAI-compatible frontend", 1)[1].split("```", 2)[1]
    assert "troupe frontend --port 8000 --migration-limit 2" in frontend_block
    guide = " ".join((root / "docs" / "frontend.md").read_text().split())
    migration = guide.split("## Migration", 1)[1].split("##", 1)[0]
    assert "(`make demo` shows it). The default is 0" in migration
    assert "`troupe frontend --migration-limit 2`" in migration
