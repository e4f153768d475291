"""Malformed input straight at each plane's server: it stays up and serves everyone else.

Per plane, a few thousand seeded cases: random bytes, valid frames with bytes flipped or cut
short, msgpack of the wrong shape or types, frames that only a worker sends, requests for unknown
endpoints, cancels for unknown ids, duplicated ids and one message over the size limit.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import msgspec

from troupe import RequestContext
from troupe.messages import Cancel, Chunk, End, Error, Request, encode
from troupe.testing import eventually_async

from .conftest import TEST_LIMIT, Plane

CHECK_EVERY = 500
BATCH = 32  # cases in flight at once (for planes whose sends wait for an answer)


async def echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield payload


def _wrong_shapes(rng: random.Random) -> bytes:
    choices: list[object] = [
        ["req", rng.random(), "echo", b""],
        ["req", 1, 5, b""],
        ["req", 1, "echo", "text"],
        ["req", 1, "echo", b"", "soon"],
        ["req", 1, "echo", b"", None, {"k": 5}],
        ["req", 1, "echo", b"", None, {}, -1.5],
        ["req", [1], "echo", b""],
        ["cancel"],
        ["chunk", 1],
        {"id": 1, "endpoint": "echo"},
        [None, 1],
        "req",
        rng.randint(-(2**63), 2**63 - 1),
        [["req", 1, "echo", b""]] * 3,
        ["req", 1, "echo", b"", None, {}, 0, "extra", b"fields"],
    ]
    return msgspec.msgpack.encode(rng.choice(choices))


def fuzz_cases(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    valid = [
        encode(Request(1, "echo", b"hello")),
        encode(Request("s", "echo", b"x" * 100, time.time() + 60, {"h": "v"}, 1)),
        encode(Chunk(1, b"data")),
        encode(End(1)),
        encode(Error(1, "X", "y")),
        encode(Cancel(1)),
    ]
    cases: list[bytes] = []
    for i in range(count):
        kind = i % 8
        if kind == 0:
            cases.append(rng.randbytes(rng.randint(0, 64)))
        elif kind == 1:
            raw = bytearray(rng.choice(valid))
            for _ in range(rng.randint(1, 3)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            cases.append(bytes(raw))
        elif kind == 2:
            raw = rng.choice(valid)
            cases.append(raw[: rng.randrange(len(raw))])
        elif kind == 3:
            cases.append(_wrong_shapes(rng))
        elif kind == 4:
            cases.append(encode(rng.choice([Chunk(i, b"x"), End(i), Error(i, "K", "m")])))
        elif kind == 5:
            cases.append(encode(Request(i, rng.choice(["", "nope", "échø", "a" * 300]), b"")))
        elif kind == 6:
            cases.append(encode(Cancel(rng.choice([i, "ghost", -1]))))
        else:
            # Valid requests with colliding ids: answered, or refused as duplicates.
            cases.append(encode(Request(rng.randint(0, 3), "echo", rng.randbytes(8))))
    cases.insert(count // 2, b"\x00" * (TEST_LIMIT + 1024))  # over the size limit
    return cases


async def test_fuzz_server_stays_up_for_other_clients(plane: Plane) -> None:
    assert plane.raw is not None, f"{plane.name} needs a raw peer in the plane table"
    server = await plane.server()
    server.add_endpoint("echo", echo)
    client = plane.client()
    raw = await plane.raw(server)
    try:
        cases = fuzz_cases(seed=1234, count=plane.fuzz_cases)
        for start in range(0, len(cases), BATCH):
            await asyncio.gather(*(raw.send(case) for case in cases[start : start + BATCH]))
            if start % CHECK_EVERY < BATCH:
                stream = await client.request(server.address, "echo", str(start).encode())
                assert await asyncio.wait_for(stream.collect(), 10) == [str(start).encode()]
        # Several frames in one transport message, good and bad mixed.
        await raw.send_parts([b"\xc1", encode(Request(10**6, "echo", b"ok")), b""])
        # The server has read everything the raw peer sent once it answers this.
        await raw.roundtrip(10**7)
    finally:
        await raw.close()
    stream = await client.request(server.address, "echo", b"still here")
    assert await asyncio.wait_for(stream.collect(), 10) == [b"still here"]
    # Requests of the vanished raw peer end too (answered, or stopped when replies fail).
    await eventually_async(lambda: server.inflight == 0, what="the raw peer's requests ended")
