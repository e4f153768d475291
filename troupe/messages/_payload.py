"""How requests and response chunks travel inside the request plane's opaque ``bytes``.

The router encodes the caller's request object and the worker decodes it before calling the
handler; each item the handler yields is encoded by the worker and decoded by the router. msgpack
(via msgspec) carries anything JSON can, plus ``bytes``; msgspec Structs encode as maps.
"""

from __future__ import annotations

from typing import Any

import msgspec

from troupe.errors import ProtocolError

__all__ = ["decode_payload", "encode_payload"]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def encode_payload(obj: Any) -> bytes:
    """Encode a request or chunk object.

    Raises:
        TypeError: the object holds something msgpack cannot carry (including an integer
            outside msgpack's range, -2**63 .. 2**64-1).
    """
    try:
        return _encoder.encode(obj)
    except (TypeError, OverflowError, msgspec.EncodeError) as exc:
        raise TypeError(f"cannot encode {type(obj).__name__} for the request plane: {exc}") from exc


def decode_payload(data: bytes) -> Any:
    """Decode bytes produced by :func:`encode_payload`.

    Raises:
        ProtocolError: the bytes are not valid msgpack.
    """
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable payload: {exc}") from exc
