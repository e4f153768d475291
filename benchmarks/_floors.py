"""Library floors: the request-plane exchanges written directly on each library, no troupe code.

Each floor is a server process and a client process, both children of the benchmark:

- ``zmq``: sync pyzmq ROUTER server; sync DEALER client (one request at a time for the round
  trip, a pipelined DEALER keeping 64 requests outstanding for throughput).
- ``nats``: nats-py on uvloop; the server answers ``msg.respond`` (streams publish 100 chunks to
  the request's reply inbox); the client uses ``nc.request`` (round trip, 64 tasks for
  throughput) and, for streams, one wildcard subscription ``<inbox>.*`` made once, each stream
  replying to its own subject under it (what troupe's nats client does too).
- ``http``: hypercorn (h2c, uvloop) serving a bare ASGI app; an ``httpx.AsyncClient`` speaking
  HTTP/2 with prior knowledge (the floor the issue names).
- ``h2`` (client only; its server is the ``http`` one): the plain ``h2`` state machine on an
  :class:`asyncio.Protocol`, one connection, every request a stream multiplexed on it — the
  library troupe's own HTTP/2 client is written on, so the strict floor for the http plane.

Run as ``python -m benchmarks._floors server KIND --port P [--nats URL]``: prints ``READY`` once
listening, serves until killed. ``python -m benchmarks._floors client KIND --port P ...``: reads
one JSON command per line on stdin (``{"op": "rtt"|"tp"|"stream", "n": N, "warm": W, "cap": S,
"pids": [...]}``), answers one JSON line: ``ops``, ``seconds``, ``cpu_s`` (this client plus the
given pids over the timed phase) and ``lat_us`` for ``rtt``. ``{"op": "quit"}`` ends it.

The wire format of every floor: a request whose first byte is ``S`` asks for a stream of 100
chunks of 64 bytes; anything else is echoed back as one reply.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from benchmarks._harness import process_cpu_seconds, self_cpu_seconds

STREAM_CHUNKS = 100
CHUNK_SIZE = 64
STREAM_MARK = b"S"
SUBJECT = "floor.echo"
PIPELINE = 64


def _chunk() -> bytes:
    return b"c" * CHUNK_SIZE


def _ready() -> None:
    print("READY", flush=True)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# --- servers ----------------------------------------------------------------------------------


def serve_zmq(port: int) -> None:
    """Sync ROUTER: echo, or 100 chunks (the last one marked by a second frame ``E``)."""
    import zmq  # noqa: PLC0415

    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.bind(f"tcp://127.0.0.1:{port}")
    _ready()
    chunk = _chunk()
    while True:
        ident, data = sock.recv_multipart()
        if data[:1] == STREAM_MARK:
            for _ in range(STREAM_CHUNKS - 1):
                sock.send_multipart([ident, chunk])
            sock.send_multipart([ident, chunk, b"E"])
        else:
            sock.send_multipart([ident, data])


async def _serve_nats(url: str) -> None:
    import nats  # noqa: PLC0415

    nc = await nats.connect(url, max_reconnect_attempts=0)
    chunk = _chunk()

    async def on_request(msg: Any) -> None:
        if msg.data[:1] == STREAM_MARK:
            for _ in range(STREAM_CHUNKS - 1):
                await nc.publish(msg.reply, chunk)
            await nc.publish(msg.reply, chunk, headers={"end": "1"})
        else:
            await msg.respond(msg.data)

    await nc.subscribe(SUBJECT, cb=on_request)
    await nc.flush()
    _ready()
    await asyncio.Event().wait()


def _asgi_app() -> Callable[..., Awaitable[None]]:
    chunk = _chunk()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while True:
                    message = await receive()
                    if message["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    elif message["type"] == "lifespan.shutdown":
                        await send({"type": "lifespan.shutdown.complete"})
                        return
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(b"content-type", b"application/octet-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if scope["path"] == "/stream":
            for _ in range(STREAM_CHUNKS):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await send({"type": "http.response.body", "body": bytes(body), "more_body": False})

    return app


async def _serve_http(port: int) -> None:
    from hypercorn.asyncio import serve  # noqa: PLC0415
    from hypercorn.config import Config  # noqa: PLC0415

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.keep_alive_max_requests = sys.maxsize  # the default (1,000) ends h2 connections
    # The default (5 s) closes a client's connection while the troupe repetition between two
    # floor runs keeps it idle; the plain h2 client does not reconnect.
    config.keep_alive_timeout = 3600
    config.accesslog = None
    config.errorlog = None
    config.include_date_header = False
    config.include_server_header = False
    config.h2_max_concurrent_streams = 1000
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def announce() -> None:
        # hypercorn binds before it starts serving; poll the port, then say READY.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            _ready()
            return

    announcer = asyncio.create_task(announce(), name="floor-http-announce")
    await serve(_asgi_app(), config, shutdown_trigger=stop.wait)
    await announcer


# --- clients ----------------------------------------------------------------------------------


class _Meter:
    """CPU of this process and the given pids over a timed phase."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.cpu0 = self._cpu()
        self.t0 = time.perf_counter()

    def _cpu(self) -> float:
        return self_cpu_seconds() + sum(process_cpu_seconds(pid) for pid in self.pids)

    def result(self, ops: int, **extra: Any) -> dict[str, Any]:
        seconds = time.perf_counter() - self.t0
        return {"ops": ops, "seconds": seconds, "cpu_s": self._cpu() - self.cpu0, **extra}


def _zmq_client(port: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    import zmq  # noqa: PLC0415

    ctx = zmq.Context(io_threads=1)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(f"tcp://127.0.0.1:{port}")
    payload = os.urandom(1024)

    def rtt(n: int, cap: float) -> tuple[int, list[float]]:
        lat: list[float] = []
        deadline = time.perf_counter() + cap
        clock = time.perf_counter
        for _ in range(n):
            t0 = clock()
            sock.send(payload)
            sock.recv()
            t1 = clock()
            lat.append((t1 - t0) * 1e6)
            if t1 > deadline:
                break
        return len(lat), lat

    def tp(n: int, cap: float) -> int:
        deadline = time.perf_counter() + cap
        sent = done = 0
        while sent < min(PIPELINE, n):
            sock.send(payload)
            sent += 1
        while done < sent:
            sock.recv()
            done += 1
            if sent < n and (done & 255 or time.perf_counter() < deadline):
                sock.send(payload)
                sent += 1
        return done

    def stream(n: int, cap: float) -> int:
        deadline = time.perf_counter() + cap
        chunks = 0
        for _ in range(n):
            sock.send(STREAM_MARK)
            while True:
                parts = sock.recv_multipart()
                chunks += 1
                if len(parts) > 1:
                    break
            if time.perf_counter() > deadline:
                break
        return chunks

    def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        op, n, cap = cmd["op"], int(cmd["n"]), float(cmd["cap"])
        warm = int(cmd.get("warm", 0))
        if op == "rtt":
            rtt(warm, cap)
            meter = _Meter(cmd["pids"])
            count, lat = rtt(n, cap)
            return meter.result(count, lat_us=lat)
        if op == "tp":
            tp(warm, cap)
            meter = _Meter(cmd["pids"])
            return meter.result(tp(n, cap))
        stream(max(1, warm // 100), cap)
        meter = _Meter(cmd["pids"])
        return meter.result(stream(n, cap))

    return handle


async def _timed_calls(call: Callable[[], Awaitable[object]], n: int, cap: float) -> list[float]:
    """Latencies (µs) of ``n`` calls made one at a time, stopping early after ``cap`` seconds."""
    lat: list[float] = []
    clock = time.perf_counter
    deadline = clock() + cap
    for _ in range(n):
        t0 = clock()
        await call()
        t1 = clock()
        lat.append((t1 - t0) * 1e6)
        if t1 > deadline:
            break
    return lat


async def _pipelined_calls(call: Callable[[], Awaitable[object]], n: int, cap: float) -> int:
    """``n`` calls from PIPELINE concurrent callers (fewer after ``cap`` seconds); how many ran."""
    deadline = time.perf_counter() + cap
    left = [n]
    done = [0]

    async def caller() -> None:
        while left[0] > 0 and time.perf_counter() < deadline:
            left[0] -= 1
            await call()
            done[0] += 1

    await asyncio.gather(*(caller() for _ in range(PIPELINE)))
    return done[0]


def _async_handler(
    loop: asyncio.AbstractEventLoop,
    rtt: Callable[[int, float], Awaitable[list[float]]],
    tp: Callable[[int, float], Awaitable[int]],
    stream: Callable[[int, float], Awaitable[int]],
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """One command handler for an asyncio floor client: warm up, then measure the timed phase."""

    def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        op, n, cap = cmd["op"], int(cmd["n"]), float(cmd["cap"])
        warm = int(cmd.get("warm", 0))
        run = loop.run_until_complete
        if op == "rtt":
            run(rtt(warm, cap))
            meter = _Meter(cmd["pids"])
            lat = run(rtt(n, cap))
            return meter.result(len(lat), lat_us=lat)
        if op == "tp":
            run(tp(warm, cap))
            meter = _Meter(cmd["pids"])
            return meter.result(run(tp(n, cap)))
        run(stream(max(1, warm // 100), cap))
        meter = _Meter(cmd["pids"])
        return meter.result(run(stream(n, cap)))

    return handle


def _nats_client(
    loop: asyncio.AbstractEventLoop, url: str
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    import nats  # noqa: PLC0415

    nc = loop.run_until_complete(nats.connect(url, max_reconnect_attempts=0))
    payload = os.urandom(1024)

    async def call() -> object:
        return await nc.request(SUBJECT, payload, timeout=10)

    async def rtt(n: int, cap: float) -> list[float]:
        return await _timed_calls(call, n, cap)

    async def tp(n: int, cap: float) -> int:
        return await _pipelined_calls(call, n, cap)

    # One wildcard subscription for every stream's replies (as troupe's nats client does); each
    # stream gets its own subject under it and a queue, found by subject.
    prefix = nc.new_inbox()
    queues: dict[str, asyncio.Queue[Any]] = {}

    async def on_chunk(msg: Any) -> None:
        queue = queues.get(msg.subject)
        if queue is not None:
            queue.put_nowait(msg)

    loop.run_until_complete(nc.subscribe(f"{prefix}.*", cb=on_chunk))
    streams_opened = [0]

    async def stream(n: int, cap: float) -> int:
        deadline = time.perf_counter() + cap
        chunks = 0
        for _ in range(n):
            streams_opened[0] += 1
            inbox = f"{prefix}.{streams_opened[0]}"
            queue: asyncio.Queue[Any] = asyncio.Queue()
            queues[inbox] = queue
            await nc.publish(SUBJECT, STREAM_MARK, reply=inbox)
            try:
                while True:
                    msg = await queue.get()  # bounded by the per-command timeout
                    chunks += 1
                    if msg.headers and msg.headers.get("end"):
                        break
            finally:
                del queues[inbox]
            if time.perf_counter() > deadline:
                break
        return chunks

    return _async_handler(loop, rtt, tp, stream)


def _http_client(
    loop: asyncio.AbstractEventLoop, port: int
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    import httpx  # noqa: PLC0415

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    client = httpx.AsyncClient(http1=False, http2=True, limits=limits, timeout=30)
    base = f"http://127.0.0.1:{port}"
    echo, streamed = f"{base}/echo", f"{base}/stream"
    payload = os.urandom(1024)

    async def call() -> object:
        return (await client.post(echo, content=payload)).raise_for_status()

    async def rtt(n: int, cap: float) -> list[float]:
        return await _timed_calls(call, n, cap)

    async def tp(n: int, cap: float) -> int:
        return await _pipelined_calls(call, n, cap)

    async def stream(n: int, cap: float) -> int:
        deadline = time.perf_counter() + cap
        streams = 0
        for _ in range(n):
            async with client.stream("POST", streamed, content=STREAM_MARK) as response:
                received = 0
                async for data in response.aiter_raw():
                    received += len(data)
            if received != STREAM_CHUNKS * CHUNK_SIZE:
                raise RuntimeError(f"http floor stream: got {received} bytes")
            streams += 1
            if time.perf_counter() > deadline:
                break
        # HTTP coalesces DATA frames; the server sent 100 chunks per stream.
        return streams * STREAM_CHUNKS

    return _async_handler(loop, rtt, tp, stream)


class _H2Connection(asyncio.Protocol):
    """One HTTP/2 connection on the bare ``h2`` state machine: POSTs multiplexed as streams.

    Received DATA is acknowledged at once (flow control never stalls a response); a request
    body waits for send window when there is none. Each request's future gets the response's
    body length once its stream ends.
    """

    def __init__(self, authority: bytes) -> None:
        import h2.config  # noqa: PLC0415
        import h2.connection  # noqa: PLC0415

        self._authority = authority
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self._pending: dict[int, tuple[asyncio.Future[int], list[int]]] = {}
        self._window: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        import h2.settings  # noqa: PLC0415

        self._transport = cast(asyncio.Transport, transport)
        self._conn.initiate_connection()
        self._conn.update_settings(
            {
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20,
            }
        )
        self._conn.increment_flow_control_window((1 << 24) - 65535)
        self._flush()

    def data_received(self, data: bytes) -> None:
        import h2.events  # noqa: PLC0415

        conn = self._conn
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                sid = event.stream_id or 0
                if event.flow_controlled_length:
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                entry = self._pending.get(sid)
                if entry is not None:
                    entry[1][0] += len(event.data or b"")
            elif isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers or ()).get(b":status")
                if status != b"200":
                    self._fail(event.stream_id or 0, f"status {status!r}")
            elif isinstance(event, h2.events.StreamEnded):
                entry = self._pending.pop(event.stream_id or 0, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(entry[1][0])
            elif isinstance(event, h2.events.StreamReset):
                self._fail(event.stream_id or 0, f"reset {event.error_code!r}")
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                if not self.ready.done():
                    self.ready.set_result(None)
                self._wake()
            elif isinstance(event, h2.events.WindowUpdated):
                self._wake()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.connection_lost(RuntimeError(f"GOAWAY {event.error_code!r}"))
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError(f"h2 floor: connection lost: {exc!r}"))
        self._pending.clear()

    def _fail(self, sid: int, why: str) -> None:
        entry = self._pending.pop(sid, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(RuntimeError(f"h2 floor: stream {sid}: {why}"))

    def _wake(self) -> None:
        if self._window is not None and not self._window.done():
            self._window.set_result(None)
        self._window = None

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)

    async def post(self, path: bytes, body: bytes) -> int:
        """POST ``body`` to ``path`` on a new stream; the response body's length."""
        conn = self._conn
        sid = conn.get_next_available_stream_id()
        future: asyncio.Future[int] = self._loop.create_future()
        self._pending[sid] = (future, [0])
        conn.send_headers(
            sid,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":authority", self._authority),
                (b":path", path),
                (b"content-length", b"%d" % len(body)),
            ],
        )
        sent = 0
        while sent < len(body):
            room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if room <= 0:
                self._flush()
                if self._window is None:
                    self._window = self._loop.create_future()
                await self._window
                continue
            piece = body[sent : sent + room]
            sent += len(piece)
            conn.send_data(sid, piece, end_stream=sent == len(body))
        if not body:
            conn.end_stream(sid)
        self._flush()
        return await future  # a hang is bounded by the benchmark's per-command timeout

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _h2_client(
    loop: asyncio.AbstractEventLoop, port: int
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The h2 floor: one plain ``h2`` connection to the hypercorn server, streams multiplexed."""

    async def connect() -> _H2Connection:
        _, protocol = await loop.create_connection(
            lambda: _H2Connection(f"127.0.0.1:{port}".encode()), "127.0.0.1", port
        )
        await asyncio.wait_for(protocol.ready, 10)
        return protocol

    conn = loop.run_until_complete(connect())
    payload = os.urandom(1024)

    async def call() -> object:
        got = await conn.post(b"/echo", payload)
        if got != len(payload):
            raise RuntimeError(f"h2 floor echo: got {got} bytes")
        return got

    async def rtt(n: int, cap: float) -> list[float]:
        return await _timed_calls(call, n, cap)

    async def tp(n: int, cap: float) -> int:
        return await _pipelined_calls(call, n, cap)

    async def stream(n: int, cap: float) -> int:
        deadline = time.perf_counter() + cap
        streams = 0
        for _ in range(n):
            received = await conn.post(b"/stream", STREAM_MARK)
            if received != STREAM_CHUNKS * CHUNK_SIZE:
                raise RuntimeError(f"h2 floor stream: got {received} bytes")
            streams += 1
            if time.perf_counter() > deadline:
                break
        return streams * STREAM_CHUNKS  # as for httpx: the server sent 100 chunks per stream

    return _async_handler(loop, rtt, tp, stream)


def _client_main(kind: str, port: int, nats_url: str | None) -> None:
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    if kind == "zmq":
        handle = _zmq_client(port)
    elif kind == "nats":
        assert nats_url is not None
        handle = _nats_client(loop, nats_url)
    elif kind == "h2":
        handle = _h2_client(loop, port)
    else:
        handle = _http_client(loop, port)
    _ready()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        print(json.dumps(handle(cmd)), flush=True)


def main(argv: list[str] | None = None) -> None:
    """``server KIND`` or ``client KIND`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks._floors")
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("kind", choices=("zmq", "nats", "http", "h2"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--nats", default=None)
    args = parser.parse_args(argv)
    if args.role == "client":
        _client_main(args.kind, args.port, args.nats)
        return
    if args.kind == "zmq":
        serve_zmq(args.port)
        return
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    if args.kind == "nats":
        loop.run_until_complete(_serve_nats(args.nats))
    else:
        loop.run_until_complete(_serve_http(args.port))


if __name__ == "__main__":
    main()
