"""The ``file`` store's on-disk format: key file names, headers, tombstones, what a watch saw.

Layout (one flat directory):

- one file per key, named by the percent-encoded key (``%2Fservices%2Fns%2Fcomp%2Fep%2F<hex>``;
  ``.`` is encoded too, so no key file starts with a dot). The file holds a one-line header
  ``#troupe-kv {"rev":..,"lease":..,"ttl":..}`` and then the raw value;
- ``.revision``: the store revision, a counter shared by every process. Every write takes an
  exclusive ``flock`` on it, bumps it, and publishes its file while holding it, so revisions are
  ordered like the writes;
- ``.tmp_*``: files being written (published with ``rename``, or ``link`` for create-if-absent, so
  readers never see a partial file and exactly one of several concurrent creators wins);
- ``.del_<name>``: tombstones left by deletions (revision and cause), read by watchers in other
  processes; removed after a minute.

Pure helpers without locking or watching; :mod:`troupe.discovery._file` holds the store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import quote, unquote

import msgspec

__all__ = ["decode_file_name", "encode_file_name"]

_MAGIC = b"#troupe-kv "
_TMP_PREFIX = ".tmp_"
_TOMB_PREFIX = ".del_"
_REVISION_FILE = ".revision"
_REVISION_WIDTH = 20
_LITTER_TTL = 60.0  # seconds before tombstones and abandoned temp files are removed


def encode_file_name(key: str) -> str:
    """The file name of ``key``: percent-encoded, with ``.`` encoded too (never a dot file)."""
    return quote(key, safe="").replace(".", "%2E")


def decode_file_name(name: str) -> str | None:
    """The key stored in file ``name``, or None for the store's own dot files."""
    if name.startswith("."):
        return None
    return unquote(name)


class _Header(msgspec.Struct, frozen=True, omit_defaults=True):
    rev: int
    lease: int | None = None
    ttl: float | None = None

    @property
    def bound_lease(self) -> int | None:
        """The lease the file is bound to: only a file with a TTL expires (else None)."""
        return self.lease if self.ttl is not None else None


class _Tomb(msgspec.Struct, frozen=True):
    rev: int
    expired: bool


_header_decoder = msgspec.json.Decoder(_Header)
_tomb_decoder = msgspec.json.Decoder(_Tomb)


def _stale(mtime_ns: int, ttl: float | None, now: float) -> bool:
    return ttl is not None and now - mtime_ns / 1e9 > ttl


@dataclass
class _Entry:
    """A key file as read: header, value and the stat of the file that was read."""

    header: _Header
    value: bytes
    stat: os.stat_result

    @property
    def fingerprint(self) -> tuple[int, int, int, int]:
        return _fingerprint(self.stat)


def _fingerprint(st: os.stat_result) -> tuple[int, int, int, int]:
    # A write replaces the file (new inode, new ctime); a keep-alive changes mtime and ctime.
    return (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)


@dataclass
class _Seen:
    """What a watcher last saw of a key file."""

    fingerprint: tuple[int, int, int, int]
    rev: int
    ttl: float | None
    mtime_ns: int
