"""``troupe mocker``: the mock engine with a KV cache in its own process, publishing KV events."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from troupe import Config, Runtime
from troupe.cli import main
from troupe.kv import KvView, follow_kv_events
from troupe.testing import eventually


def test_a_bad_engine_option_is_one_line_naming_the_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["mocker", "a.b.c", "--block-size", "0"]) == 2
    assert "invalid --block-size=0" in capsys.readouterr().err


def test_the_mocker_serves_announces_its_cache_and_publishes_events(env: dict[str, str]) -> None:
    env = env | {"DYN_EVENT_PLANE": "zmq"}
    argv = ["mocker", "cli.llm.generate", "--block-size", "4", "--num-gpu-blocks", "64"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "troupe", *argv, "--speedup-ratio", "100"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with Runtime(Config.from_env(env), handle_signals=False) as rt:
            router = rt.router("cli.llm.generate")
            (worker,) = router.wait_for_instances_sync(timeout=30)
            assert router.snapshot.by_id[worker].record.metadata == {
                "model": "troupe-mock",
                "kv_block_size": 4,
                "kv_total_blocks": 64,
            }
            follower = follow_kv_events(rt, "cli.llm.generate")
            chunks = list(router.generate_sync({"token_ids": list(range(10)), "max_tokens": 1}))
            assert chunks[-1]["prompt_tokens"] == 10
            view = follower.sink
            assert isinstance(view, KvView)
            eventually(lambda: len(view.blocks(worker)) == 2, timeout=10, what="2 blocks stored")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"Traceback" not in (proc.stderr.read() if proc.stderr else b"")
