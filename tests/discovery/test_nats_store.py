"""The NATS store on real servers: key encoding, restarts, auth, keep-alives and the bucket."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js import api

from troupe.config import NatsConfig
from troupe.discovery import Delete, NatsStore, Put, Snapshot, Watch
from troupe.discovery._nats import decode_nats_key, encode_nats_key
from troupe.errors import DiscoveryError, DiscoveryUnavailable, LeaseLost
from troupe.testing import NatsServer, free_port

from ._helpers import WatchReader, is_put, wait_until

Readers = Callable[[Watch], WatchReader]
_VALID_KV_KEY = r"[-/_=.a-zA-Z0-9]+"


def bucket() -> str:
    return f"b{uuid.uuid4().hex[:8]}"


def test_keys_map_to_subject_tokens() -> None:
    assert encode_nats_key("/services/ns/comp/ep/694d98147d54be25") == (
        "=.services.ns.comp.ep.694d98147d54be25"
    )
    assert encode_nats_key("a.b/*/>") == "a=2Eb.=2A.=3E"
    assert encode_nats_key("x//y") == "x.=.y"
    assert encode_nats_key("é") == "=C3=A9"


@given(st.text(min_size=1).filter(lambda k: k.strip("/") != ""))
def test_key_encoding_round_trips_into_valid_kv_keys(key: str) -> None:
    encoded = encode_nats_key(key)
    assert decode_nats_key(encoded) == key
    assert not encoded.startswith(".")
    assert not encoded.endswith(".")
    assert ".." not in encoded
    assert re.fullmatch(_VALID_KV_KEY, encoded)


@pytest.mark.slow
async def test_a_restart_breaks_the_watch_and_the_store_recovers(
    fresh_nats_server: NatsServer, readers: Readers
) -> None:
    server = fresh_nats_server
    async with NatsStore(NatsConfig(server=server.url), bucket=bucket()) as store:
        await store.put("/services/a", b"1")
        first = readers(store.watch("/services"))
        await first.snapshot()

        server.stop()
        await first.ended.wait()
        assert isinstance(first.error, DiscoveryUnavailable)
        with pytest.raises(DiscoveryUnavailable):
            await store.put("/services/b", b"2")  # fails at once while disconnected

        server.start()

        async def reconnected() -> bool:
            try:
                await store.get("/services/a")
            except DiscoveryUnavailable:
                return False
            return True

        await wait_until(reconnected, what="the store reconnects")
        second = readers(store.watch("/services"))
        snapshot = await second.snapshot()
        assert [kv.key for kv in snapshot.items] == ["/services/a"]  # JetStream kept the data
        await store.put("/services/c", b"3")
        assert isinstance(await second.until(is_put("/services/c")), Put)


async def test_keep_alives_are_invisible_to_watchers(
    nats_server: NatsServer, readers: Readers
) -> None:
    async with NatsStore(NatsConfig(server=nats_server.url), bucket=bucket()) as store:
        watch = readers(store.watch("/k"))
        await watch.snapshot()
        lease = await store.grant_lease(5)
        await store.put("/k/leased", b"v", lease=lease)
        for _ in range(3):
            await store.keep_alive(lease)
        await store.put("/k/marker", b"m")
        events = [await watch.next(), await watch.next()]
        assert [(type(e), e.key) for e in events if not isinstance(e, Snapshot)] == [
            (Put, "/k/leased"),
            (Put, "/k/marker"),
        ]
        kv = await store.get("/k/leased")
        assert kv is not None
        assert kv.lease == lease


class _FrozenClock:
    """A clock that never moves: the store's own lease bookkeeping never sees the TTL pass."""

    def now(self) -> float:
        return 0.0


@pytest.mark.slow
async def test_keep_alive_notices_a_key_the_server_expired(
    nats_server: NatsServer, readers: Readers
) -> None:
    config = NatsConfig(server=nats_server.url)
    async with NatsStore(config, bucket=bucket(), clock=_FrozenClock()) as store:
        watch = readers(store.watch("/k"))
        await watch.snapshot()
        lease = await store.grant_lease(1)
        await store.put("/k/a", b"v", lease=lease)
        await watch.until(is_put("/k/a"))
        expired = await watch.until(lambda e: isinstance(e, Delete), timeout=4)
        assert isinstance(expired, Delete)
        assert expired.expired
        with pytest.raises(LeaseLost):
            await store.keep_alive(lease)


async def test_user_password_and_token_auth() -> None:
    with NatsServer(user="app", password="s3cret", jetstream=True) as server:
        good = NatsConfig(server=server.url, username="app", password="s3cret")
        async with NatsStore(good, bucket=bucket()) as store:
            await store.put("/a", b"1")
        bad = NatsStore(NatsConfig(server=server.url, username="app", password="nope",
                                   connect_timeout=1.0))  # fmt: skip
        with pytest.raises(DiscoveryError) as info:
            await bad.connect()
        assert "authorization" in str(info.value).lower()
        await bad.close()
    with NatsServer(token="t0ken") as server:
        async with NatsStore(NatsConfig(server=server.url, token="t0ken"), bucket=bucket()) as s:
            await s.put("/a", b"1")


async def test_a_bucket_without_ttl_support_is_refused(nats_server: NatsServer) -> None:
    name = bucket()
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().create_key_value(api.KeyValueConfig(bucket=name))
    finally:
        await nc.close()
    store = NatsStore(NatsConfig(server=nats_server.url), bucket=name)
    with pytest.raises(DiscoveryError) as info:
        await store.connect()
    assert "per-key TTL" in str(info.value)
    await store.close()


async def test_a_message_written_by_hand_is_bound_to_no_lease(
    nats_server: NatsServer, readers: Readers
) -> None:
    name = bucket()
    async with NatsStore(NatsConfig(server=nats_server.url), bucket=name) as store:
        watch = readers(store.watch("/k"))
        await watch.snapshot()
        nc = await nats.connect(nats_server.url)
        try:
            pre = f"$KV.{name}."
            js = nc.jetstream()
            # `nats kv put`, a lease header without a TTL (nothing expires it), and one that
            # names no lease: none is bound to a lease, and none breaks the watch.
            await js.publish(pre + encode_nats_key("/k/plain"), b"1")
            await js.publish(
                pre + encode_nats_key("/k/no-ttl"), b"2", headers={"Troupe-Lease": "42"}
            )
            await js.publish(
                pre + encode_nats_key("/k/garbage"),
                b"3",
                headers={"Troupe-Lease": "not-a-lease", "Nats-TTL": "60s"},
            )
        finally:
            await nc.close()
        for key in ("/k/plain", "/k/no-ttl", "/k/garbage"):
            event = await watch.until(is_put(key))
            assert isinstance(event, Put)
            assert event.kv.lease is None
        items, _ = await store.list("/k")
        assert [(kv.key, kv.lease) for kv in items] == [
            ("/k/garbage", None),
            ("/k/no-ttl", None),
            ("/k/plain", None),
        ]


async def test_errors_name_the_servers_without_their_credentials() -> None:
    port = free_port()
    config = NatsConfig(server=f"nats://bob:nats-url-pw@127.0.0.1:{port}", connect_timeout=0.5)
    store = NatsStore(config, bucket=bucket())
    with pytest.raises(DiscoveryUnavailable) as info:
        await store.connect()
    assert f"nats://****@127.0.0.1:{port}" in str(info.value)
    assert "nats-url-pw" not in str(info.value)
    assert "nats-url-pw" not in repr(info.value.endpoints)
    await store.close()
