"""The package exports exactly the public API we mean to export."""

from __future__ import annotations

import troupe.messages
import troupe.transports


def test_public_api() -> None:
    assert sorted(troupe.transports.__all__) == sorted(
        [
            "PLANES",
            "Client",
            "Handler",
            "HandlerAdapter",
            "InprocClient",
            "InprocRegistry",
            "InprocServer",
            "NetworkManager",
            "PlaneModule",
            "RequestContext",
            "RequestRunner",
            "ResponseStream",
            "SendReply",
            "Server",
            "StopReason",
            "TransportSettings",
            "is_resumable",
            "remote_error",
            "resumable",
        ]
    )
    for name in troupe.transports.__all__:
        assert getattr(troupe.transports, name) is not None


def test_wire_frames_come_from_the_message_catalogue() -> None:
    assert {"Request", "Chunk", "End", "Error", "Cancel", "WIRE_VERSION", "InstanceRecord"} <= set(
        troupe.messages.__all__
    )
    assert set(troupe.messages.__all__) & set(troupe.transports.__all__) == {"PLANES"}
    # The plane names are listed once; the transports map each (and inproc, for tests) to a module.
    assert set(troupe.transports.PLANES) == {*troupe.messages.PLANES, "inproc"}
