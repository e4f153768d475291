"""Callers that never read their replies: a tcp worker holds a bounded amount for them.

A raw ZeroMQ DEALER in another process (``_hammer.py``) queues 100,000 requests and reads
nothing. The worker's retained state (requests running, the caller's reply queue, tasks) is
sampled while it floods, together with the process's RSS, and a well-behaved caller must be
served all along.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import zmq

from troupe import RequestContext
from troupe.config import TcpConfig
from troupe.messages import Request, encode
from troupe.testing import eventually_async
from troupe.transports.tcp import TcpClient, TcpServer

HAMMER = Path(__file__).with_name("_hammer.py")
HOSTILE = b"hostile"
FLOOD = 100_000
CONFIG = TcpConfig(host="127.0.0.1")

pytestmark = pytest.mark.timeout(120)


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Hammer:
    """The flooding caller, in a process of its own (its memory is not the worker's)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, address: str, count: int, endpoint: str, id_bytes: int = 0) -> Hammer:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HAMMER),
            address,
            HOSTILE.decode(),
            str(count),
            endpoint,
            str(id_bytes),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def sent(self) -> None:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        assert line == b"sent\n"

    async def close(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@dataclass
class Peaks:
    """The most the worker held at once while sampled."""

    inflight: int = 0
    held: int = 0  # requests running for the flooding caller
    backlog: int = 0  # replies queued for it, not yet handed to ZeroMQ
    tasks: int = 0
    rss_growth: float = 0.0  # MiB above the RSS when sampling began


async def sample(server: TcpServer, peaks: Peaks, stop: asyncio.Event) -> None:
    pump = server._pump
    assert pump is not None
    base = rss_mib()
    while not stop.is_set():
        peaks.inflight = max(peaks.inflight, server.inflight)
        active = server._runner._active
        held = len([key for key in active if isinstance(key, tuple) and key[0] == HOSTILE])
        peaks.held = max(peaks.held, held)
        peaks.backlog = max(peaks.backlog, pump.backlog(HOSTILE))
        peaks.tasks = max(peaks.tasks, len(asyncio.all_tasks()))
        peaks.rss_growth = max(peaks.rss_growth, rss_mib() - base)
        await asyncio.sleep(0.005)


async def serve_others(client: TcpClient, address: str, stop: asyncio.Event) -> list[float]:
    """A well-behaved caller's round trips while the flood lasts: their latencies."""
    latencies: list[float] = []
    while not stop.is_set():
        started = time.monotonic()
        stream = await client.request(address, "echo", b"hello")
        assert await stream.collect() == [b"hello"]
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.01)  # a steady caller, not a second flood
    return latencies


async def echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield payload


@pytest.fixture
async def server() -> AsyncIterator[TcpServer]:
    server = TcpServer(CONFIG)
    server.add_endpoint("echo", echo)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def client() -> AsyncIterator[TcpClient]:
    client = TcpClient(CONFIG)
    yield client
    await client.close()


async def flood(
    server: TcpServer,
    client: TcpClient,
    endpoint: str,
    id_bytes: int,
    handled: Callable[[], int] = lambda: 0,
) -> tuple[Peaks, list[float]]:
    """Flood ``server`` with ``FLOOD`` requests that nobody reads, while a good caller calls.

    ``handled`` counts the flooding requests handlers were started for, so far. Returns the
    peaks sampled and the good caller's latencies; the flooding caller is gone when it returns,
    and everything it held is given back.
    """
    assert await (await client.request(server.address, "echo", b"warm")).collect() == [b"warm"]
    peaks = Peaks()
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(server, peaks, stop))
    hammer = await Hammer.start(server.address, FLOOD, endpoint, id_bytes)
    others = asyncio.create_task(serve_others(client, server.address, stop))
    try:
        await hammer.sent()

        def flood_over() -> bool:
            # Every request was dealt with, or the worker's heartbeat dropped the caller that
            # read nothing (then the requests still on the wire are lost with it).
            seen = handled() + sum(server.metrics.refused().values())
            return seen >= FLOOD or HOSTILE in server._gone

        await eventually_async(flood_over, timeout=60, interval=0.02, what="the flood ended")
    finally:
        stop.set()
        latencies = await others
        await sampler
        await hammer.close()
    # What the caller held is given back once it is gone.
    pump = server._pump
    assert pump is not None
    await eventually_async(
        lambda: server.inflight == 0 and pump.backlog(HOSTILE) == 0 and not pump._blocked,
        timeout=10,
        what="the flooding caller's requests and queue released",
    )
    assert server._runner.callers == 0
    return peaks, latencies


def assert_served(latencies: list[float]) -> None:
    assert len(latencies) >= 10, "the good caller was hardly served during the flood"
    assert max(latencies) < 2.0, f"slowest round trip {max(latencies):.2f} s"


async def test_a_caller_that_reads_no_replies_holds_a_bounded_amount(
    server: TcpServer, client: TcpClient
) -> None:
    handled = 0

    async def sink(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        nonlocal handled
        handled += 1
        yield payload

    server.add_endpoint("sink", sink)
    peaks, latencies = await flood(server, client, "sink", 0, lambda: handled)
    # Its requests wait for room for their replies, each holding its place in the admission
    # limits: it holds at most its share, and its queue at most a reply for each of them beyond
    # the channel buffer, or twice the channel buffer with refusals.
    per_caller = server._runner.max_inflight_per_caller
    assert peaks.backlog <= 2 * CONFIG.channel_buffer + per_caller, peaks
    assert peaks.held <= per_caller, peaks
    assert peaks.tasks <= per_caller + 16, peaks
    assert peaks.rss_growth < 64, peaks
    # Whether it reaches its share (refusals counted) and whether refusals then overflow its queue
    # (drops counted) depends on how much ZeroMQ and the kernel buffer before the worker feels it:
    # the bounds above are what must hold either way.
    assert_served(latencies)


async def test_error_replies_for_a_caller_that_reads_none_are_bounded(
    server: TcpServer, client: TcpClient
) -> None:
    # Unknown endpoint, 1 KB request ids: every reply is an error of about 1 KB.
    peaks, latencies = await flood(server, client, "nope", 1024)
    assert peaks.inflight <= 2, peaks  # errors are answered without a task
    assert peaks.backlog <= 2 * CONFIG.channel_buffer + 256, peaks
    assert peaks.tasks <= 16, peaks
    assert peaks.rss_growth < 64, peaks
    assert server.metrics.refused().get("unknown_endpoint", 0) > 0
    assert server.metrics.dropped().get("backlog", 0) > 0
    assert_served(latencies)


async def test_a_caller_that_reads_nothing_for_its_request_timeout_loses_its_requests() -> None:
    config = replace(CONFIG, request_timeout=0.5, channel_buffer=2)
    server = TcpServer(config)
    stopped: asyncio.Queue[str | None] = asyncio.Queue()

    async def firehose(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 60_000
        finally:
            await stopped.put(ctx.stop_reason)

    server.add_endpoint("firehose", firehose)
    await server.start()
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    try:
        sock.connect(server.address)
        sock.send(encode(Request(1, "firehose", b"")))
        started = time.monotonic()
        # Its queue fills at once; half a second later the request is stopped, long before
        # ZMTP heartbeats would drop the silent caller (3 s).
        reason = await asyncio.wait_for(stopped.get(), 2.5)
        assert reason == "disconnected"
        assert time.monotonic() - started < 2.5
        assert server.metrics.dropped() == {"stalled": 1}
        await eventually_async(lambda: server.inflight == 0)
    finally:
        sock.close(linger=0)
        zctx.term()
        await server.close()


async def test_a_peer_with_a_full_queue_delays_no_other() -> None:
    server = TcpServer(replace(CONFIG, channel_buffer=1))
    server.add_endpoint("echo", echo)
    await server.start()
    pump = server._pump
    assert pump is not None
    zctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    stalled = zctx.socket(zmq.DEALER)
    stalled.setsockopt(zmq.ROUTING_ID, HOSTILE)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    good = zctx.socket(zmq.DEALER)
    good.setsockopt(zmq.ROUTING_ID, b"good")
    try:
        for sock in (stalled, good):  # one round trip each: the worker knows both peers
            sock.connect(server.address)
            sock.send(encode(Request(0, "echo", b"hi")))
            await eventually_async(functools.partial(sock.poll, 0), what="the echo reply")
            sock.recv()

        def fill() -> bool:
            pump.put(HOSTILE, b"x" * 60_000, now=True)
            return HOSTILE in pump._blocked

        await eventually_async(fill, timeout=10, what="the stalled peer's ZeroMQ queue is full")
        # The good peer's frame is handed to ZeroMQ at once, not after the stalled peer's retry.
        pump.put(b"good", encode(Request(1, "x", b"")), now=True)
        assert pump.backlog(b"good") == 0
        assert pump.backlog(HOSTILE) > 0
    finally:
        stalled.close(linger=0)
        good.close(linger=0)
        zctx.term()
        await server.close()
