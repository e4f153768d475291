"""The ``file`` store: a directory (``DYN_FILE_KV``) shared by the processes of one host.

Layout (one flat directory of key files, a shared ``.revision`` counter taken with ``flock`` by
every write, temporary files and tombstones): see :mod:`troupe.discovery._file_format`.

Leases: a lease is the owning process's set of files plus the TTL written in each file's header.
A file is bound to its lease only with both in its header: a file written by hand (no header, or
no TTL) reports no lease, and routers ignore it.
:meth:`FileStore.keep_alive` refreshes the files' mtime; every connected store runs a reaper that
deletes files whose mtime is older than their TTL, so a crashed process's keys disappear within
TTL plus one reap interval. Watches poll the directory (inotify is not in the standard library):
a watch may merge several writes to one key between two polls into the last one
(``exact_history`` is False), but never misses the final state. Expiry is judged by wall-clock
file times; the lease owner also checks its own (injected, monotonic) clock and reports
``LeaseLost`` once it has not refreshed for a TTL.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import fcntl
import os
import secrets
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field

import msgspec

from troupe._support._logging import get_logger
from troupe.config import FileKvConfig
from troupe.discovery._file_format import (
    _LITTER_TTL,
    _MAGIC,
    _REVISION_FILE,
    _REVISION_WIDTH,
    _TMP_PREFIX,
    _TOMB_PREFIX,
    _Entry,
    _fingerprint,
    _Header,
    _header_decoder,
    _Seen,
    _stale,
    _Tomb,
    _tomb_decoder,
    decode_file_name,
    encode_file_name,
)
from troupe.discovery._store import (
    Delete,
    KeyValue,
    KeyValueStore,
    MonotonicClock,
    Put,
    Snapshot,
    TimeSource,
    WatchEvent,
    check_key,
    key_matches,
    normalize_prefix,
)
from troupe.errors import DiscoveryError, DiscoveryUnavailable, KeyExists, LeaseLost

__all__ = ["FileStore", "decode_file_name", "encode_file_name"]

_log = get_logger(__name__)


@dataclass
class _FileLease:
    ttl: float
    refreshed: float
    keys: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (inode, revision)


class FileStore(KeyValueStore):
    """A :class:`KeyValueStore` in a directory shared by the processes of one host.

    Args:
        config: the directory (``DYN_FILE_KV``); created if missing.
        clock: time source for the owner's own lease bookkeeping (default: monotonic).
        poll_interval: seconds between directory scans of a watch.
        reap_interval: seconds between scans for expired files.
    """

    name = "file"
    exact_history = False

    def __init__(
        self,
        config: FileKvConfig | None = None,
        *,
        clock: TimeSource | None = None,
        poll_interval: float = 0.05,
        reap_interval: float = 0.2,
    ) -> None:
        self.root = (config if config is not None else FileKvConfig()).path
        self._clock: TimeSource = clock if clock is not None else MonotonicClock()
        self._poll_interval = poll_interval
        self._reap_interval = reap_interval
        self._rev_fd: int | None = None
        self._leases: dict[int, _FileLease] = {}
        self._header_cache: dict[str, tuple[int, int, _Header]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    @property
    def endpoints(self) -> tuple[str, ...]:
        return (self.root,)

    # --- lifecycle --------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._rev_fd is not None:
            return
        try:
            os.makedirs(self.root, exist_ok=True)
            self._rev_fd = os.open(
                os.path.join(self.root, _REVISION_FILE), os.O_RDWR | os.O_CREAT, 0o644
            )
        except OSError as exc:
            raise self._unavailable(f"cannot open the directory: {exc}") from exc
        self._closed = asyncio.Event()
        self._reaper = asyncio.create_task(self._reap_loop(), name="FileStore-reaper")

    async def close(self) -> None:
        self._closed.set()
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
        fd, self._rev_fd = self._rev_fd, None
        if fd is not None:
            os.close(fd)

    # --- leases -----------------------------------------------------------------------------------

    async def grant_lease(self, ttl: float) -> int:
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0, got {ttl!r}")
        self._require_open()
        lease = secrets.randbits(63) or 1
        self._leases[lease] = _FileLease(ttl, self._clock.now())
        return lease

    async def keep_alive(self, lease: int) -> None:
        self._require_open()
        state = self._live_lease(lease)
        state.refreshed = self._clock.now()
        for key, (ino, rev) in list(state.keys.items()):
            path = self._path(key)
            try:
                if os.stat(path).st_ino == ino:
                    os.utime(path)
                    continue
            except FileNotFoundError:
                tomb = self._read_tomb(key)
                if tomb is not None and tomb.expired and tomb.rev > rev:
                    del self._leases[lease]
                    raise LeaseLost(lease, f"{key} expired") from None
            except OSError as exc:
                raise self._unavailable(f"cannot refresh {key}: {exc}") from exc
            del state.keys[key]  # overwritten or deleted by someone else: no longer ours

    async def revoke_lease(self, lease: int) -> None:
        self._require_open()
        state = self._leases.pop(lease, None)
        if state is None:
            return
        with self._locked():
            for key, (ino, _) in sorted(state.keys.items()):
                path = self._path(key)
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_ino == ino:
                        self._remove_locked(key, expired=True)

    def _live_lease(self, lease: int) -> _FileLease:
        state = self._leases.get(lease)
        if state is None:
            raise LeaseLost(lease, "expired or revoked")
        if self._clock.now() - state.refreshed > state.ttl:
            del self._leases[lease]
            raise LeaseLost(lease, f"not refreshed for more than its TTL of {state.ttl:g} s")
        return state

    # --- keys -------------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        return self._write(check_key(key), bytes(value), lease, create=False)

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        return self._write(check_key(key), bytes(value), lease, create=True)

    def _write(self, key: str, value: bytes, lease: int | None, *, create: bool) -> int:
        self._require_open()
        path = self._path(key)
        with self._locked():
            state = self._live_lease(lease) if lease is not None else None
            if create:
                existing = self._read(path)
                if existing is not None:
                    if not _stale(existing.stat.st_mtime_ns, existing.header.ttl, time.time()):
                        raise KeyExists(key)
                    self._remove_locked(key, expired=True)
            rev = self._bump_locked()
            header = _Header(rev, lease, state.ttl if state is not None else None)
            tmp = self._write_tmp(_MAGIC + msgspec.json.encode(header) + b"\n" + value)
            try:
                if create:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        raise KeyExists(key) from None
                else:
                    os.replace(tmp, path)
                ino = os.stat(path).st_ino
            except OSError as exc:
                raise self._error(f"cannot write {key}", exc) from exc
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        self._forget(key)
        if state is not None:
            state.keys[key] = (ino, rev)
        return rev

    async def get(self, key: str) -> KeyValue | None:
        self._require_open()
        key = check_key(key)
        entry = self._read(self._path(key))
        if entry is None or _stale(entry.stat.st_mtime_ns, entry.header.ttl, time.time()):
            return None
        return KeyValue(key, entry.value, entry.header.rev, entry.header.bound_lease)

    async def delete(self, key: str) -> bool:
        self._require_open()
        key = check_key(key)
        self._forget(key)
        with self._locked():
            entry = self._read(self._path(key))
            if entry is None:
                return False
            expired = _stale(entry.stat.st_mtime_ns, entry.header.ttl, time.time())
            self._remove_locked(key, expired=expired)
            return not expired

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        self._require_open()
        prefix = normalize_prefix(prefix)
        with self._locked():
            items = self._load(prefix)
            return [kv for kv, _ in items], self._read_rev()

    # --- watch ------------------------------------------------------------------------------------

    async def _watch(self, prefix: str) -> AsyncGenerator[WatchEvent, None]:
        self._require_open()
        closed = self._closed
        with self._locked():
            items = self._load(prefix)
            revision = self._read_rev()
        known = {kv.key: seen for kv, seen in items}
        yield Snapshot(tuple(kv for kv, _ in items), revision)
        last = revision
        while not closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed.wait(), self._poll_interval)
            if closed.is_set():
                return
            for polled in self._poll(prefix, known):
                # Deletes noticed without a tombstone get the counter as revision: keep the
                # stream's revisions non-decreasing.
                event = polled
                if isinstance(event, Delete) and event.revision < last:
                    event = Delete(event.key, last, event.expired)
                last = max(last, event.revision)
                yield event

    def _poll(self, prefix: str, known: dict[str, _Seen]) -> builtins.list[WatchEvent]:
        counter = self._read_rev()
        now = time.time()
        present: set[str] = set()
        events: list[WatchEvent] = []
        for key, st in self._scan(prefix):
            seen = known.get(key)
            if seen is not None and seen.fingerprint == _fingerprint(st):
                seen.mtime_ns = st.st_mtime_ns
                if not _stale(st.st_mtime_ns, seen.ttl, now):
                    present.add(key)
                continue
            entry = self._read(self._path(key))
            if entry is None or _stale(entry.stat.st_mtime_ns, entry.header.ttl, now):
                continue
            present.add(key)
            header = entry.header
            known[key] = _Seen(entry.fingerprint, header.rev, header.ttl, entry.stat.st_mtime_ns)
            if seen is None or seen.rev != header.rev:
                events.append(Put(KeyValue(key, entry.value, header.rev, header.bound_lease)))
        for key in [k for k in known if k not in present]:
            seen = known.pop(key)
            tomb = self._read_tomb(key)
            if tomb is not None and tomb.rev > seen.rev:
                events.append(Delete(key, tomb.rev, tomb.expired))
            else:
                events.append(Delete(key, counter, _stale(seen.mtime_ns, seen.ttl, now)))
        events.sort(key=lambda e: e.revision)
        return events

    # --- reaper -----------------------------------------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            try:
                self._reap()
            except (OSError, DiscoveryUnavailable) as exc:
                # The directory may be briefly unreadable (removed, remounted): the next pass
                # retries. Nothing else is caught: a bug must reach the store's owner.
                _log.warning("file store reaper failed", root=self.root, error=str(exc))
            await asyncio.sleep(self._reap_interval)

    def _reap(self) -> None:
        now = time.time()
        expired: list[tuple[str, int]] = []
        names: set[str] = set()
        with os.scandir(self.root) as dir_entries:
            for dir_entry in dir_entries:
                name = dir_entry.name
                try:
                    st = dir_entry.stat()
                except FileNotFoundError:
                    continue
                if name.startswith((_TMP_PREFIX, _TOMB_PREFIX)):
                    if now - st.st_mtime > _LITTER_TTL:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(dir_entry.path)
                    continue
                key = decode_file_name(name)
                if key is None:
                    continue
                names.add(name)
                header = self._cached_header(name, st)
                if header is not None and _stale(st.st_mtime_ns, header.ttl, now):
                    expired.append((key, st.st_ino))
        for name in [n for n in self._header_cache if n not in names]:
            del self._header_cache[name]
        if not expired or self._rev_fd is None:
            return
        with self._locked():
            for key, ino in expired:
                entry = self._read(self._path(key))
                if (
                    entry is not None
                    and entry.stat.st_ino == ino
                    and _stale(entry.stat.st_mtime_ns, entry.header.ttl, time.time())
                ):
                    self._remove_locked(key, expired=True)

    def _cached_header(self, name: str, st: os.stat_result) -> _Header | None:
        cached = self._header_cache.get(name)
        if cached is not None and cached[:2] == (st.st_ino, st.st_size):
            return cached[2]
        entry = self._read(os.path.join(self.root, name))
        if entry is None:
            return None
        self._header_cache[name] = (entry.stat.st_ino, entry.stat.st_size, entry.header)
        return entry.header

    # --- file primitives --------------------------------------------------------------------------

    def _require_open(self) -> int:
        if self._rev_fd is None:
            raise self._unavailable("store is not connected")
        return self._rev_fd

    def _error(self, what: str, exc: OSError) -> DiscoveryError:
        if exc.errno == errno.ENAMETOOLONG:
            return DiscoveryError(f"{what}: the key is too long for a file name")
        return self._unavailable(f"{what}: {exc}")

    def _path(self, key: str) -> str:
        return os.path.join(self.root, encode_file_name(key))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Held only for a few syscalls; a process that dies holding it releases it.
        fd = self._require_open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _read_rev(self) -> int:
        data = os.pread(self._require_open(), _REVISION_WIDTH, 0)
        return int(data) if data.strip() else 0

    def _bump_locked(self) -> int:
        rev = self._read_rev() + 1
        os.pwrite(self._require_open(), b"%0*d" % (_REVISION_WIDTH, rev), 0)
        return rev

    def _write_tmp(self, data: bytes) -> str:
        tmp = os.path.join(self.root, f"{_TMP_PREFIX}{secrets.token_hex(8)}")
        try:
            with open(tmp, "xb") as f:
                f.write(data)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise self._error("cannot write a temporary file", exc) from exc
        return tmp

    def _remove_locked(self, key: str, *, expired: bool) -> None:
        rev = self._bump_locked()
        name = encode_file_name(key)
        tmp = self._write_tmp(msgspec.json.encode(_Tomb(rev, expired)))
        os.replace(tmp, os.path.join(self.root, _TOMB_PREFIX + name))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.root, name))

    def _read_tomb(self, key: str) -> _Tomb | None:
        path = os.path.join(self.root, _TOMB_PREFIX + encode_file_name(key))
        try:
            with open(path, "rb") as f:
                return _tomb_decoder.decode(f.read())
        except FileNotFoundError:
            return None
        except msgspec.DecodeError:
            return None  # a foreign or torn file: fall back to the watcher's own judgement

    def _read(self, path: str) -> _Entry | None:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(f"cannot read {path}", exc) from exc
        if data.startswith(_MAGIC):
            line, _, value = data.partition(b"\n")
            try:
                return _Entry(_header_decoder.decode(line[len(_MAGIC) :]), value, st)
            except msgspec.DecodeError:
                pass
        return _Entry(_Header(0), data, st)  # a file not written by troupe: a plain value

    def _scan(self, prefix: str) -> Iterator[tuple[str, os.stat_result]]:
        try:
            with os.scandir(self.root) as entries:
                for entry in entries:
                    key = decode_file_name(entry.name)
                    if key is None or not key_matches(key, prefix):
                        continue
                    try:
                        yield key, entry.stat()
                    except FileNotFoundError:
                        continue
        except OSError as exc:
            raise self._error("cannot scan the directory", exc) from exc

    def _load(self, prefix: str) -> builtins.list[tuple[KeyValue, _Seen]]:
        now = time.time()
        items: list[tuple[KeyValue, _Seen]] = []
        for key, _ in self._scan(prefix):
            entry = self._read(self._path(key))
            if entry is None or _stale(entry.stat.st_mtime_ns, entry.header.ttl, now):
                continue
            header = entry.header
            seen = _Seen(entry.fingerprint, header.rev, header.ttl, entry.stat.st_mtime_ns)
            items.append((KeyValue(key, entry.value, header.rev, header.bound_lease), seen))
        items.sort(key=lambda item: item[0].key)
        return items

    def _forget(self, key: str) -> None:
        for state in self._leases.values():
            state.keys.pop(key, None)
