"""The Runtime skeleton: start/stop, signals, no thread left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import msgspec
import pytest

from troupe import Config, Runtime
from troupe.actors import Actor
from troupe.errors import ActorDead, ConfigError, TroupeError


class Ping(msgspec.Struct, frozen=True, tag=True):
    pass


class Echo(Actor[Ping]):
    def receive(self, message: Ping) -> str:
        return "pong"


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def test_runtime_starts_and_close_leaves_no_thread() -> None:
    before = _threads()
    with Runtime(Config(), handle_signals=False) as rt:
        assert rt.state == "running"
        ref = rt.spawn(Echo, name="echo")
        assert ref.ask(Ping()) == "pong"
        assert rt.io.run(_answer(), timeout=5) == 42
        assert any(t.name == "troupe-io" for t in threading.enumerate())
    assert rt.state == "closed"
    assert not ref.is_alive()
    with pytest.raises(ActorDead):
        ref.ask(Ping())
    assert _threads() <= before
    rt.close()  # idempotent


async def _answer() -> int:
    return 42


def test_actors_stop_in_reverse_start_order() -> None:
    order: list[str] = []

    class Recorder(Actor[Ping]):
        def receive(self, message: Ping) -> None:
            return None

        def stopped(self, reason: object, error: BaseException | None) -> None:
            order.append(self.name)

    with Runtime(handle_signals=False) as rt:
        for name in ("first", "second", "third"):
            rt.spawn(Recorder, name=name)
    assert order == ["third", "second", "first"]


def test_spawn_outside_a_running_runtime_is_an_error() -> None:
    rt = Runtime(handle_signals=False)
    with pytest.raises(TroupeError, match="not running"):
        rt.spawn(Echo)
    rt.close()
    with pytest.raises(TroupeError):
        rt.start()


def test_from_env_rejects_bad_values_before_starting_anything() -> None:
    before = _threads()
    with pytest.raises(ConfigError) as info:
        Runtime.from_env({"DYN_REQUEST_PLANE": "carrier-pigeon"})
    message = str(info.value)
    assert "DYN_REQUEST_PLANE" in message
    assert all(plane in message for plane in ("tcp", "http", "nats"))
    assert _threads() <= before


def test_two_runtimes_in_one_process_are_isolated() -> None:
    with Runtime(handle_signals=False) as a, Runtime(handle_signals=False) as b:
        ra = a.spawn(Echo)
        assert a.system.actors() == [ra]
        assert b.system.actors() == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_runtime_and_the_process_exits(sig: signal.Signals) -> None:
    script = textwrap.dedent(
        """
        import sys, threading
        from troupe import Runtime
        from troupe.actors import Actor
        import msgspec

        class Ping(msgspec.Struct, frozen=True, tag=True):
            pass

        class Echo(Actor[Ping]):
            def receive(self, message):
                return "pong"

            def stopped(self, reason, error):
                print("actor stopped", reason, flush=True)

        # The signal may land before or during wait_for_shutdown: either way the runtime must
        # stop everything (while waiting the wait returns; otherwise the with-block unwinds).
        try:
            with Runtime() as rt:
                rt.spawn(Echo).ask(Ping())
                print("ready", flush=True)
                got = rt.wait_for_shutdown(timeout=30)
                print("shutdown requested", got, flush=True)
        except (KeyboardInterrupt, SystemExit) as exc:
            print("shutdown requested True (unwound)", type(exc).__name__, flush=True)
        print("threads left", len(threading.enumerate()), flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DYN_LOG": "error"},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "shutdown requested True" in out
    assert "actor stopped normal" in out
    assert "threads left 1" in out


def test_signal_while_not_waiting_unwinds_the_with_block() -> None:
    script = textwrap.dedent(
        """
        import threading, time
        from troupe import Runtime
        try:
            with Runtime() as rt:
                print("ready", flush=True)
                while True:
                    time.sleep(0.01)
        except SystemExit as exc:
            print("exit", exc.code, "threads", len(threading.enumerate()), flush=True)
            raise
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "exit 143 threads 1" in out
