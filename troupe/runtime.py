"""The Runtime: wires one process together.

A :class:`Runtime` owns the actor system, the asyncio I/O loop thread that owns every socket, the
clock, the discovery store with the process's one lease (opened on first use), and (in later
layers) the request-plane server. Use it as a context manager; leaving the block,
:meth:`Runtime.close`, SIGINT or SIGTERM stop everything: actors in reverse start order (the
LeaseActor revokes the lease, so registered keys vanish at once), the store, then the loop, with
every thread joined. What the runtime says about itself (the ``troupe status`` answer, the
status server's health report) is computed in :mod:`troupe._runtime_status`.
"""

from __future__ import annotations

import os
import threading
import types
from collections.abc import Callable
from typing import Any, TypeVar

from troupe._fleet import WorkerFleet
from troupe._handlers import handler_spec
from troupe._introspect import STATUS_ENDPOINT, ProcessLabel, status_handler
from troupe._kv_routing import kv_router
from troupe._runtime_events import open_runtime_event_plane
from troupe._runtime_status import describe_process, health_report
from troupe._shutdown import Shutdown
from troupe._status import StatusServer
from troupe._support._clock import Clock, SystemClock
from troupe._support._ioloop import IOLoop
from troupe._support._logging import configure_logging, get_logger
from troupe._support._metrics import RuntimeMetrics
from troupe.actors import Actor, ActorRef, ActorSystem, Backoff, Intensity
from troupe.actors._lease import LeaseActor, Register, Unregister
from troupe.actors._worker import Health, WorkerActor
from troupe.actors.routing import Policy, Resume, Router, spawn_router
from troupe.actors.routing._kv import KvRouterSettings
from troupe.config import Config
from troupe.discovery import KeyValueStore, MemoryKvServer, open_store
from troupe.errors import TroupeError
from troupe.events import EventPlane
from troupe.kv import KvPublisher, open_kv_events
from troupe.messages import InstanceRecord, encode_record, new_instance_id
from troupe.messages._endpoint import Endpoint, Namespace, parse_endpoint
from troupe.transports import NetworkManager, Server, is_resumable

__all__ = ["Runtime"]

M = TypeVar("M")

_log = get_logger("troupe.runtime")


class Runtime:
    """One per process (several may coexist in tests): actors, I/O loop, planes.

    Args:
        config: the resolved configuration; :meth:`from_env` reads it from the environment.
        clock: injected time (tests); a system clock owned by the runtime if omitted.
        handle_signals: install SIGINT/SIGTERM handlers while running in the main thread.
        memory_server: the shared state behind ``DYN_KV_STORE=memory`` stores (lets several
            runtimes in one process discover each other).
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        handle_signals: bool = True,
        memory_server: MemoryKvServer | None = None,
        label: ProcessLabel | None = None,
    ) -> None:
        self.config = config if config is not None else Config()
        self.label = label
        """A supervisor's name for this process (its log lines and ``troupe status`` show it)."""
        self.instance_id = new_instance_id()
        """16 lower-case hex digits, stable for the life of the runtime (the process)."""
        self._memory_server = memory_server
        self._store: KeyValueStore | None = None
        self._event_plane: EventPlane | None = None
        self._lease: ActorRef[Any] | None = None
        self._network: NetworkManager | None = None
        self._server: Server | None = None
        self._routers: list[Router] = []
        self._workers: dict[str, ActorRef[Health]] = {}
        self._limits: dict[str, int] = {}  # endpoint path -> its own admission limit
        self._fleets: list[WorkerFleet] = []
        self._failure: BaseException | None = None  # a fleet that gave up (spawn_workers)
        self.status: StatusServer | None = None
        """The system status server, when ``DYN_SYSTEM_PORT`` >= 0."""
        self._owns_clock = clock is None
        self.clock: Clock = clock if clock is not None else SystemClock("troupe-clock")
        self.io = IOLoop("troupe-io")
        self.system = ActorSystem("troupe", clock=self.clock, io_loop=self.io)
        self.metrics = RuntimeMetrics(now=self.clock.now)
        """This runtime's Prometheus metrics (its own registry)."""
        self._handle_signals = handle_signals
        self._shutdown = Shutdown()
        self._state = "new"
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **kwargs: Any) -> Runtime:
        """Build a runtime from ``DYN_*`` / ``ETCD_*`` / ``NATS_*`` / ``POD_*`` variables.

        Raises:
            ConfigError: a variable has an invalid value (named in the message).
        """
        return cls(Config.from_env(environ), **kwargs)

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``new``, ``running`` or ``closed``."""
        return self._state

    def start(self) -> Runtime:
        """Configure logging, start the I/O loop and install signal handlers."""
        with self._lock:
            if self._state != "new":
                raise TroupeError(f"runtime cannot start from state {self._state}")
            self._state = "running"
        configure_logging(self.config.log, label=None if self.label is None else self.label.label)
        self.io.start()
        if self.config.system.enabled:
            status = StatusServer(self.config.system, self.metrics, lambda: health_report(self))
            try:
                self.io.run(status.start(), timeout=10)
            except BaseException:
                self.io.stop()
                with self._lock:
                    self._state = "closed"
                raise
            self.status = status  # it logs "status server listening" itself, once
        if self._handle_signals:
            self._shutdown.install()
        if self.config.unknown:
            _log.warning(
                "ignoring unknown DYN_* variables (typos?)",
                variables=sorted(self.config.unknown),
            )
        _log.debug("runtime started", plane=self.config.request_plane.plane)
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop actors (reverse start order), the I/O loop and the clock; join every thread."""
        with self._lock:
            if self._state == "closed":
                return
            was_running = self._state == "running"
            self._state = "closed"
        self._shutdown.request()
        if was_running:
            for router in self._routers:
                router.close(timeout=timeout)
            self.system.shutdown(timeout=timeout)  # workers drain; the LeaseActor revokes
            closing: tuple[tuple[str, Any], ...] = (
                ("status server", self.status),
                ("event plane", self._event_plane),
                ("request plane", self._server),
                ("request plane", self._network),
                ("discovery store", self._store),
            )
            for what, part in closing:
                if part is not None:
                    try:
                        self.io.run(part.close(), timeout=timeout)
                    except (TroupeError, TimeoutError) as exc:
                        _log.warning(f"{what} did not close cleanly", error=str(exc))
            self.io.stop(timeout=timeout)
        if self._owns_clock:
            self.clock.close()
        self._shutdown.restore()
        _log.debug("runtime closed")

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.close()

    # --- shutdown requests ---------------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Ask a :meth:`wait_for_shutdown` caller to return (thread-safe)."""
        self._shutdown.request()

    def wait_for_shutdown(self, timeout: float | None = None) -> bool:
        """Block until SIGINT/SIGTERM, :meth:`request_shutdown` or :meth:`close`.

        Returns ``True`` if shutdown was requested, ``False`` on timeout.

        Raises:
            SupervisorEscalation: the supervisor of :meth:`spawn_workers` gave up.
        """
        requested = self._shutdown.wait(timeout)
        if self._failure is not None:
            raise self._failure
        return requested

    # --- discovery ---------------------------------------------------------------------------

    @property
    def store(self) -> KeyValueStore:
        """The discovery store (``DYN_DISCOVERY_BACKEND`` / ``DYN_KV_STORE``), connected on
        first use.

        Raises:
            DiscoveryUnavailable: the store cannot be reached (names the endpoints).
        """
        self._require_running()
        if self._store is None:
            discovery = self.config.discovery
            store = open_store(
                discovery, self.config.nats, clock=self.clock, memory_server=self._memory_server
            )
            self.io.run(store.connect())
            self._store = store
        return self._store

    @property
    def event_plane(self) -> EventPlane:
        """The event plane (``DYN_EVENT_PLANE``), connected on first use (docs/events.md).
        Raises ConnectionLost when NATS cannot be reached."""
        self._require_running()
        with self._lock:
            if self._event_plane is None:  # the lock: one connection, however many callers
                lease = self._lease_actor() if self.config.events.plane == "zmq" else None
                self._event_plane = open_runtime_event_plane(self, lease)
            return self._event_plane

    def _lease_actor(self) -> ActorRef[Any]:
        if self._lease is None or not self._lease.is_alive():
            store, ttl = self.store, self.config.discovery.lease_ttl
            self._lease = self.system.spawn(lambda: LeaseActor(store, ttl), name="LeaseActor")
        return self._lease

    def register(
        self,
        namespace: str,
        component: str,
        endpoint: str,
        transport: dict[str, str],
        metadata: dict[str, Any] | None = None,
        *,
        timeout: float = 10.0,
        resumable: bool = False,
    ) -> InstanceRecord:
        """Publish this process's instance of an endpoint under the runtime's lease.

        The key is ``/services/{namespace}/{component}/{endpoint}/{instance_id}``; it is kept
        alive with the lease, re-written if the lease is lost and re-taken, and removed at once
        by :meth:`unregister` or :meth:`close`. ``resumable`` advertises a handler that
        continues migrated streams (:func:`~troupe.transports.resumable`).
        """
        record = InstanceRecord.create(
            namespace,
            component,
            endpoint,
            instance_id=self.instance_id,
            transport=transport,
            metadata=metadata,
            resumable=resumable,
        )
        self._lease_actor().ask(Register(record.key, encode_record(record)), timeout=timeout)
        return record

    def unregister(self, record: InstanceRecord, *, timeout: float = 10.0) -> bool:
        """Remove a registration made by :meth:`register`; True if it was registered."""
        if self._lease is None or not self._lease.is_alive():
            return False
        return bool(self._lease.ask(Unregister(record.key), timeout=timeout))

    # --- the request plane -------------------------------------------------------------------

    @property
    def network(self) -> NetworkManager:
        """Clients for every plane (picked by address scheme) and the server factory."""
        if self._network is None:
            self._network = NetworkManager(self.config.request_plane, self.config.nats)
        return self._network

    def server(self) -> Server:
        """This process's request-plane server (``DYN_REQUEST_PLANE``), started on first use."""
        self._require_running()
        if self._server is None:
            server = self.network.create_server()
            worker = self.config.worker
            server.limit(worker.max_inflight, worker.max_inflight_per_caller)
            self.metrics.add_server(self.network.plane, server.metrics)
            server.add_endpoint(STATUS_ENDPOINT, status_handler(lambda: describe_process(self)))

            async def start() -> None:
                await server.start()

            self.io.run(start(), timeout=30)
            self._server = server
        return self._server

    def namespace(self, name: str) -> Namespace:
        """``rt.namespace("ns").component("c").endpoint("e")``; names are validated."""
        return Namespace(name)

    def endpoint(self, path: str) -> Endpoint:
        """``rt.endpoint("ns.c.e")`` or ``"dyn://ns.c.e"``; a malformed path is a ConfigError."""
        return parse_endpoint(path)

    def serve(
        self,
        endpoint: str | Endpoint,
        handler: Callable[..., Any],
        *,
        max_inflight: int | None = None,
        grace: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ActorRef[Health]:
        """Serve ``handler`` for ``endpoint``; returns the WorkerActor's ref once it serves.

        The handler takes ``(request, ctx)`` and is an async or sync function or generator. The
        instance is registered in discovery once the server listens, and unregistered first when
        the worker stops (``ref.stop()``, :meth:`close`, SIGTERM); requests in flight then get
        ``grace`` seconds (``DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS``) to finish. A handler
        marked :func:`~troupe.transports.resumable` is advertised as able to continue streams
        migrated from a failed instance.
        """
        ep = parse_endpoint(endpoint)
        worker_config = self.config.worker
        server = self.server()
        self._lease_actor()  # started before the worker, so it outlives it at shutdown
        plane = self.network.plane
        can_resume = is_resumable(handler)

        def register(ep: Endpoint, address: str) -> InstanceRecord:
            return self.register(
                ep.namespace,
                ep.component,
                ep.name,
                {plane: address},
                metadata,
                resumable=can_resume,
            )

        worker = self.system.spawn(
            lambda: WorkerActor(
                ep,
                handler,
                server=server,
                io=self.io,
                register=register,
                unregister=self.unregister,
                max_inflight=worker_config.max_inflight if max_inflight is None else max_inflight,
                grace=worker_config.graceful_shutdown_timeout if grace is None else grace,
                metrics=self.metrics.endpoint(ep.namespace, ep.component, ep.name),
            ),
            name=f"WorkerActor-{ep.path}",
        )
        # The ask is handled after started(): once it answers, the endpoint is installed and
        # registered. A worker that failed to start raises ActorDead (the cause attached).
        worker.ask(Health(), timeout=30)
        self._workers[ep.path] = worker
        self._limits[ep.path] = worker_config.max_inflight if max_inflight is None else max_inflight
        return worker

    def router(
        self,
        endpoint: str | Endpoint,
        *,
        policy: str | Policy = "round_robin",
        migration_limit: int = 0,
        set_aside_for: float = 5.0,
        instance_filter: Callable[[InstanceRecord], bool] | None = None,
        resume: Resume | None = None,
        kv: KvRouterSettings | None = None,
    ) -> Router:
        """A router over the live instances of ``endpoint``, fed by a WatcherActor.

        Policies: ``round_robin``, ``random``, ``least_loaded``, ``kv`` (KV-aware, tuned by
        ``kv``; it follows the workers' KV events unless ``kv.approximate``: see docs/routing.md)
        or a :class:`~troupe.actors.routing.Policy`; ``generate(..., instance_id=...)`` sends
        to one instance directly. An instance that refuses or fails
        a connection or breaks a stream is set aside for ``set_aside_for`` seconds; one that
        answers ``Overloaded`` before any chunk is skipped for the next. With
        ``migration_limit=k`` a broken request is re-sent to another instance up to k times; a
        stream that already delivered chunks continues there (never repeats): the new instance's
        handler, if :func:`~troupe.transports.resumable`, skips ``ctx.received`` chunks, or
        ``resume(request, received_chunks)`` rewrites the request. ``instance_filter`` limits
        the router to the records it accepts (e.g. one model's instances). See docs/routing.md.
        """
        self._require_running()
        if policy == "kv":
            return kv_router(
                self,
                parse_endpoint(endpoint),
                kv,
                migration_limit=migration_limit,
                set_aside_for=set_aside_for,
                instance_filter=instance_filter,
                resume=resume,
            )
        router = spawn_router(
            self.system,
            self.store,
            self.network,
            self.io,
            parse_endpoint(endpoint),
            policy=policy,
            migration_limit=migration_limit,
            set_aside_for=set_aside_for,
            instance_filter=instance_filter,
            resume=resume,
        )
        self._routers.append(router)
        return router

    def spawn_workers(
        self,
        endpoint: str | Endpoint,
        handler: Callable[..., Any] | str,
        processes: int = 2,
        *,
        max_inflight: int | None = None,
        model: str | None = None,
        intensity: Intensity | None = None,
        backoff: Backoff | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        ready_timeout: float | None = 60.0,
    ) -> ActorRef[Any]:
        """Start ``processes`` worker processes serving ``handler`` under a supervisor; return
        its ref (ask it ``WhichChildren()``) once every one of them serves.

        Each process runs ``troupe worker`` with this runtime's configuration; the handler must be
        importable by a fresh interpreter (a module-level function, or a ``"module:function"`` /
        ``"path/to/file.py:function"`` string). With a fixed ``DYN_TCP_RPC_PORT`` or
        ``DYN_HTTP_RPC_PORT`` (8888 by default), worker ``i`` serves on port + ``i``; with
        ``DYN_SYSTEM_PORT``, this process's ``/health`` is ready only while every worker serves.
        A worker that crashes after it served is restarted (``one_for_one``, ``intensity``,
        ``backoff``); if the supervisor gives up, every worker is stopped and
        :meth:`wait_for_shutdown` raises :class:`~troupe.errors.SupervisorEscalation`. All stop
        with this runtime (SIGTERM: unregister, drain). With ``log_dir``, worker ``n`` writes to
        ``log_dir/worker-n.log`` (appended). See docs/actors.md, "Worker processes".

        Raises:
            ConfigError: ``processes`` < 1, or the ports would pass 65535 (nothing started).
            StartFailed: a worker failed before it served (a port in use, the store unreachable;
                ``detail`` is its own error), or not all served within ``ready_timeout`` seconds
                (None: no limit). It is not restarted, and no worker is left running.
        """
        self._require_running()
        ep = parse_endpoint(endpoint)
        command = ["worker", ep.path, handler_spec(handler)]
        if max_inflight is not None:
            command += ["--max-inflight", str(max_inflight)]
        if model is not None:
            command += ["--model", model]
        fleet = WorkerFleet(self.config, ep, command, processes, log_dir=log_dir)
        # Listed before it starts: /health says "starting" for it from now on, never a ready
        # process with no endpoint while the workers are being launched.
        self._fleets.append(fleet)
        try:
            supervisor = fleet.start(self.system, intensity=intensity, backoff=backoff)
            fleet.wait_ready(ready_timeout)
        except BaseException:  # a start failure, a timeout, or a signal unwinding the caller
            fleet.stop()
            self._fleets.remove(fleet)
            raise
        fleet.on_failure(self._fleet_failed)
        return supervisor

    def _fleet_failed(self, error: BaseException) -> None:
        """A fleet's supervisor gave up: wake :meth:`wait_for_shutdown`, which raises it."""
        with self._lock:
            if self._state != "running" or self._failure is not None:
                return
            self._failure = error
        _log.debug("worker processes gave up", error=str(error))  # the supervisor logged it
        self._shutdown.request()

    def kv_events(
        self, endpoint: str | Endpoint, *, block_size: int = 16, plane: EventPlane | None = None
    ) -> KvPublisher:
        """Publish this worker's KV-cache events for ``endpoint``'s component and serve its
        ``kv_events_query`` endpoint (``kv_block_size`` in its record); see docs/kv-events.md."""
        return open_kv_events(self, endpoint, block_size=block_size, plane=plane)

    # --- actors --------------------------------------------------------------------------------

    def spawn(self, factory: Callable[[], Actor[M]], *, name: str | None = None) -> ActorRef[M]:
        """Start a top-level actor in this runtime's actor system."""
        self._require_running()
        return self.system.spawn(factory, name=name)

    def _require_running(self) -> None:
        if self._state != "running":
            raise TroupeError("runtime is not running; use `with Runtime(...) as rt:`")
