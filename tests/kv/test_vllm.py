"""The vLLM adapter: vLLM's frames (built from its schema, sent from a real PUB socket) in,
troupe KV events out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from tests.kv._vllm_schema import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    MapBlockRemoved,
    MapBlockStored,
    MapKVEventBatch,
    frames,
)
from troupe.errors import ConfigError
from troupe.events import EventScope, MemoryEventPlane
from troupe.kv import KvPublisher, VllmKvEventsAdapter, block_hashes
from troupe.testing._wait import eventually_async

SCOPE = EventScope("ns", "vllm")
WORKER = "00000000000000cc"
PROMPT = list(range(1000, 1012))  # three blocks of 4


@pytest.fixture
async def publisher() -> AsyncIterator[KvPublisher]:
    plane = MemoryEventPlane()
    publisher = await KvPublisher.open(plane, SCOPE, WORKER, block_size=4)
    yield publisher
    await publisher.close()
    await plane.close()


def stored(
    hashes: list[int], parent: int | None, tokens: list[int], medium: str = "GPU"
) -> BlockStored:
    return BlockStored(hashes, parent, tokens, 4, None, medium)


async def test_frames_from_a_real_pub_socket_become_troupe_events(publisher: KvPublisher) -> None:
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.XPUB)  # an XPUB sees the subscription arrive: no slow-joiner sleep
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    adapter = VllmKvEventsAdapter(publisher, f"tcp://127.0.0.1:{port}", topic="kv")
    await adapter.start()
    try:
        async with asyncio.timeout(5):
            assert await pub.recv() == b"\x01kv"
        batches = [
            KVEventBatch(1.0, [stored([71, 72], None, PROMPT[:8])]),
            KVEventBatch(2.0, [stored([73], 72, PROMPT[8:]), BlockRemoved([71], "GPU")]),
            KVEventBatch(3.0, [stored([81], None, [1, 2, 3, 4])], data_parallel_rank=1),
            KVEventBatch(4.0, [AllBlocksCleared()], data_parallel_rank=1),
        ]
        for sequence, batch in enumerate(batches):
            await pub.send_multipart(frames(sequence, batch, topic=b"kv"))
        await eventually_async(lambda: publisher.last_event_id == 5, what="five events")
    finally:
        await adapter.close()
        pub.close(linger=0)
        ctx.term()
    ours = block_hashes(PROMPT, 4)
    assert publisher.indexer.blocks(0) == set(ours[1:])  # 71 -> ours[0] removed
    assert publisher.indexer.blocks(1) == set()
    assert adapter.counters.batches == 4
    assert adapter.counters.events == 5
    assert (adapter.counters.malformed, adapter.counters.orphaned) == (0, 0)


async def test_the_map_encoding_and_byte_hashes_of_later_vllm_releases(
    publisher: KvPublisher,
) -> None:
    adapter = VllmKvEventsAdapter(publisher, "tcp://127.0.0.1:1")
    first = MapBlockStored([b"\x01" * 32, b"\x02" * 32], None, PROMPT[:8], 4, None, None, None)
    adapter.feed(frames(0, MapKVEventBatch(1.0, [first])))
    adapter.feed(frames(1, MapKVEventBatch(2.0, [MapBlockRemoved([b"\x02" * 32], None)])))
    assert publisher.indexer.blocks() == {block_hashes(PROMPT, 4)[0]}
    assert adapter.counters.malformed == 0


async def test_what_cannot_be_translated_is_counted_and_dropped(publisher: KvPublisher) -> None:
    adapter = VllmKvEventsAdapter(publisher, "tcp://127.0.0.1:1")
    adapter.feed([b"", b"\x00" * 8])  # two frames
    adapter.feed([b"", b"\x00" * 4, b""])  # a short sequence number
    adapter.feed([b"", (0).to_bytes(8, "big"), b"\xc1garbage"])
    adapter.feed(frames(1, KVEventBatch(1.0, [BlockStored([1], None, [1, 2, 3], 3, None, None)])))
    adapter.feed(frames(2, KVEventBatch(1.0, [stored([1], None, [1, 2, 3])])))  # 3 tokens, 1 block
    assert adapter.counters.malformed == 5
    adapter.feed(frames(3, KVEventBatch(1.0, [stored([2], 99, [1, 2, 3, 4])])))  # unknown parent
    assert adapter.counters.orphaned == 1
    adapter.feed(frames(4, KVEventBatch(1.0, [stored([3], None, [1, 2, 3, 4], medium="CPU")])))
    adapter.feed(frames(5, KVEventBatch(1.0, [BlockRemoved([42], None)])))  # never stored
    assert adapter.counters.ignored == 2
    adapter.feed(frames(9, KVEventBatch(1.0, [])))  # 6 .. 8 lost
    assert adapter.counters.sequence_gaps == 1
    assert publisher.last_event_id == 0  # nothing reached the publisher
    adapter.feed(frames(10, KVEventBatch(1.0, [stored([4], None, [5, 6, 7, 8])])))
    assert publisher.indexer.blocks() == set(block_hashes([5, 6, 7, 8], 4))


async def test_a_bad_address_is_a_config_error(publisher: KvPublisher) -> None:
    adapter = VllmKvEventsAdapter(publisher, "nowhere")
    with pytest.raises(ConfigError, match="vLLM KV events address"):
        await adapter.start()
    await adapter.close()
