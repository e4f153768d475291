"""LeaseActor: one discovery lease per runtime, kept alive, and re-taken when lost.

The actor owns the lease and the set of keys registered under it. Keep-alives run as a task on
the I/O loop every TTL/3, so a busy mailbox can never starve them. Unlike the reference system
(which shuts the whole process down when its lease is lost), a lost lease — revoked, or the store
unreachable for longer than the TTL — makes the actor take a new lease and re-register every key
(same keys, so the same instance id), retrying with backoff until the store answers again. A key
write that fails with ``DiscoveryUnavailable`` (the store unreachable, or busy with conflicting
writes) is retried with the same backoff while the lease holds. A clean stop revokes the lease, so
the keys vanish at once instead of at TTL expiry.

States (``LeaseState``), as a table of what moves the actor between them::

    granting --granted--> alive --lost--> granting (after backoff)   --stop--> revoked
    granting --grant failed--> granting (after backoff)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
from typing import Any, Literal

import msgspec

from troupe._support._logging import get_logger
from troupe.actors._actor import Actor, ActorRef, ExitReason, Reply
from troupe.actors._supervisor import Backoff
from troupe.discovery import KeyValueStore
from troupe.errors import DiscoveryError, DiscoveryUnavailable, LeaseLost, TroupeError

__all__ = ["LeaseActor", "LeaseInfo", "LeaseState", "Register", "Status", "Unregister"]

LeaseState = Literal["granting", "alive", "revoked"]

_log = get_logger("troupe.actors.lease")


class Register(msgspec.Struct, frozen=True, tag=True):
    """Ask: write ``key`` = ``value`` bound to the lease (now, and again after every re-grant).

    The reply (``None``) comes once the key is written. ``DiscoveryUnavailable`` is retried
    with backoff (the asker waits, up to its own timeout); another store error is raised in the
    asker.
    """

    key: str
    value: bytes


class Unregister(msgspec.Struct, frozen=True, tag=True):
    """Ask: delete ``key`` and stop re-registering it; answers whether it was registered."""

    key: str


class Status(msgspec.Struct, frozen=True, tag=True):
    """Ask: the lease's :class:`LeaseInfo`."""


class LeaseInfo(msgspec.Struct, frozen=True):
    """The lease as the actor sees it."""

    state: LeaseState
    lease_id: int | None
    keys: tuple[str, ...]
    grants: int


class _Granted(msgspec.Struct, frozen=True, tag=True):
    lease: int | None
    error: BaseException | None


class _Written(msgspec.Struct, frozen=True, tag=True):
    key: str
    lease: int
    error: BaseException | None


class _Rewrite(msgspec.Struct, frozen=True, tag=True):
    key: str
    lease: int


class _Lost(msgspec.Struct, frozen=True, tag=True):
    lease: int
    reason: str


class _Regrant(msgspec.Struct, frozen=True, tag=True):
    pass


class _Deleted(msgspec.Struct, frozen=True, tag=True):
    reply: Reply
    error: BaseException | None


LeaseMessage = (
    Register | Unregister | Status | _Granted | _Written | _Rewrite | _Lost | _Regrant | _Deleted
)


class LeaseActor(Actor[LeaseMessage]):
    """Holds the runtime's lease on ``store`` and keeps its keys registered.

    Args:
        store: a connected store, used only on the runtime's I/O loop.
        ttl: lease TTL in seconds (``DYN_LEASE_TTL``); keep-alive every ``ttl / 3``.
        backoff: delays between failed grant attempts, and between retries of a key write
            that failed with ``DiscoveryUnavailable``.
    """

    def __init__(
        self,
        store: KeyValueStore,
        ttl: float,
        *,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        self._store = store
        self._ttl = ttl
        self._backoff = backoff or Backoff(min=0.2, max=min(5.0, max(ttl, 0.2)), jitter=0.2)
        self._rng = rng or random.Random()
        self._state: LeaseState = "granting"
        self._lease: int | None = None
        self._keys: dict[str, bytes] = {}
        self._waiting: dict[str, list[Reply]] = {}
        self._failures = 0
        self._write_failures: dict[str, int] = {}  # key -> unavailable writes in a row
        self._grants = 0
        self._keepalive: concurrent.futures.Future[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def started(self) -> None:
        self._grant()

    def stopped(self, reason: ExitReason, error: BaseException | None) -> None:
        self._state = "revoked"
        self._stop_keepalive()
        lease, self._lease = self._lease, None
        for replies in self._waiting.values():
            for reply in replies:
                reply.fail(TroupeError("lease actor stopped before the key was written"))
        if lease is None:
            return
        try:
            self.system.io_loop().run(self._store.revoke_lease(lease), timeout=max(1.0, self._ttl))
            _log.info("lease revoked", lease=lease, keys=len(self._keys))
        except (DiscoveryError, TimeoutError, concurrent.futures.TimeoutError) as exc:
            _log.warning(
                "lease not revoked; its keys expire after the TTL", lease=lease, error=str(exc)
            )

    # --- messages ------------------------------------------------------------------------------

    def receive(self, message: LeaseMessage) -> Any:
        match message:
            case Register(key=key, value=value):
                self._keys[key] = value
                self._waiting.setdefault(key, []).append(self.defer())
                if self._state == "alive" and self._lease is not None:
                    self._write(key, self._lease)
            case Unregister(key=key):
                known = self._keys.pop(key, None) is not None
                self._write_failures.pop(key, None)
                for reply in self._waiting.pop(key, []):
                    reply.fail(TroupeError(f"{key} was unregistered before it was written"))
                if not known:
                    return False
                reply = self.defer()
                self.run_io(self._store.delete(key), lambda f: _Deleted(reply, f.exception()))
            case _Deleted(reply=reply, error=error):
                if error is None:
                    reply.set(True)
                else:
                    reply.fail(error)
            case Status():
                return LeaseInfo(self._state, self._lease, tuple(self._keys), self._grants)
            case _Granted(lease=lease, error=error):
                self._on_granted(lease, error)
            case _Written(key=key, lease=lease, error=error):
                self._on_written(key, lease, error)
            case _Rewrite(key=key, lease=lease):
                if self._state == "alive" and lease == self._lease and key in self._keys:
                    self._write(key, lease)
            case _Lost(lease=lease, reason=reason):
                if lease == self._lease:
                    _log.warning(
                        "lease lost; re-granting and re-registering",
                        lease=lease,
                        reason=reason,
                        keys=len(self._keys),
                    )
                    self._lease = None
                    self._stop_keepalive()
                    self._grant()
            case _Regrant():
                if self._state == "granting" and self._lease is None:
                    self._grant()
        return None

    # --- transitions ---------------------------------------------------------------------------

    def _grant(self) -> None:
        self._state = "granting"
        self.run_io(
            self._store.grant_lease(self._ttl),
            lambda f: (
                _Granted(None, f.exception()) if f.exception() else _Granted(f.result(), None)
            ),
        )

    def _on_granted(self, lease: int | None, error: BaseException | None) -> None:
        if error is not None or lease is None:
            self._failures += 1
            delay = self._backoff.delay(self._failures, self._rng)
            _log.warning("lease grant failed; retrying", error=str(error), retry_in=round(delay, 3))
            self.send_after(delay, _Regrant())
            return
        self._failures = 0
        self._grants += 1
        self._lease = lease
        self._state = "alive"
        _log.info("lease granted", lease=lease, ttl=self._ttl, keys=len(self._keys))
        self._keepalive = self.system.io_loop().submit(self._keep_alive_loop(lease))
        for key in self._keys:
            self._write(key, lease)

    def _write(self, key: str, lease: int) -> None:
        value = self._keys[key]
        self.run_io(
            self._store.put(key, value, lease=lease),
            lambda f: _Written(key, lease, f.exception()),
        )

    def _on_written(self, key: str, lease: int, error: BaseException | None) -> None:
        if lease != self._lease:
            return  # an older lease's write; the current lease rewrites every key itself
        if isinstance(error, LeaseLost):
            self.ref.tell(_Lost(lease, "lease lost while writing"))
            return
        if isinstance(error, DiscoveryUnavailable) and key in self._keys:
            failures = self._write_failures.get(key, 0) + 1
            self._write_failures[key] = failures
            delay = self._backoff.delay(failures, self._rng)
            _log.warning(
                "registration write failed; retrying",
                key=key,
                error=str(error),
                retry_in=round(delay, 3),
            )
            self.send_after(delay, _Rewrite(key, lease))
            return
        self._write_failures.pop(key, None)
        replies = self._waiting.pop(key, []) if key in self._keys else []
        for reply in replies:
            if error is None:
                reply.set(None)
            else:
                reply.fail(error)
        if error is not None:
            _log.warning("registration write failed", key=key, error=str(error))

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    async def _keep_alive_loop(self, lease: int) -> None:
        """Runs on the I/O loop: refresh every TTL/3; report a lost lease to the actor."""
        ref: ActorRef[Any] = self.ref
        loop = asyncio.get_running_loop()
        interval = self._ttl / 3.0
        last_ok = loop.time()
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(self._store.keep_alive(lease), timeout=interval)
                last_ok = loop.time()
                continue
            except LeaseLost as exc:
                reason = str(exc)
            except (DiscoveryError, TimeoutError) as exc:
                if loop.time() - last_ok <= self._ttl:
                    _log.warning("keep-alive failed; will retry", lease=lease, error=str(exc))
                    continue
                reason = f"store unreachable for longer than the TTL ({exc})"
            if ref.is_alive():
                ref.tell(_Lost(lease, reason))
            return
