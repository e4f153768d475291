"""The system status server: health/live/metrics routes, bad requests, binding errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from troupe._status import HealthReport, StatusServer
from troupe._support._ioloop import IOLoop
from troupe._support._metrics import RuntimeMetrics
from troupe.config import SystemConfig
from troupe.errors import ConfigError, DiscoveryUnavailable

LOCAL = SystemConfig(host="127.0.0.1", port=0)


class States:
    """A health source backed by a dict the test mutates, like the runtime's worker states."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}
        self.running = True

    def __call__(self) -> HealthReport:
        return HealthReport.from_states(self.states, running=self.running)


@pytest.fixture
def metrics() -> RuntimeMetrics:
    return RuntimeMetrics()


@pytest.fixture
def states() -> States:
    return States()


@pytest.fixture
async def server(metrics: RuntimeMetrics, states: States) -> AsyncIterator[StatusServer]:
    srv = StatusServer(LOCAL, metrics, states, read_timeout=0.5)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


@pytest.fixture
async def client(server: StatusServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=5) as c:
        yield c


async def raw(server: StatusServer, data: bytes, *, close_write: bool = True) -> bytes:
    """Send raw bytes and read the whole answer (the server closes the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        if close_write:
            writer.write_eof()
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# --- health ------------------------------------------------------------------------------------


async def test_health_switches_between_503_and_200(
    client: httpx.AsyncClient, states: States
) -> None:
    states.states = {"ns.backend.generate": "starting"}
    r = await client.get("/health")
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["status"] == "notready"
    assert body["endpoints"] == {"ns.backend.generate": "notready"}
    assert body["uptime"] >= 0

    states.states = {"ns.backend.generate": "serving", "ns.backend.embed": "serving"}
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"
    assert r.json()["endpoints"] == {"ns.backend.generate": "ready", "ns.backend.embed": "ready"}

    states.states["ns.backend.embed"] = "draining"
    r = await client.get("/health")
    assert r.status_code == 503
    assert r.json()["endpoints"] == {"ns.backend.generate": "ready", "ns.backend.embed": "notready"}


async def test_health_without_endpoints_follows_the_runtime(
    client: httpx.AsyncClient, states: States
) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json()["endpoints"] == {}
    states.running = False
    r = await client.get("/health")
    assert r.status_code == 503
    assert r.json()["status"] == "notready"


async def test_health_query_string_is_ignored(client: httpx.AsyncClient) -> None:
    r = await client.get("/health?verbose=1")
    assert r.status_code == 200


async def test_async_health_source_and_its_failures(metrics: RuntimeMetrics) -> None:
    mode = ["ok"]

    async def health() -> HealthReport:
        if mode[0] == "slow":
            await asyncio.Event().wait()
        if mode[0] == "error":
            raise DiscoveryUnavailable("etcd", ["http://127.0.0.1:1"])
        return HealthReport.from_states({"ns.c.e": "serving"})

    srv = StatusServer(LOCAL, metrics, health, health_timeout=0.2)
    await srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, trust_env=False, timeout=5) as c:
            assert (await c.get("/health")).status_code == 200
            mode[0] = "error"
            r = await c.get("/health")
            assert r.status_code == 503
            assert "etcd" in r.json()["error"]
            mode[0] = "slow"
            r = await c.get("/health")
            assert r.status_code == 503
            assert r.json()["status"] == "notready"
            mode[0] = "ok"
            assert (await c.get("/health")).status_code == 200
    finally:
        await srv.close()


def test_health_report_is_read_only() -> None:
    source = {"a": "serving"}
    report = HealthReport.from_states(source)
    source["a"] = "draining"
    assert report.endpoints == {"a": "serving"}
    assert report.ready
    with pytest.raises(TypeError):
        report.endpoints["a"] = "x"  # type: ignore[index]


def test_health_body_lists_worker_processes_only_when_there_are_some() -> None:
    assert "workers" not in HealthReport.from_states({"ns.c.e": "serving"}).to_json(1.0)
    rows = {
        "worker-0": {"status": "ready", "state": "serving", "pid": 11},
        "worker-1": {"status": "notready", "state": "starting", "pid": 12},
    }
    report = HealthReport.from_states({"ns.c.e": "starting"}, workers={"ns.c.e": rows})
    body = report.to_json(1.0)
    assert body["status"] == "notready"
    assert body["workers"] == {"ns.c.e": rows}
    with pytest.raises(TypeError):
        report.workers["other"] = {}  # type: ignore[index]


# --- live, metrics, other routes ---------------------------------------------------------------


async def test_live(client: httpx.AsyncClient, states: States) -> None:
    states.states = {"ns.c.e": "starting"}  # liveness does not depend on readiness
    r = await client.get("/live")
    assert r.status_code == 200
    assert r.json() == {"status": "live"}


async def test_metrics_route_serves_labelled_series(
    client: httpx.AsyncClient, metrics: RuntimeMetrics
) -> None:
    ep = metrics.endpoint("ns", "backend", "generate")
    for n in range(3):
        with ep.track(10) as req:
            req.add_response_bytes(n)
    with pytest.raises(ValueError, match="handler bug"), ep.track(1):
        raise ValueError("handler bug")
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    labels = 'component="backend",endpoint="generate",namespace="ns"'
    assert f"troupe_requests_total{{{labels}}} 4.0" in r.text
    assert f"troupe_inflight_requests{{{labels}}} 0.0" in r.text
    assert f"troupe_request_bytes_total{{{labels}}} 31.0" in r.text
    assert f"troupe_response_bytes_total{{{labels}}} 3.0" in r.text
    errors = 'component="backend",endpoint="generate",kind="handler",namespace="ns"'
    assert f"troupe_errors_total{{{errors}}} 1.0" in r.text
    assert f"troupe_request_duration_seconds_count{{{labels}}} 4.0" in r.text
    assert "troupe_uptime_seconds " in r.text


async def test_unknown_path_is_404_json(client: httpx.AsyncClient) -> None:
    r = await client.get("/nope")
    assert r.status_code == 404
    assert r.json()["path"] == "/nope"


async def test_only_get_and_head(client: httpx.AsyncClient) -> None:
    r = await client.post("/health", content=b"{}")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    r = await client.head("/live")
    assert r.status_code == 200
    assert r.content == b""
    assert int(r.headers["content-length"]) > 0


async def test_custom_paths(metrics: RuntimeMetrics, states: States) -> None:
    config = SystemConfig(host="127.0.0.1", port=0, health_path="/ready", live_path="/alive")
    srv = StatusServer(config, metrics, states)
    await srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, trust_env=False, timeout=5) as c:
            assert (await c.get("/ready")).json()["status"] == "ready"
            assert (await c.get("/alive")).json() == {"status": "live"}
            assert (await c.get("/health")).status_code == 404
    finally:
        await srv.close()


# --- bad clients never kill the server ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x00\xff\xfe garbage\r\n\r\n", 400),
        (b"GET /health\r\n\r\n", 400),
        (b"get /health HTTP/1.1\r\n\r\n", 400),
        (b"GET health HTTP/1.1\r\n\r\n", 400),
        (b"GET /health HTTP/2.0\r\n\r\n", 505),
        (b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n", 400),  # head cut short, then EOF
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 431),
    ],
)
async def test_malformed_requests_get_4xx_and_server_survives(
    server: StatusServer, client: httpx.AsyncClient, data: bytes, status: int
) -> None:
    answer = await raw(server, data)
    assert status_of(answer) == status
    assert b"Connection: close" in answer
    assert (await client.get("/live")).status_code == 200


async def test_silent_and_vanishing_clients(
    server: StatusServer, client: httpx.AsyncClient
) -> None:
    assert await raw(server, b"") == b""  # connect, send nothing, close: no answer, no crash
    answer = await raw(server, b"GET /live", close_write=False)  # then silence: read timeout
    assert status_of(answer) == 408
    assert (await client.get("/live")).status_code == 200


async def test_raw_http10_request(server: StatusServer) -> None:
    answer = await raw(server, b"GET /live HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b'{"status":"live"}')


# --- binding and lifecycle ---------------------------------------------------------------------


async def test_port_in_use_is_a_config_error(
    server: StatusServer, metrics: RuntimeMetrics, states: States
) -> None:
    taken = SystemConfig(host="127.0.0.1", port=server.port)
    second = StatusServer(taken, metrics, states)
    with pytest.raises(ConfigError) as info:
        await second.start()
    assert info.value.variable == "DYN_SYSTEM_PORT"
    assert info.value.value == server.port
    assert str(server.port) in str(info.value)
    assert "already in use" in str(info.value)


def test_disabled_config_is_rejected(metrics: RuntimeMetrics, states: States) -> None:
    with pytest.raises(ConfigError) as info:
        StatusServer(SystemConfig(port=-1), metrics, states)
    assert info.value.variable == "DYN_SYSTEM_PORT"


async def test_port_before_start_is_an_error(metrics: RuntimeMetrics, states: States) -> None:
    srv = StatusServer(LOCAL, metrics, states)
    with pytest.raises(Exception, match="not started"):
        _ = srv.port
    await srv.close()  # closing a server that never started is harmless


async def test_close_aborts_idle_connections_and_frees_the_port(
    metrics: RuntimeMetrics, states: States
) -> None:
    srv = StatusServer(LOCAL, metrics, states, read_timeout=30)
    await srv.start()
    port = srv.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /li")  # a client stuck mid-request
    await writer.drain()
    await asyncio.wait_for(srv.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    # The port can be bound again at once.
    again = StatusServer(SystemConfig(host="127.0.0.1", port=port), metrics, states)
    await again.start()
    await again.close()


def test_runs_on_the_runtime_io_loop(metrics: RuntimeMetrics, states: States) -> None:
    """The way the runtime runs it: on the IOLoop thread (uvloop), queried from another thread."""
    io = IOLoop("test-status-io")
    io.start()
    try:
        srv = StatusServer(LOCAL, metrics, states)
        io.run(srv.start(), timeout=5)
        states.states = {"ns.c.e": "serving"}
        with httpx.Client(base_url=srv.url, trust_env=False, timeout=5) as c:
            assert c.get("/health").status_code == 200
            assert c.get("/live").status_code == 200
            assert "troupe_uptime_seconds" in c.get("/metrics").text
        io.run(srv.close(), timeout=5)
    finally:
        io.stop()
