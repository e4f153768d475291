"""The NATS request plane against a hostile neighbour on the same NATS server: nobody reads,
injects into or cancels another caller's requests.

With the documented permissions (a user per role, each caller on its own inbox prefix) the
server itself refuses the neighbour's subscriptions and injected replies, and the worker ignores
its forged cancel. On a server without permissions the plane's own checks still drop an injected
reply (the caller accepts replies only on the unguessable subject it chose for the request) and
a forged cancel (the worker wants the request's cancel key, which only its caller holds).
"""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nkeys
import pytest
from nats.aio.client import Client as RawNats
from nats.aio.msg import Msg

from troupe import RequestContext
from troupe._support._nats import tls_context
from troupe.config import NatsConfig
from troupe.errors import ConfigError, TransportError
from troupe.messages import Cancel, Chunk, Request, encode
from troupe.testing import NatsServer, eventually_async, make_tls_files
from troupe.testing._nats_server import NatsUser
from troupe.testing._tls import issue_client_cert
from troupe.transports.nats import NatsRpcClient, NatsRpcServer
from troupe.transports.nats._subjects import reply_token

from . import _nats

_WAIT = 10.0


class Story:
    """A handler that yields ``alpha``, waits for :attr:`release`, then ``beta`` and ``gamma``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.stop_reason: str | None = None

    async def __call__(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"alpha"
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.stop_reason = ctx.stop_reason
            raise
        yield b"beta"
        yield b"gamma"


class Gate(_nats.Gate):
    """:class:`_nats.Gate` served as endpoint ``name``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class Neighbour:
    """A raw nats-py connection that records what it receives and the errors the server sends."""

    def __init__(self) -> None:
        self.nc: RawNats | None = None
        self.received: list[Msg] = []
        self.errors: list[str] = []

    async def connect(self, url: str, **options: object) -> Neighbour:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(url, error_cb=on_error, **options)  # type: ignore[arg-type]
        return self

    async def on_msg(self, msg: Msg) -> None:
        self.received.append(msg)

    def violations(self, word: str) -> int:
        return sum(f"permissions violation for {word}" in e.lower() for e in self.errors)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


@pytest.fixture(scope="module")
def guarded_nats() -> Iterator[NatsServer]:
    """A nats-server with the documented permissions: one worker user, two callers."""
    users = [
        NatsUser.worker("worker", "worker-pw"),
        NatsUser.caller("alice", "alice-pw", inbox_prefix="_INBOX.alice"),
        NatsUser.caller("mallory", "mallory-pw", inbox_prefix="_INBOX.mallory"),
    ]
    with NatsServer(users=users, jetstream=False) as server:
        yield server


def _config(url: str, user: str | None = None, prefix: str = "_INBOX") -> NatsConfig:
    return NatsConfig(
        server=url,
        username=user,
        password=f"{user}-pw" if user else None,
        inbox_prefix=prefix,
        connect_timeout=2.0,
        request_timeout=_WAIT,
    )


async def _own_request_then_cancel(
    mallory: RawNats, worker: NatsRpcServer, prefix: str, gate: Gate, subject: str
) -> None:
    """Mallory's own request, cancelled properly on ``subject`` from the connection that sent
    the forgeries there: once its handler stops, the worker has handled every message Mallory
    published to ``subject`` before."""
    key = secrets.token_bytes(16)
    reply = f"{prefix}.{secrets.token_hex(8)}.1.{reply_token(key)}"
    first = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        first.set()

    await mallory.subscribe(reply, cb=on_reply)
    await mallory.publish(worker.subject, encode(Request(1, gate.name, b"")), reply=reply)
    await asyncio.wait_for(first.wait(), _WAIT)  # running: a cancel now finds it
    headers = {"Troupe-Cancel-Key": key.hex()}
    await mallory.publish(subject, encode(Cancel(1)), reply=reply, headers=headers)
    await mallory.flush()
    await asyncio.wait_for(gate.stopped.wait(), _WAIT)


async def test_with_permissions_a_neighbour_reads_injects_and_cancels_nothing(
    guarded_nats: NatsServer,
) -> None:
    story, gate = Story(), Gate("gate")
    url = guarded_nats.url
    mallory = await Neighbour().connect(url, user="mallory", password="mallory-pw")
    assert mallory.nc is not None
    async with (
        NatsRpcServer(_config(url, "worker")) as worker,
        NatsRpcClient(_config(url, "alice", "_INBOX.alice")) as alice,
    ):
        worker.add_endpoint("story", story)
        worker.add_endpoint("gate", gate)
        await worker.start()
        try:
            # Reading: every subject that would show requests or replies is refused.
            for subject in ("troupe.rpc.>", worker.subject, "_INBOX.>", "_INBOX.alice.>", ">"):
                await mallory.nc.subscribe(subject, cb=mallory.on_msg)
            await eventually_async(
                lambda: mallory.violations("subscription") >= 5, what="5 refused subscriptions"
            )
            assert alice._inbox == ""  # connects on first use, under its own prefix
            stream = await alice.request(worker.address, "story", b"secret prompt")
            assert alice._inbox.startswith("_INBOX.alice.")
            assert await anext(stream) == b"alpha"
            # Injecting, even on the exact reply subject (as if it had leaked): refused.
            rid = next(iter(alice._session.streams))
            reply = alice._reply(rid)
            await mallory.nc.publish(reply, encode(Chunk(rid, b"INJECTED")))
            await eventually_async(
                lambda: mallory.violations("publish") >= 1, what="the refused injection"
            )
            # Cancelling: callers may publish cancels, but a forged one lacks the request's key.
            await mallory.nc.publish(worker.subject + ".ctl", encode(Cancel(rid)), reply=reply)
            await _own_request_then_cancel(
                mallory.nc, worker, "_INBOX.mallory", gate, worker.subject + ".ctl"
            )
            assert story.stop_reason is None
            story.release.set()
            assert [chunk async for chunk in stream] == [b"beta", b"gamma"]
            assert mallory.received == []
        finally:
            await mallory.close()


async def test_without_permissions_injected_chunks_and_forged_cancels_are_dropped(
    nats_server: NatsServer,
) -> None:
    story, gate, gate2 = Story(), Gate("gate"), Gate("gate2")
    url = nats_server.url
    mallory = await Neighbour().connect(url)
    assert mallory.nc is not None
    async with NatsRpcServer(_config(url)) as worker, NatsRpcClient(_config(url)) as alice:
        worker.add_endpoint("story", story)
        worker.add_endpoint("gate", gate)
        worker.add_endpoint("gate2", gate2)
        await worker.start()
        seen: list[Msg] = []
        got = asyncio.Event()

        async def on_request(msg: Msg) -> None:
            seen.append(msg)
            got.set()

        try:
            # An open server: Mallory reads the request (permissions are what stop that).
            await mallory.nc.subscribe(worker.subject, cb=on_request)
            await mallory.nc.flush()
            stream = await alice.request(worker.address, "story", b"")
            assert await anext(stream) == b"alpha"
            await asyncio.wait_for(got.wait(), _WAIT)
            reply = seen[0].reply
            rid = next(iter(alice._session.streams))
            # Injecting blind, from the inbox (which the server's monitoring lists) and the
            # sequential id: the subjects the plane used before, and a guessed token.
            inbox = alice._inbox
            forged = [f"{inbox}{rid}", f"{inbox}{rid}.{secrets.token_hex(16)}", f"{inbox}x"]
            for subject in forged:
                await mallory.nc.publish(subject, encode(Chunk(rid, b"INJECTED")))
            await mallory.nc.flush()
            await eventually_async(
                lambda: alice._session.dropped.unexpected >= len(forged),
                what="the injected chunks dropped",
            )
            # Cancelling with the request's exact subject and id, read off the wire: no key, or
            # a wrong one, and the worker ignores it.
            await mallory.nc.publish(worker.subject + ".ctl", encode(Cancel(rid)), reply=reply)
            await mallory.nc.publish(
                worker.subject + ".ctl",
                encode(Cancel(rid)),
                reply=reply,
                headers={"Troupe-Cancel-Key": secrets.token_hex(16)},
            )
            await mallory.nc.publish(worker.subject, encode(Cancel(rid)), reply=reply)
            for sentinel, subject in ((gate, worker.subject + ".ctl"), (gate2, worker.subject)):
                await _own_request_then_cancel(mallory.nc, worker, "_INBOX", sentinel, subject)
            assert story.stop_reason is None
            story.release.set()
            assert [chunk async for chunk in stream] == [b"beta", b"gamma"]
        finally:
            await mallory.close()


async def test_the_caller_still_cancels_its_own_request(nats_server: NatsServer) -> None:
    story = Story()
    async with (
        NatsRpcServer(_config(nats_server.url)) as worker,
        NatsRpcClient(_config(nats_server.url)) as alice,
    ):
        worker.add_endpoint("story", story)
        await worker.start()
        stream = await alice.request(worker.address, "story", b"")
        assert await anext(stream) == b"alpha"
        await stream.aclose()
        await eventually_async(lambda: story.stop_reason == "cancelled", what="the cancel")


async def test_an_inbox_prefix_the_user_is_not_granted_is_one_clear_error(
    guarded_nats: NatsServer,
) -> None:
    url = guarded_nats.url
    async with (
        NatsRpcServer(_config(url, "worker")) as worker,
        NatsRpcClient(_config(url, "alice", "_INBOX.mallory")) as alice,
    ):
        await worker.start()

        # The refusal comes at connect, or a moment later (nats-py reads the server's -ERR in
        # its own time): the request then fails on its stream, never by a timeout.
        async def ask() -> None:
            stream = await alice.request(worker.address, "story", b"")
            async with asyncio.timeout(5):
                async for _ in stream:
                    pass

        with pytest.raises(TransportError, match="DYN_NATS_INBOX_PREFIX"):
            await ask()
        with pytest.raises(TransportError, match="DYN_NATS_INBOX_PREFIX"):  # and at once after
            await alice.request(worker.address, "story", b"")


async def test_tls_with_a_client_certificate(tmp_path_factory: pytest.TempPathFactory) -> None:
    files = make_tls_files(tmp_path_factory.mktemp("tls"))
    story = Story()
    with NatsServer(tls=files, verify=True, jetstream=False) as server:
        good = NatsConfig(
            server=server.url,
            tls_ca_file=files.ca,
            tls_client_cert_file=files.client_cert,
            tls_client_key_file=files.client_key,
            connect_timeout=2.0,
        )
        async with NatsRpcServer(good) as worker, NatsRpcClient(good) as cli:
            worker.add_endpoint("story", story)
            await worker.start()
            stream = await cli.request(worker.address, "story", b"")
            assert await anext(stream) == b"alpha"
            story.release.set()
            assert [chunk async for chunk in stream] == [b"beta", b"gamma"]
        # No client certificate, or an expired one: refused, one typed line.
        cert, key = issue_client_cert(files, tmp_path_factory.mktemp("old"), "old", expired=True)
        for config in (
            NatsConfig(server=server.url, tls_ca_file=files.ca, connect_timeout=2.0),
            NatsConfig(
                server=server.url,
                tls_ca_file=files.ca,
                tls_client_cert_file=cert,
                tls_client_key_file=key,
                connect_timeout=2.0,
            ),
        ):
            with pytest.raises(TransportError):
                await NatsRpcServer(config).start()


async def test_tls_asked_for_but_the_server_is_plaintext(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    files = make_tls_files(tmp_path)
    config = NatsConfig(server=nats_server.url, tls_ca_file=files.ca, connect_timeout=2.0)
    with pytest.raises(TransportError, match="does not speak TLS"):
        await NatsRpcServer(config).start()


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NATS_TLS_CLIENT_CERT_PATH"):
        tls_context(NatsConfig(tls_client_cert_file=str(tmp_path / "client.crt")))
    with pytest.raises(ConfigError, match="DYN_NATS_INBOX_PREFIX"):
        NatsConfig(inbox_prefix="_INBOX.>")
    with pytest.raises(ConfigError, match="NATS_TLS_CA_CERT_PATH"):
        tls_context(NatsConfig(tls_ca_file=str(tmp_path / "missing.crt")))


async def test_an_nkey_without_the_nkeys_package_is_one_clear_error(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nkeys" else real(name, *a)
    )
    config = NatsConfig(server=nats_server.url, nkey_seed="SUAnotarealseed", connect_timeout=2.0)
    with pytest.raises(ConfigError, match=r"NATS_AUTH_NKEY.*nkeys"):
        await NatsRpcServer(config).start()


async def test_nkey_users_sign_in_with_their_seed() -> None:
    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER).decode()
    public = nkeys.from_seed(bytearray(seed.encode())).public_key.decode()
    stranger = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER).decode()
    with NatsServer(users=[NatsUser("", "", nkey=public)], jetstream=False) as server:
        config = NatsConfig(server=server.url, nkey_seed=seed, connect_timeout=2.0)
        story = Story()
        story.release.set()
        async with NatsRpcServer(config) as worker, NatsRpcClient(config) as caller:
            worker.add_endpoint("story", story)
            await worker.start()
            stream = await caller.request(worker.address, "story", b"")
            assert [chunk async for chunk in stream] == [b"alpha", b"beta", b"gamma"]
        refused = NatsConfig(server=server.url, nkey_seed=stranger, connect_timeout=2.0)
        with pytest.raises(TransportError, match="refused"):
            await NatsRpcServer(refused).start()
