"""The package exports exactly the public API we mean to export."""

from __future__ import annotations

import troupe.transports


def test_public_api() -> None:
    assert sorted(troupe.transports.__all__) == sorted(
        [
            "PLANES",
            "Cancel",
            "Chunk",
            "Client",
            "End",
            "Error",
            "Frame",
            "FrameBuffer",
            "Handler",
            "InprocClient",
            "InprocRegistry",
            "InprocServer",
            "NetworkManager",
            "PlaneModule",
            "Reply",
            "Request",
            "RequestContext",
            "RequestId",
            "RequestRunner",
            "ResponseStream",
            "SendReply",
            "Server",
            "StopReason",
            "TransportSettings",
            "WIRE_VERSION",
            "decode",
            "encode",
            "encode_framed",
            "is_resumable",
            "remote_error",
            "resumable",
        ]
    )
    for name in troupe.transports.__all__:
        assert getattr(troupe.transports, name) is not None
