"""The :class:`Router` handle: which instance serves the next request, and sending it there.

The Router (what users call) reads the current :class:`~troupe.actors.routing.RouterSnapshot`
without any mailbox hop (DESIGN §3), picks an instance with its
:class:`~troupe.actors.routing.Policy` (a table lookup), and streams the answer over the transport
named by the instance's address. It counts the requests in flight per instance for every caller
of the handle, which the policy sees. Its request loop, ``_run``, is the hot path; what it does
when an attempt fails (set aside, migrate, retry after ``Overloaded``) is decided in
:mod:`~troupe.actors.routing._retries`, and a caller off the runtime's I/O loop goes through the
bridge of :mod:`~troupe.actors.routing._bridge`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from typing import Any

from troupe._support._ioloop import IOLoop
from troupe.actors._actor import ActorRef
from troupe.actors.routing._actor import RouterMessage
from troupe.actors.routing._bridge import _Bridging, _Call
from troupe.actors.routing._policies import Policy, _validate
from troupe.actors.routing._retries import (
    MIGRATABLE,
    Resume,
    Retries,
    RouteObserver,
    _Rerouting,
    _Retry,
)
from troupe.actors.routing._snapshot import RoutedInstance, RouterSnapshot, SnapshotHolder
from troupe.errors import (
    ConfigError,
    IncompatibleInstances,
    InstanceNotFound,
    NoInstances,
    Overloaded,
    TroupeError,
)
from troupe.messages import WIRE_VERSION
from troupe.messages._payload import decode_payload, encode_payload
from troupe.transports import NetworkManager


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Router(_Rerouting, _Bridging):
    """Sends requests for one endpoint to its instances; safe to share between threads.

    Args:
        actor: the endpoint's RouterActor (told ``SetAside`` on failures).
        holder: the holder the actor publishes snapshots to.
        network: the clients, used only on ``io``.
        io: the runtime's I/O loop.
        endpoint: the endpoint's name on the request plane, ``"{namespace}.{component}.{name}"``.
        policy: a key of :data:`POLICIES`, or a :class:`Policy`.
        migration_limit: how many times a request whose instance fails (connect failure or a
            stream broken before its end) is re-sent to another instance.
        resume: called when a stream that already delivered chunks is migrated; see
            :data:`Resume`. Without it such a stream moves only to instances whose handler is
            resumable, and fails with :class:`~troupe.errors.StreamNotResumable` when none is.
        retries: how requests refused with ``Overloaded`` are retried, and how long a migration
            waits for a replacement instance (:class:`Retries`; default: each instance once,
            no wait).
        observer: told when a request is retried or migrated (e.g. to count them).
        rng: randomness of the ``random`` and ``least_loaded`` policies and of the pauses.
        set_aside_for: the actor's set-aside window; a failed instance is excluded by this
            handle at once, for at most that long, until the actor's snapshot excludes it.
        owned: actors stopped by :meth:`close` (the RouterActor and its watcher, when the
            router was built by :func:`spawn_router`).

    Raises:
        ConfigError: unknown policy or negative migration limit.
    """

    def __init__(
        self,
        actor: ActorRef[RouterMessage],
        holder: SnapshotHolder,
        network: NetworkManager,
        io: IOLoop,
        endpoint: str,
        *,
        policy: str | Policy = "round_robin",
        migration_limit: int = 0,
        resume: Resume | None = None,
        retries: Retries | None = None,
        observer: RouteObserver | None = None,
        rng: random.Random | None = None,
        owned: tuple[ActorRef[Any], ...] = (),
        set_aside_for: float = 5.0,
    ) -> None:
        factory = _validate(policy, migration_limit)
        if resume is not None and not callable(resume):
            raise ConfigError("resume", resume, "a callable resume(request, received) -> request")
        self._actor = actor
        self._holder = holder
        self._network = network
        self._io = io
        self.endpoint = endpoint
        self.policy = (
            policy if isinstance(policy, str) else getattr(policy, "name", type(policy).__name__)
        )
        self.migration_limit = migration_limit
        self.retries = retries if retries is not None else Retries()
        self._resume = resume
        self._observer = observer
        self._rng = rng or random.Random()
        self._policy = factory(self._rng)
        # Optional hooks of a policy that tracks what it sent (the KV policy's active blocks).
        self._started: Callable[[str, Any], Any] | None = getattr(self._policy, "started", None)
        self._finished: Callable[[Any], None] | None = getattr(self._policy, "finished", None)
        self._first_chunk: Callable[[Any], None] | None = getattr(self._policy, "first_chunk", None)
        self._inflight: dict[str, int] = {}  # written only on the I/O loop
        # Instances seen failing, until the actor's snapshot sets them aside (I/O loop only).
        self._down: dict[str, float] = {}
        self._set_aside_for = set_aside_for
        self._owned = owned
        self._bridged: set[concurrent.futures.Future[None]] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"<Router {self.endpoint} policy={self.policy} "
            f"instances={len(self._holder.current.instances)}>"
        )

    # --- instances -----------------------------------------------------------------------------

    @property
    def snapshot(self) -> RouterSnapshot:
        """The current snapshot (no mailbox hop)."""
        return self._holder.current

    @property
    def policy_object(self) -> Policy:
        """The :class:`Policy` that chooses (its state, e.g. a KV policy's index, is readable
        on the I/O loop)."""
        return self._policy

    @property
    def load(self) -> dict[str, int]:
        """Requests in flight per instance id (absent: none), over every caller of this router:
        what its policy sees (a copy)."""
        return dict(self._inflight)

    def instance_ids(self) -> list[str]:
        """The ids of every known instance (set-aside ones included), sorted."""
        return [i.instance_id for i in self._holder.current.instances]

    async def wait_for_instances(self, timeout: float | None = None) -> list[str]:
        """Wait until at least one instance is known; return the known ids.

        Raises:
            NoInstances: none appeared within ``timeout`` seconds.
            IncompatibleInstances: none appeared, but instances of another wire version did.
        """
        if await self.wait_for_snapshot(lambda s: bool(s.instances), timeout) is None:
            raise self._no_instances(self._holder.current)
        return self.instance_ids()

    async def wait_for_snapshot(
        self, predicate: Callable[[RouterSnapshot], bool], timeout: float | None = None
    ) -> RouterSnapshot | None:
        """Wait until a published snapshot satisfies ``predicate``; None after ``timeout``.

        Event-driven: ``predicate`` is checked now and after every snapshot the router's actor
        publishes (an instance joined, left, was set aside or came back), on the calling loop.
        """
        current = self._holder.current
        if predicate(current):
            return current
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(_resolve, woken)
            except RuntimeError:
                pass  # the waiting loop is closed; nobody is left to wake

        self._holder.add_listener(wake)
        try:
            async with asyncio.timeout(timeout):
                while not predicate(current := self._holder.current):
                    await woken
                    woken = loop.create_future()
        except TimeoutError:
            return None
        finally:
            self._holder.remove_listener(wake)
        return current

    def wait_for_instances_sync(self, timeout: float | None = None) -> list[str]:
        """Blocking :meth:`wait_for_instances`, for scripts (not from an event loop)."""
        if self._holder.wait_sync(lambda s: bool(s.instances), timeout) is None:
            raise self._no_instances(self._holder.current)
        return self.instance_ids()

    # --- requests ------------------------------------------------------------------------------

    def generate(
        self,
        request: Any,
        *,
        instance_id: str | None = None,
        deadline: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> AsyncGenerator[Any, None]:
        """Send ``request`` and yield the decoded chunks of the answer.

        Works from any event loop: on the runtime's I/O loop directly, elsewhere through a
        bridge. Closing the generator early, or cancelling the task iterating it, cancels the
        request (the worker's handler sees ``ctx.is_stopped()``). Nothing is sent before the
        first iteration.

        Args:
            request: any msgpack-encodable object.
            instance_id: route to this instance only (no migration).
            deadline: UNIX epoch seconds after which the answer is useless.
            headers: string metadata for the handler's context.

        Raises:
            NoInstances: no instance serves the endpoint (at the first iteration).
            IncompatibleInstances: the only instances (or ``instance_id``) speak another wire
                version (at the first iteration).
            InstanceNotFound: ``instance_id`` is not a known instance (at the first iteration).
            TransportError: the typed failure of the last attempt (``StreamBroken``,
                ``ConnectTimeout``, ``RequestTimeout``, ``RemoteError``, ...).
            Overloaded: the worker is at its admission limit.
        """
        if asyncio._get_running_loop() is self._io.loop:
            # On the I/O loop the answer is _run itself: no generator layer in between.
            return self._run(request, instance_id, deadline, headers)
        return self._generate_elsewhere(_Call(request, instance_id, deadline, headers))

    def generate_sync(
        self,
        request: Any,
        *,
        instance_id: str | None = None,
        deadline: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Iterator[Any]:
        """Blocking :meth:`generate` for scripts and threads; never call it from an event loop.

        Closing the iterator early (``break``, ``close()``) cancels the request.

        Raises:
            TroupeError: called from a thread running an event loop.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise TroupeError("generate_sync() called from an event loop; use generate()")
        self._check(instance_id)
        return self._generate_sync(_Call(request, instance_id, deadline, headers))

    def close(self, timeout: float = 5.0) -> None:
        """Cancel bridged requests in flight and stop the actors this router owns."""
        with self._lock:
            bridged = list(self._bridged)
        for fut in bridged:
            fut.cancel()
        for ref in self._owned:
            ref.stop(timeout=timeout)

    # --- internals -----------------------------------------------------------------------------

    def _check(self, instance_id: str | None) -> None:
        """Fail at once, on the caller's thread, when nothing can be routed to."""
        snapshot = self._holder.current
        if instance_id is not None:
            if instance_id not in snapshot.by_id:
                raise self._not_found(snapshot, instance_id)
        elif not snapshot.instances:
            raise self._no_instances(snapshot)

    def _no_instances(self, snapshot: RouterSnapshot) -> NoInstances:
        """The error for "nothing to route to": incompatible instances, if any, are named."""
        if snapshot.incompatible and not snapshot.instances:
            return IncompatibleInstances(self.endpoint, snapshot.incompatible, WIRE_VERSION)
        return NoInstances(self.endpoint)

    def _not_found(self, snapshot: RouterSnapshot, instance_id: str) -> NoInstances:
        """The error for a direct request to an instance that is not routable."""
        wire = snapshot.incompatible.get(instance_id)
        if wire is not None:
            return IncompatibleInstances(self.endpoint, {instance_id: wire}, WIRE_VERSION)
        return InstanceNotFound(self.endpoint, instance_id)

    def _pick(
        self,
        instance_id: str | None,
        retry: _Retry | None,
        request: Any = None,
        headers: Mapping[str, str] | None = None,
        resuming: bool = False,
    ) -> RoutedInstance:
        """The instance for the next attempt. ``resuming``: only resumable instances (a stream
        that delivered chunks moves on without a resume hook)."""
        snapshot = self._holder.current
        down = self._down
        if instance_id is None and retry is None and not down:
            candidates = snapshot.available
            if candidates:
                return self._policy.choose(candidates, self._inflight, request, headers)
        if instance_id is not None:
            target = snapshot.by_id.get(instance_id)
            if target is None:
                raise self._not_found(snapshot, instance_id)
            return target
        excluded = retry.tried if retry is not None else set()
        if resuming:
            return self._pick_resumable(snapshot, excluded, request, headers)
        candidates = snapshot.available
        if down:
            candidates = self._without_down(snapshot, candidates)
        if excluded:
            candidates = tuple(i for i in candidates if i.instance_id not in excluded)
        if not candidates:
            # Everything is set aside (or was tried): trying one beats failing outright.
            candidates = tuple(i for i in snapshot.instances if i.instance_id not in excluded)
            if not candidates:
                raise self._no_instances(snapshot)
        return self._policy.choose(candidates, self._inflight, request, headers)

    def _begin(self, key: str, request: Any) -> Any:
        """An attempt is sent to ``key``: count it, and tell a policy that tracks attempts."""
        inflight = self._inflight
        inflight[key] = inflight.get(key, 0) + 1
        return self._started(key, request) if self._started is not None else None

    def _end(self, key: str, token: Any) -> None:
        """The attempt :meth:`_begin` counted ended, however it ended."""
        inflight = self._inflight
        left = inflight[key] - 1
        if left:
            inflight[key] = left
        else:
            del inflight[key]
        if self._finished is not None:
            self._finished(token)

    def _without_down(
        self, snapshot: RouterSnapshot, candidates: tuple[RoutedInstance, ...]
    ) -> tuple[RoutedInstance, ...]:
        """``candidates`` less the instances this handle saw fail and the actor has not set
        aside yet (its snapshot follows a mailbox hop later; under load, requests picked in
        between would go to the dead instance too). Forgets those the snapshot now covers."""
        down = self._down
        now = time.monotonic()
        for key, until in list(down.items()):
            if until <= now or key in snapshot.set_aside or key not in snapshot.by_id:
                del down[key]
        if not down:
            return candidates
        return tuple(i for i in candidates if i.instance_id not in down)

    def _pick_resumable(
        self,
        snapshot: RouterSnapshot,
        tried: set[str],
        request: Any,
        headers: Mapping[str, str] | None,
    ) -> RoutedInstance:
        candidates = tuple(
            i for i in snapshot.available if i.instance_id not in tried and i.record.resumable
        )
        if not candidates:
            candidates = tuple(
                i for i in snapshot.instances if i.instance_id not in tried and i.record.resumable
            )
        if not candidates:
            raise self._no_instances(snapshot)
        return self._policy.choose(candidates, self._inflight, request, headers)

    async def _run(
        self,
        request: Any,
        instance_id: str | None,
        deadline: float | None,
        headers: dict[str, str] | None,
    ) -> AsyncGenerator[Any, None]:
        """On the I/O loop: choose, send, stream; skip instances that answer ``Overloaded``
        before any chunk (as :attr:`retries` allows); migrate on instance failures, continuing
        (never repeating) a stream that already delivered chunks."""
        payload: bytes | None = None
        retry: _Retry | None = None  # created on the first failure: most requests never fail
        attempt = 0
        received = 0  # chunks yielded to the caller, over every attempt
        hook = self._resume is not None
        held: list[Any] | None = [] if hook and self.migration_limit else None
        sent_received = 0  # what the current attempt's handler is told it may skip
        current = request  # what this attempt sends: the resume hook's rewrite after a move
        while True:
            target = self._pick(instance_id, retry, current, headers, received > 0 and not hook)
            if payload is None:
                payload = encode_payload(request)
            key = target.instance_id
            token = self._begin(key, current)
            before = received
            try:
                try:
                    stream = await self._network.client_for(target.address).request(
                        target.address,
                        self.endpoint,
                        payload,
                        deadline=deadline,
                        headers=headers,
                        attempt=attempt,
                        received=sent_received,
                    )
                    first_chunk = self._first_chunk  # told once per attempt, then dropped
                    try:
                        async for chunk in stream:
                            value = decode_payload(chunk)
                            if first_chunk is not None:
                                first_chunk(token)  # the prefill is done there
                                first_chunk = None
                            received += 1
                            if held is not None:
                                held.append(value)
                            yield value
                    finally:
                        stream.close()
                    return
                except Overloaded as exc:
                    # Refused at admission (full, or draining): nothing was generated there.
                    if received != before or instance_id is not None:
                        raise
                    retry = _Retry.after(retry, key, refused=True)
                    await self._retry_refused(exc, retry, received > 0 and not hook)
                except MIGRATABLE as exc:
                    self._set_aside(key)
                    retry = _Retry.after(retry, key)
                    if instance_id is not None or attempt >= self.migration_limit:
                        raise
                    await self._move(exc, target, retry.tried, received)
                    attempt += 1
                    current, payload, sent_received = self._resent(request, payload, held, received)
            finally:
                self._end(key, token)
