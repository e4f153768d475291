"""``troupe events``: a component's events as JSON lines, replayed or live, ended by --count,
--timeout or Ctrl-C, with clear one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from typing import IO, Any

import msgspec
import pytest

from troupe import Config, Runtime
from troupe._cli_events import event_json, resolve_scope
from troupe.cli import main
from troupe.config import NatsConfig
from troupe.errors import ConfigError
from troupe.events import Envelope, EventScope, NatsEventPlane, encode_event
from troupe.kv import (
    KV_EVENTS_TOPIC,
    KvCacheEvent,
    KvPublisher,
    Removed,
    Stored,
    StoredBlock,
    block_hashes,
)
from troupe.testing import NatsServer

PUBLISHER = "0123456789abcdef"


class Load(msgspec.Struct, tag=True):
    """Some other topic's event: not a KV event."""

    active_blocks: int


def envelope(payload: bytes, sequence: int = 1) -> Envelope:
    return Envelope(PUBLISHER, sequence, 1700000000.5, KV_EVENTS_TOPIC, payload)


def test_each_kv_event_is_one_json_object_and_anything_else_is_printed_raw() -> None:
    stored = KvCacheEvent(7, Stored(11, [StoredBlock(12, 120), StoredBlock(2**64 - 1)]), 1)
    line = json.loads(event_json(envelope(encode_event(stored), sequence=3)))
    assert line == {
        "publisher_id": PUBLISHER,
        "sequence": 3,
        "published_at": 1700000000.5,
        "topic": "kv-events",
        "event": {
            "event_id": 7,
            "dp_rank": 1,
            "kind": "stored",
            "parent_hash": 11,
            "hashes": [12, 2**64 - 1],
            "tokens_hashes": [120, None],
        },
    }
    removed = json.loads(event_json(envelope(encode_event(KvCacheEvent(8, Removed([12]))))))
    assert removed["event"] == {"event_id": 8, "dp_rank": 0, "kind": "removed", "hashes": [12]}
    other = json.loads(event_json(envelope(encode_event(Load(5)))))
    assert other["payload"] == {"type": "Load", "active_blocks": 5}
    assert other["payload_base64"] == "gqR0eXBlpExvYWStYWN0aXZlX2Jsb2NrcwU="
    assert "event" not in other
    garbage = json.loads(event_json(envelope(b"\xc1\xff not msgpack")))
    assert garbage["payload"] is None
    assert garbage["payload_base64"] == "wf8gbm90IG1zZ3BhY2s="


def test_endpoint_or_component_names_the_scope() -> None:
    assert resolve_scope("dynamo.backend") == EventScope("dynamo", "backend")
    assert resolve_scope("dyn://dynamo.backend.generate") == EventScope("dynamo", "backend")
    for bad in ("dynamo", "a.b.c.d", "Dynamo.backend", "dynamo..generate"):
        with pytest.raises(ConfigError, match="ENDPOINT"):
            resolve_scope(bad)


def test_from_start_without_durable_events_is_a_configuration_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["events", "ns.comp", "--from-start"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("troupe: configuration error: invalid DYN_DURABLE_KV_EVENTS=False")
    assert "--from-start" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["events", "ns.comp", "--count", "0"]) == 2
    assert "--count" in capsys.readouterr().err
    assert main(["events", "ns.comp", "--topic", "KV.events"]) == 2
    assert "invalid topic='KV.events'" in capsys.readouterr().err


def _publish_kv_events(url: str, scope: EventScope, count: int) -> None:
    """``count`` KV events of one worker, into the durable stream."""

    async def go() -> None:
        plane = NatsEventPlane(NatsConfig(server=url), durable=True)
        try:
            publisher = await KvPublisher.open(plane, scope, PUBLISHER, block_size=2)
            for n in range(count - 1):
                publisher.stored(token_ids=[n, n])
            publisher.cleared()
            await publisher.flush(timeout=10)
            await publisher.close()
        finally:
            await plane.close()

    asyncio.run(go())


def test_from_start_replays_the_stream_and_count_ends_it(
    nats_server: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scope = EventScope(f"t{uuid.uuid4().hex[:10]}", "backend")
    _publish_kv_events(nats_server.url, scope, 4)
    monkeypatch.setenv("NATS_SERVER", nats_server.url)
    monkeypatch.setenv("DYN_DURABLE_KV_EVENTS", "true")
    monkeypatch.setenv("DYN_LOG", "warning")
    endpoint = f"{scope.namespace}.backend.generate"
    assert main(["events", endpoint, "--from-start", "--count", "4", "--timeout", "20"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["event"]["kind"] for line in lines] == ["stored", "stored", "stored", "cleared"]
    assert [line["event"]["event_id"] for line in lines] == [1, 2, 3, 4]
    assert [line["sequence"] for line in lines] == [1, 2, 3, 4]
    assert {line["publisher_id"] for line in lines} == {PUBLISHER}
    assert [line["stream_sequence"] for line in lines] == [1, 2, 3, 4]

    # Fewer events than --count within --timeout: status 1, and a line saying so.
    assert main(["events", endpoint, "--from-start", "--count", "9", "--timeout", "1"]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 4
    assert "troupe: 4 of 9 events within 1 s" in captured.err


class Lines:
    """A child's output stream read by a thread, so the test waits on lines with deadlines."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), name="Lines")
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)

    def next(self, timeout: float = 20.0) -> str:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout:g} s") from None

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        while text not in (line := self.next(timeout)):
            pass
        return line

    def rest(self) -> str:
        """Everything left, once the child has exited."""
        self._thread.join(timeout=10)
        lines: list[str] = []
        while not self._lines.empty():
            lines.append(self._lines.get_nowait())
        return "".join(lines)


@pytest.mark.timeout(60)
def test_live_events_are_printed_as_they_arrive_until_ctrl_c(nats_server: NatsServer) -> None:
    scope = EventScope(f"t{uuid.uuid4().hex[:10]}", "backend")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "NATS_", "ETCD_"))}
    env |= {"NATS_SERVER": nats_server.url, "DYN_LOG": "warning"}
    child = subprocess.Popen(
        [sys.executable, "-m", "troupe", "events", f"{scope.namespace}.backend"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stderr is not None
    out, err = Lines(child.stdout), Lines(child.stderr)
    try:
        notice = err.wait_for("Ctrl-C to stop")  # subscribed: what is published now arrives
        assert f"topic kv-events of {scope.namespace}.backend on the nats" in notice

        async def publish() -> None:
            plane = NatsEventPlane(NatsConfig(server=nats_server.url))
            try:
                raw = await plane.publisher(scope, KV_EVENTS_TOPIC, PUBLISHER)
                await raw.publish(KvCacheEvent(1, Stored(None, [StoredBlock(5)])))
                await raw.publish(b"\x00\x01 not a KV event")
            finally:
                await plane.close()

        asyncio.run(publish())
        first: dict[str, Any] = json.loads(out.next())
        second: dict[str, Any] = json.loads(out.next())
        assert first["event"] == {
            "event_id": 1,
            "dp_rank": 0,
            "kind": "stored",
            "parent_hash": None,
            "hashes": [5],
            "tokens_hashes": [None],
        }
        assert (second["sequence"], second["payload_base64"]) == (2, "AAEgbm90IGEgS1YgZXZlbnQ=")
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=20) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert out.rest() == ""
    assert "Traceback" not in err.rest()


def test_blocks_prints_each_workers_cache(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {
        "DYN_KV_STORE": "file",
        "DYN_FILE_KV": str(tmp_path / "kv"),
        "DYN_EVENT_PLANE": "zmq",
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_LOG": "error",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with Runtime(Config.from_env(env), handle_signals=False) as worker:
        publisher = worker.kv_events("blk.llm.generate", block_size=4)
        publisher.stored(token_ids=list(range(12)))  # 3 blocks
        publisher.stored(token_ids=list(range(100, 108)))  # 2 more
        publisher.removed(block_hashes(list(range(12)), 4)[2:])  # 1 less
        worker.io.run(publisher.flush(5), timeout=10)
        assert main(["events", "blk.llm", "--blocks"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line == {"instance_id": worker.instance_id, "blocks": 4, "last_event_id": 3}
    assert main(["events", "none.here", "--blocks", "--timeout", "0.2"]) == 1
    assert "no worker publishes KV events in none.here" in capsys.readouterr().err
