"""`troupe worker` and Runtime.spawn_workers: serving from the command line, in processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import _procs
import pytest

from troupe import Config, Runtime
from troupe._handlers import handler_spec, load_handler
from troupe.demo import words
from troupe.errors import ConfigError
from troupe.messages import InstanceRecord, endpoint_prefix
from troupe.testing._wait import eventually

PREFIX = endpoint_prefix("demo", "backend", "words")


def records(rt: Runtime) -> list[InstanceRecord]:
    return _procs.records(rt, PREFIX)


def call(rt: Runtime, record: InstanceRecord, request: Any) -> list[Any]:
    return _procs.call(rt, record, "demo.backend.words", request)


def start_worker(env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "troupe",
            "worker",
            "demo.backend.words",
            "troupe.demo:words",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_worker_command_serves_registers_and_stops_cleanly(
    env: dict[str, str], rt: Runtime
) -> None:
    proc = start_worker(env, "--model", "tiny")
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()
        assert "serving demo.backend.words at tcp://127.0.0.1:" in banner, banner
        [record] = eventually(lambda: records(rt))
        assert record.metadata == {"model": "tiny"}
        assert record.pid == proc.pid
        chunks = call(rt, record, {"text": "hello troupe world"})
        assert [c["word"] for c in chunks] == ["hello", "troupe", "world"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert records(rt) == []  # unregistered on the way out, not left to expire
    finally:
        proc.kill()
        proc.wait()


def test_bad_handler_is_one_line(env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "troupe", "worker", "demo.backend.words", "troupe.demo:nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "HANDLER" in result.stderr
    assert "nope" in result.stderr


def wait_for_line(proc: subprocess.Popen[str], text: str) -> str:
    """The first line of the process's stderr that contains ``text`` (pytest-timeout bounds it)."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if text in line:
            return line
    raise AssertionError(f"stderr ended without {text!r}")


def test_workers_are_supervised_processes(env: dict[str, str], rt: Runtime) -> None:
    proc = start_worker(env, "--workers", "2")
    try:
        # Once all serve (a worker killed before its first report would fail the start-up).
        banner = wait_for_line(proc, "worker processes serving")
        assert "2 worker processes serving demo.backend.words at tcp://127.0.0.1:" in banner
        first = eventually(lambda: (r := records(rt)) and len(r) == 2 and r, timeout=20)
        pids = {r.pid for r in first}
        assert proc.pid not in pids  # the parent only supervises
        victim = first[0]
        os.kill(victim.pid, signal.SIGKILL)
        replaced = eventually(
            lambda: (
                (r := records(rt)) and len(r) == 2 and victim.pid not in {x.pid for x in r} and r
            ),
            timeout=20,
            what="a replacement worker registered and the dead one expired",
        )
        assert all(call(rt, r, {"text": "still here"}) for r in replaced)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert records(rt) == []
        for r in replaced:
            with pytest.raises(ProcessLookupError):
                os.kill(r.pid, 0)
    finally:
        proc.kill()
        proc.wait()


def test_load_handler_forms(tmp_path: Path) -> None:
    assert load_handler("troupe.demo:words") is words
    script = tmp_path / "my_worker.py"
    script.write_text(
        "import sys\n"
        "def echo(request, ctx):\n    return request\n"
        "if __name__ == '__main__':\n    sys.exit('must not run on import')\n"
    )
    echo = load_handler(f"{script}:echo")
    assert echo("x", None) == "x"
    assert handler_spec(words) == "troupe.demo:words"
    assert handler_spec("troupe.demo:words") == "troupe.demo:words"
    for bad in (
        "troupe.demo",
        "no_such_module_xyz:f",
        f"{tmp_path}/missing.py:f",
        "troupe:__version__",
    ):
        with pytest.raises(ConfigError):
            load_handler(bad)
    with pytest.raises(ConfigError):
        handler_spec(lambda request, ctx: request)


def troupe_call(env: dict[str, str], *args: str, stdin: str | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "troupe", "call", "demo.backend.words", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=30,
        check=False,
    )


def test_call_prints_chunks_as_json_lines(env: dict[str, str], rt: Runtime) -> None:
    proc = start_worker(env)
    try:
        [record] = eventually(lambda: records(rt))
        result = troupe_call(env, '{"text": "one two"}')
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert [line["word"] for line in lines] == ["one", "two"]
        big = json.dumps({"text": "w " * 50_000})
        piped = troupe_call(env, "-", "--instance", record.instance_id, stdin=big)
        assert piped.returncode == 0, piped.stderr
        assert len(piped.stdout.splitlines()) == 50_000
        twice = troupe_call(env, '{"text": "x"}', "--count", "2", "--policy", "random")
        assert len(twice.stdout.splitlines()) == 2
        for bad in (["not json"], ['{"text": "x"}', "--instance", "ffffffffffffffff"]):
            failed = troupe_call(env, *bad)
            assert failed.returncode != 0
            assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
            assert "Traceback" not in failed.stderr
        remote = troupe_call(env, '{"no": "text"}')
        assert remote.returncode == 1
        assert "ConfigError" in remote.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_call_without_instances_fails_in_one_line(env: dict[str, str]) -> None:
    result = troupe_call(env, '{"text": "x"}', "--wait", "0")
    assert result.returncode == 1
    assert "no instances" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_spawned_workers_can_log_to_files(rt: Runtime, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    rt.spawn_workers("demo.backend.words", "troupe.demo:words", processes=2, log_dir=logs)
    eventually(lambda: len(records(rt)) == 2, timeout=20, what="two workers registered")
    for n in range(2):  # the start-up line follows the registration: wait for it too
        log = logs / f"worker-{n}.log"
        eventually(lambda log=log: "troupe: serving demo.backend.words" in log.read_text())


def test_a_handler_factory_builds_its_handler_with_the_workers_runtime(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """``troupe worker ENDPOINT module:factory``: the factory gets the runtime and the endpoint,
    and its metadata joins the record."""
    handler = tmp_path / "factory.py"
    handler.write_text(
        "import troupe\n"
        "@troupe.handler_factory\n"
        "def make(rt, endpoint):\n"
        "    async def answer(request, ctx):\n"
        "        yield {'served_by': rt.instance_id, 'endpoint': endpoint.path}\n"
        "    return answer, {'flavour': 'made'}\n"
    )
    with Runtime(Config.from_env(env), handle_signals=False) as rt:
        supervisor = rt.spawn_workers("fac.tory.ep", f"{handler}:make", processes=1)
        del supervisor
        router = rt.router("fac.tory.ep")
        (worker,) = router.wait_for_instances_sync(timeout=10)
        (chunk,) = list(router.generate_sync({}))
        assert chunk == {"served_by": worker, "endpoint": "fac.tory.ep"}
        assert router.snapshot.by_id[worker].record.metadata == {"flavour": "made"}
