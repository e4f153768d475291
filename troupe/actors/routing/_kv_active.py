"""The blocks of the requests a KV router has in flight, per worker, counted once each.

Requests that share a prefix share its blocks in a worker's KV cache: eight requests on one
system prompt of 250 blocks hold 250 blocks of it, not 2,000. :class:`ActiveBlocks` counts each
worker's distinct active block hashes (reference-counted across its requests), plus one for each
request's partial last block, as NVIDIA Dynamo's router counts its active sequences. Without
that, a worker busy with requests on a prefix looks more loaded the more requests share it, and
the router sends the next request on that prefix elsewhere, where it is not cached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["ActiveBlocks"]


class ActiveBlocks:
    """Distinct active blocks per worker. One owner (the router's I/O loop)."""

    __slots__ = ("_extra", "_refs", "_requests")

    def __init__(self) -> None:
        self._refs: dict[str, dict[int, int]] = {}  # worker -> block hash -> requests using it
        self._extra: dict[str, int] = {}  # worker -> partial blocks of its requests
        self._requests: dict[int, tuple[str, Sequence[int], int]] = {}

    def add(self, token: int, worker: str, hashes: Sequence[int], partial: int) -> None:
        """Request ``token`` runs on ``worker`` with its full blocks ``hashes`` and ``partial``
        blocks not hashed (its unfinished last block: 0 or 1)."""
        refs = self._refs.setdefault(worker, {})
        get = refs.get
        for block in hashes:
            refs[block] = get(block, 0) + 1
        if partial:
            self._extra[worker] = self._extra.get(worker, 0) + partial
        self._requests[token] = (worker, hashes, partial)

    def remove(self, token: int) -> bool:
        """Request ``token`` ended; False if it was not (or no longer) counted."""
        entry = self._requests.pop(token, None)
        if entry is None:
            return False
        worker, hashes, partial = entry
        refs = self._refs.get(worker)
        if refs is not None:
            for block in hashes:
                left = refs.get(block, 0) - 1
                if left > 0:
                    refs[block] = left
                else:
                    refs.pop(block, None)
            if not refs:
                del self._refs[worker]
        if partial:
            left = self._extra.get(worker, 0) - partial
            if left > 0:
                self._extra[worker] = left
            else:
                self._extra.pop(worker, None)
        return True

    def count(self, worker: str) -> int:
        """Blocks in use by ``worker``'s requests in flight."""
        refs = self._refs.get(worker)
        return (len(refs) if refs else 0) + self._extra.get(worker, 0)

    def shared_prefix(self, worker: str, hashes: Sequence[int]) -> int:
        """How many leading ``hashes`` are already in use on ``worker`` (they add no load)."""
        refs = self._refs.get(worker)
        if not refs:
            return 0
        depth = 0
        for block in hashes:
            if block not in refs:
                break
            depth += 1
        return depth

    def counts(self) -> Mapping[str, int]:
        """:meth:`count` of every worker with requests in flight."""
        return {worker: self.count(worker) for worker in {*self._refs, *self._extra}}
