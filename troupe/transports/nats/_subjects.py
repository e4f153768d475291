"""The addresses and subjects of the NATS plane, what both ends share.

Addresses. A server instance subscribes a subject of its own, ``troupe.rpc.<16 hex digits>``, and
reports the address ``nats:troupe.rpc.<16 hex digits>``: scheme ``nats`` (what the network manager
maps to this plane) and no ``//``, because the address names a *subject*, never a server URL.
Both sides reach the NATS servers listed in their own ``NATS_SERVER``.

Reply subjects. A caller's replies come on ``<inbox>.<request id>.<token>``, where ``<inbox>``
is ``DYN_NATS_INBOX_PREFIX`` followed by a random token (one per client) and ``<token>`` is
:func:`reply_token` of the request's *cancel key*, a secret only the caller knows until it
cancels. The caller accepts a reply only on the exact subject it chose for that request, so
nobody who has not seen the request can aim a frame at it; a worker accepts a ``Cancel`` only
with the key whose token ends the request's reply subject (:func:`cancel_allowed`), which nobody
but the caller holds, even someone who read the request. Callers that predate this layout
(``<inbox>.<request id>``) carry no key, and their cancels are taken as before.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Final

from troupe.errors import TransportError

SCHEME: Final = "nats"
"""The scheme of this plane's addresses (``nats:<subject>``)."""

SUBJECT_PREFIX: Final = "troupe.rpc"
"""Worker subjects are ``SUBJECT_PREFIX.<16 hex digits>`` unless chosen explicitly."""

_PREFIX: Final = SCHEME + ":"
_CONTROL: Final = ".ctl"
_KEY_HEADER: Final = "Troupe-Cancel-Key"
"""The NATS header of a ``Cancel`` that carries the request's cancel key (hex)."""
_TOKEN_BYTES: Final = 16
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


def reply_token(key: bytes) -> str:
    """The last token of a request's reply subject: a digest of its cancel key (32 hex digits)."""
    return hashlib.blake2b(key, digest_size=_TOKEN_BYTES).hexdigest()


def cancel_allowed(reply: str, rid: object, key: str | None) -> bool:
    """Whether a ``Cancel`` of request ``rid`` answering on ``reply`` comes from its caller.

    Args:
        reply: the reply subject the cancel names (the request's).
        rid: the request id the cancel names.
        key: the cancel key it carries, hex (the ``Troupe-Cancel-Key`` header), or ``None``.
    """
    head, _, last = reply.rpartition(".")
    rid_text = str(rid)
    if last == rid_text:
        return True  # a caller that predates cancel keys: nothing to check it against
    if key is None or not head.endswith("." + rid_text):
        return False
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        return False
    return hmac.compare_digest(reply_token(raw), last)


def caller_of(reply: str, rid: object) -> str:
    """The caller's inbox a reply subject belongs to (both layouts): one caller, for limits."""
    head, _, last = reply.rpartition(".")
    if last != str(rid):
        head = head.rpartition(".")[0]
    return head or reply
