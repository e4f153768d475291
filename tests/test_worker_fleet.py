"""Worker fleets (`troupe worker --workers N`, `Runtime.spawn_workers`): ports, start-up
failures, readiness, crashes and signals, with real worker processes and file discovery."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _procs
import httpx
import pytest

from troupe import Config, Runtime
from troupe._fleet import WorkerFleet, worker_configs
from troupe._runtime_status import health_report
from troupe._status import HealthReport
from troupe.actors import Backoff, Intensity, WhichChildren
from troupe.actors._process import Status
from troupe.config import RequestPlaneConfig, SystemConfig, TcpConfig
from troupe.errors import ConfigError, StartFailed, SupervisorEscalation, TroupeError
from troupe.messages import InstanceRecord, endpoint_prefix
from troupe.testing._wait import eventually

ROOT = Path(__file__).resolve().parent.parent
HANDLER = f"{ROOT / 'tests' / '_fleet_handlers.py'}:echo"
ENDPOINT = "fleet.backend.echo"
PREFIX = endpoint_prefix("fleet", "backend", "echo")


# --- helpers -----------------------------------------------------------------------------------


def records(rt: Runtime) -> list[InstanceRecord]:
    return _procs.records(rt, PREFIX)


def port_of(record: InstanceRecord) -> int:
    (address,) = record.transport.values()
    return int(address.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def call(rt: Runtime, record: InstanceRecord, request: Any) -> list[Any]:
    return _procs.call(rt, record, ENDPOINT, request)


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that are free right now."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count - 1 > 65_535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise AssertionError(f"no {count} consecutive free ports found")


children_of = _procs.children_of
gone = _procs.gone


class Fleet(_procs.Fleet):
    """``troupe worker ENDPOINT HANDLER ...`` of this module's echo handler."""

    def __init__(self, env: dict[str, str], tmp_path: Path, *args: str) -> None:
        super().__init__(env, tmp_path, ENDPOINT, HANDLER, *args)


@pytest.fixture
def fleets() -> Iterator[list[Fleet]]:
    started: list[Fleet] = []
    yield started
    for fleet in started:
        fleet.kill()


# --- ports -------------------------------------------------------------------------------------


def test_worker_configs_put_worker_i_on_port_plus_i() -> None:
    def ports(config: Config, n: int) -> list[tuple[int, int]]:
        return [
            (c.request_plane.tcp.port, c.request_plane.http.port) for c in worker_configs(config, n)
        ]

    assert ports(Config(), 3) == [(0, 8888)] * 3  # tcp, port 0: the OS picks each
    tcp = Config(request_plane=RequestPlaneConfig(tcp=TcpConfig(port=8000)))
    assert ports(tcp, 3) == [(8000, 8888), (8001, 8888), (8002, 8888)]
    http = Config(request_plane=RequestPlaneConfig(plane="http"))
    assert ports(http, 3) == [(0, 8888), (0, 8889), (0, 8890)]  # 8888 is fixed: moved too
    nats = Config(request_plane=RequestPlaneConfig(plane="nats"))
    assert ports(nats, 2) == [(0, 8888)] * 2
    status = Config(system=SystemConfig(port=9093))
    assert {c.system.port for c in worker_configs(status, 2)} == {0}  # the parent keeps 9093
    assert {c.system.port for c in worker_configs(Config(), 2)} == {-1}  # off stays off
    with pytest.raises(ConfigError, match="DYN_HTTP_RPC_PORT"):
        worker_configs(Config(request_plane=RequestPlaneConfig(plane="http")), 64_000)
    with pytest.raises(ConfigError):
        worker_configs(Config(), 0)


def test_fixed_tcp_port_serves_worker_i_on_port_plus_i(
    env: dict[str, str], rt: Runtime, tmp_path: Path, fleets: list[Fleet]
) -> None:
    base = free_ports(3)
    fleet = Fleet(env | {"DYN_TCP_RPC_PORT": str(base)}, tmp_path, "--workers", "3")
    fleets.append(fleet)
    found = eventually(lambda: (r := records(rt)) and len(r) == 3 and r, timeout=30)
    assert sorted(port_of(r) for r in found) == [base, base + 1, base + 2]
    assert all(call(rt, r, "hi") == ["hi"] for r in found)
    eventually(lambda: "3 worker processes serving" in fleet.stderr, what="the banner")
    banner = next(line for line in fleet.stderr.splitlines() if "3 worker processes" in line)
    assert all(f"tcp://127.0.0.1:{port}" in banner for port in range(base, base + 3)), banner
    fleet.proc.send_signal(signal.SIGTERM)
    assert fleet.wait(20) == 0
    assert records(rt) == []


def test_spawn_workers_on_the_http_plane_use_consecutive_ports(env: dict[str, str]) -> None:
    base = free_ports(2)
    config = Config.from_env(env | {"DYN_REQUEST_PLANE": "http", "DYN_HTTP_RPC_PORT": str(base)})
    with Runtime(config, handle_signals=False) as rt:
        rt.spawn_workers(ENDPOINT, HANDLER, processes=2, ready_timeout=30)
        found = records(rt)  # spawn_workers returns once every worker serves (and registered)
        assert sorted(port_of(r) for r in found) == [base, base + 1]
        assert all(call(rt, r, {"x": 1}) == [{"x": 1}] for r in found)


def test_ports_past_65535_are_refused_before_anything_starts(
    env: dict[str, str], tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "troupe", "worker", ENDPOINT, HANDLER, "--workers", "3"],
        env=env | {"DYN_TCP_RPC_PORT": "65534"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "DYN_TCP_RPC_PORT=65534" in line
    assert "65533" in line


# --- start-up failures -------------------------------------------------------------------------


def test_unreachable_etcd_fails_in_one_line_within_seconds(env: dict[str, str]) -> None:
    quiet = {k: v for k, v in env.items() if k != "DYN_LOG"}  # the default level, info
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "troupe", "worker", ENDPOINT, HANDLER, "--workers", "2"],
        env=quiet | {"DYN_DISCOVERY_BACKEND": "etcd", "ETCD_ENDPOINTS": "http://127.0.0.1:1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    [line] = lines
    assert line.startswith("troupe: error: "), line
    assert "failed to start" in line
    assert "etcd discovery store unreachable at http://127.0.0.1:1" in line
    assert elapsed < 15


def test_a_port_in_use_stops_the_whole_fleet_in_one_line(
    env: dict[str, str], rt: Runtime, tmp_path: Path, fleets: list[Fleet]
) -> None:
    base = free_ports(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        fleet = Fleet(env | {"DYN_TCP_RPC_PORT": str(base)}, tmp_path, "--workers", "3")
        fleets.append(fleet)
        assert fleet.wait(30) == 1
    errors = [line for line in fleet.stderr.splitlines() if line.startswith("troupe: error:")]
    assert len(errors) == 1, fleet.stderr
    assert "worker-1 failed to start" in errors[0]
    assert f"DYN_TCP_RPC_PORT={base + 1}" in errors[0]
    assert "already in use" in errors[0]
    assert "Traceback" not in fleet.stderr
    assert records(rt) == []  # the workers that served were stopped and unregistered
    assert children_of(fleet.proc.pid) == set()


def test_spawn_workers_start_failure_is_a_typed_error_and_leaves_nothing(
    env: dict[str, str], rt: Runtime
) -> None:
    base = free_ports(2)
    before = children_of(os.getpid())
    config = Config.from_env(env | {"DYN_TCP_RPC_PORT": str(base)})
    with socket.socket() as taken, Runtime(config, handle_signals=False) as parent:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen()
        with pytest.raises(StartFailed) as failed:
            parent.spawn_workers(ENDPOINT, HANDLER, processes=2, ready_timeout=30)
        assert failed.value.actor.endswith("/worker-1")
        assert f"DYN_TCP_RPC_PORT={base + 1}" in failed.value.detail  # the worker's own error
        assert children_of(os.getpid()) <= before  # worker-0, which served, is stopped too
        assert parent.wait_for_shutdown(timeout=0) is False  # the runtime carries on
    assert records(rt) == []


# --- readiness and the status server -----------------------------------------------------------


def health(url: str) -> tuple[int, dict[str, Any]]:
    answer = httpx.get(f"{url}/health", timeout=5, trust_env=False)
    return answer.status_code, answer.json()


def test_a_fleet_counts_for_health_from_before_its_workers_launch(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While spawn_workers launches the processes, the runtime is not a ready process with no
    endpoint (a probe then would send traffic to a pod whose workers do not serve yet)."""
    seen: list[HealthReport] = []
    launch = WorkerFleet.start

    def start(fleet: WorkerFleet, *args: Any, **kwargs: Any) -> Any:
        seen.append(rt.io.run(health_report(rt), timeout=5))
        return launch(fleet, *args, **kwargs)

    monkeypatch.setattr(WorkerFleet, "start", start)
    with Runtime(Config.from_env(env), handle_signals=False) as rt:
        rt.spawn_workers(ENDPOINT, HANDLER, processes=2, ready_timeout=30)
        after = rt.io.run(health_report(rt), timeout=5)
    (before,) = seen
    assert not before.ready
    assert before.endpoints == {ENDPOINT: "starting"}
    assert after.ready
    assert after.endpoints == {ENDPOINT: "serving"}


def test_the_parent_status_server_reports_the_whole_fleet(
    env: dict[str, str], rt: Runtime, tmp_path: Path, fleets: list[Fleet]
) -> None:
    port = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    status_env = env | {"DYN_SYSTEM_PORT": str(port), "DYN_SYSTEM_HOST": "127.0.0.1"}
    fleet = Fleet(status_env, tmp_path, "--workers", "2")
    fleets.append(fleet)

    def ready() -> dict[str, Any] | None:
        try:
            code, body = health(url)
        except httpx.TransportError:
            return None  # not listening yet
        return body if code == 200 else None

    body = eventually(ready, timeout=30, what="/health ready")
    assert body["endpoints"] == {ENDPOINT: "ready"}
    workers = body["workers"][ENDPOINT]
    assert sorted(workers) == ["worker-0", "worker-1"]
    assert {w["status"] for w in workers.values()} == {"ready"}
    assert len(records(rt)) == 2  # neither worker fought the parent for its port
    for row in workers.values():  # each worker serves its own status server
        assert health(row["status_url"].replace("0.0.0.0", "127.0.0.1"))[0] == 200

    victim = workers["worker-0"]["pid"]
    os.kill(victim, signal.SIGKILL)

    def not_ready() -> dict[str, Any] | None:
        code, body = health(url)
        return body if code == 503 else None

    body = eventually(not_ready, timeout=10, what="/health notready after a worker died")
    assert body["workers"][ENDPOINT]["worker-0"]["status"] == "notready"
    body = eventually(ready, timeout=30, what="/health ready again with a new worker-0")
    assert body["workers"][ENDPOINT]["worker-0"]["pid"] != victim
    fleet.proc.send_signal(signal.SIGTERM)
    assert fleet.wait(20) == 0


def test_sigterm_while_workers_start_stops_everything_promptly(
    env: dict[str, str], tmp_path: Path, fleets: list[Fleet]
) -> None:
    port = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    slow = env | {
        "FLEET_TEST_SLOW_START": "1",
        "DYN_SYSTEM_PORT": str(port),
        "DYN_SYSTEM_HOST": "127.0.0.1",
    }
    fleet = Fleet(slow, tmp_path, "--workers", "2")
    fleets.append(fleet)
    workers = eventually(
        lambda: (c := children_of(fleet.proc.pid)) and len(c) == 2 and c, timeout=30
    )

    def answers() -> tuple[int, dict[str, Any]] | None:
        try:
            return health(url)
        except httpx.TransportError:
            return None

    code, body = eventually(answers, timeout=30, what="the parent's status server")
    assert code == 503  # never "ready" while nothing serves
    assert body["endpoints"] == {ENDPOINT: "notready"}
    fleet.proc.send_signal(signal.SIGTERM)
    fleet.wait(10)
    assert time.monotonic() - fleet.started < 60
    eventually(lambda: all(gone(pid) for pid in workers), what="the starting workers stopped")
    assert "Traceback" not in fleet.stderr


# --- crashes -----------------------------------------------------------------------------------


def test_a_worker_that_crashes_after_serving_is_restarted(rt: Runtime) -> None:
    supervisor = rt.spawn_workers(ENDPOINT, HANDLER, processes=2, ready_timeout=30)
    first = records(rt)
    victim = first[0]
    with pytest.raises(Exception):  # noqa: PT011 - the stream breaks as the process exits
        call(rt, victim, "crash")
    replaced = eventually(
        lambda: (r := records(rt)) and len(r) == 2 and victim.pid not in {x.pid for x in r} and r,
        timeout=30,
        what="a replacement registered and the crashed one gone",
    )
    assert all(call(rt, r, "again") == ["again"] for r in replaced)
    assert sorted(c.restarts for c in supervisor.ask(WhichChildren())) == [0, 1]


def test_spawn_workers_giving_up_is_raised_by_wait_for_shutdown(rt: Runtime) -> None:
    supervisor = rt.spawn_workers(
        ENDPOINT,
        HANDLER,
        processes=1,
        intensity=Intensity(max_restarts=1, within=60.0),
        backoff=Backoff(min=0.0),
        ready_timeout=30,
    )

    def serving_pid() -> int | None:
        [child] = supervisor.ask(WhichChildren())
        if child.ref is None:
            return None
        try:
            status = child.ref.ask(Status())
        except TroupeError:
            return None
        return status.pid if status.state == "serving" else None

    first = eventually(serving_pid)
    os.kill(first, signal.SIGKILL)  # restarted
    second = eventually(lambda: (p := serving_pid()) and p != first and p, timeout=30)
    os.kill(second, signal.SIGKILL)  # one restart too many
    with pytest.raises(SupervisorEscalation) as escalated:
        rt.wait_for_shutdown(timeout=30)
    assert str(escalated.value.__cause__).endswith("worker-0 was killed by SIGKILL")
    eventually(lambda: not supervisor.is_alive())
    assert records(rt) == [] or all(gone(r.pid) for r in records(rt))


def test_the_cli_exits_in_one_line_when_its_supervisor_gives_up(
    env: dict[str, str], rt: Runtime, tmp_path: Path, fleets: list[Fleet]
) -> None:
    fleet = Fleet(env, tmp_path, "--workers", "2")
    fleets.append(fleet)
    # After the banner: a worker killed before its first report would be a start failure.
    eventually(lambda: "2 worker processes serving" in fleet.stderr, timeout=30, what="banner")
    killed = 0
    deadline = time.monotonic() + 45
    while fleet.proc.poll() is None:  # kill every worker as it appears, until it gives up
        assert time.monotonic() < deadline, "the supervisor never gave up"
        for pid in children_of(fleet.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    assert fleet.proc.returncode == 1
    last = fleet.stderr.strip().splitlines()[-1]
    assert last.startswith("troupe: error: the worker processes of fleet.backend.echo kept exiting")
    assert "Traceback" not in fleet.stderr
    assert killed >= 6


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_workers_crash_loop_stops_everything_promptly(
    env: dict[str, str], rt: Runtime, tmp_path: Path, fleets: list[Fleet], signum: int
) -> None:
    fleet = Fleet(env, tmp_path, "--workers", "2")
    fleets.append(fleet)
    # The banner: the parent is past start-up (a signal then would end it with 128 + signum).
    eventually(lambda: "2 worker processes serving" in fleet.stderr, timeout=30, what="banner")
    seen: set[int] = set()
    for _ in range(3):  # three crashes: restarts, backoff; not yet enough to give up
        pid = eventually(lambda: next(iter(children_of(fleet.proc.pid) - seen), None), timeout=30)
        seen.add(pid)
        os.kill(pid, signal.SIGKILL)
    current = children_of(fleet.proc.pid)
    fleet.proc.send_signal(signum)
    stopping = time.monotonic()
    try:
        code = fleet.wait(15)
    except subprocess.TimeoutExpired:  # say what it was doing: its log, the children left
        left = children_of(fleet.proc.pid)
        pytest.fail(f"still running 15 s after {signum!r}; children {left}:\n{fleet.stderr}")
    assert code == 0, fleet.stderr
    assert time.monotonic() - stopping < 15
    eventually(lambda: all(gone(pid) for pid in current), what="every worker stopped")
    eventually(lambda: records(rt) == [], timeout=10, what="every worker unregistered or expired")
    assert "Traceback" not in fleet.stderr


def test_workers_stop_by_themselves_when_their_parent_is_killed(
    env: dict[str, str], rt: Runtime, tmp_path: Path, fleets: list[Fleet]
) -> None:
    fleet = Fleet(env, tmp_path, "--workers", "2")
    fleets.append(fleet)
    found = eventually(lambda: (r := records(rt)) and len(r) == 2 and r, timeout=30)
    fleet.proc.kill()
    fleet.proc.wait()
    eventually(lambda: records(rt) == [], timeout=10, what="the orphans unregistered")
    eventually(lambda: all(gone(r.pid) for r in found), timeout=10, what="the orphans exited")


# --- signals in the runtime --------------------------------------------------------------------


def test_a_second_signal_does_not_cut_a_shutdown_short(env: dict[str, str]) -> None:
    with Runtime(Config.from_env(env), handle_signals=False) as rt:
        with pytest.raises(SystemExit):
            rt._shutdown._on_signal(signal.SIGTERM, None)  # nobody waits: the main thread unwinds
        rt._shutdown._on_signal(signal.SIGTERM, None)  # already shutting down: ignored
        rt._shutdown._on_signal(signal.SIGINT, None)
        assert rt.wait_for_shutdown(timeout=0) is True
