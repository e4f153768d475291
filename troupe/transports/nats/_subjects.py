"""The addresses and subjects of the NATS plane, what both ends share.

Addresses. A server instance subscribes a subject of its own, ``troupe.rpc.<16 hex digits>``, and
reports the address ``nats:troupe.rpc.<16 hex digits>``: scheme ``nats`` (what the network manager
maps to this plane) and no ``//``, because the address names a *subject*, never a server URL.
Both sides reach the NATS servers listed in their own ``NATS_SERVER``.
"""

from __future__ import annotations

import re
from typing import Final

from troupe.errors import TransportError

SCHEME: Final = "nats"
"""The scheme of this plane's addresses (``nats:<subject>``)."""

SUBJECT_PREFIX: Final = "troupe.rpc"
"""Worker subjects are ``SUBJECT_PREFIX.<16 hex digits>`` unless chosen explicitly."""

_PREFIX: Final = SCHEME + ":"
_CONTROL: Final = ".ctl"
_SUBJECT_RE: Final = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def subject_of(address: str) -> str:
    """The worker subject an address names (``nats:troupe.rpc.ab12`` → ``troupe.rpc.ab12``).

    Raises:
        TransportError: the address is not ``nats:<subject>`` with a plain subject (tokens of
            letters, digits, ``_`` and ``-`` separated by dots, no wildcards).
    """
    if address.startswith(_PREFIX):
        subject = address[len(_PREFIX) :]
        if _SUBJECT_RE.fullmatch(subject):
            return subject
    raise TransportError(
        f"malformed nats address {address!r}: expected nats:<subject>, e.g. nats:troupe.rpc.0a1b",
        address=address,
    )
