"""The real-server helpers: start, connect, restart, and clear errors when start-up fails."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import nats
import pytest

from troupe.errors import TroupeError
from troupe.testing import EtcdServer, NatsServer, find_binary


def test_binaries_are_found_beside_the_interpreter() -> None:
    for name in ("nats-server", "etcd", "etcdctl"):
        path = find_binary(name)
        if path is None:
            pytest.skip(f"{name} is not installed")
        assert Path(path).parent == Path(sys.executable).parent or Path(path).is_file()
    assert find_binary("surely-no-such-binary-here") is None


async def test_nats_server_serves_and_keeps_jetstream_data_across_restart(
    fresh_nats_server: NatsServer,
) -> None:
    server = fresh_nats_server
    assert server.url == f"nats://127.0.0.1:{server.port}"
    nc = await nats.connect(server.url)
    kv = await nc.jetstream().create_key_value(bucket="fixture")
    await kv.put("k", b"v")
    await nc.close()

    server.restart()
    assert server.pid is not None
    nc = await nats.connect(server.url)
    kv = await nc.jetstream().key_value("fixture")
    assert (await kv.get("k")).value == b"v"
    await nc.close()

    server.kill()
    assert not server.running
    assert server.pid is None


def test_etcd_server_serves_and_keeps_data_across_restart(fresh_etcd_server: EtcdServer) -> None:
    server = fresh_etcd_server
    assert server.url == f"http://127.0.0.1:{server.port}"
    server.etcdctl("put", "/fixture/k", "v")
    server.restart()
    assert server.etcdctl("get", "/fixture/k").split() == ["/fixture/k", "v"]


def test_the_session_servers_are_up(nats_server: NatsServer, etcd_server: EtcdServer) -> None:
    assert nats_server.running
    assert etcd_server.running
    with socket.create_connection(("127.0.0.1", nats_server.port), timeout=2) as sock:
        assert sock.recv(5) == b"INFO "


def test_a_failed_start_reports_the_server_log() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = NatsServer(port=port)  # a fixed port: no retry on another one
        try:
            with pytest.raises(TroupeError) as info:
                server.start(timeout=10)
            assert "log tail" in str(info.value)
            assert "address already in use" in str(info.value).lower()
            assert not server.running
        finally:
            server.close()
    assert not server.dir.exists()


def test_a_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TroupeError, match="not found"):
        NatsServer(binary=str(tmp_path / "nats-server"))
