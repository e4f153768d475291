"""A tcp caller that sends many requests and never reads a reply (the flood tests).

Usage: ``python _hammer.py ADDRESS IDENTITY COUNT ENDPOINT ID_BYTES``. Connects a raw ZeroMQ
DEALER named IDENTITY to the worker at ADDRESS, queues COUNT requests for ENDPOINT (string ids of
ID_BYTES bytes, or int ids when 0), prints ``sent``, and keeps the connection open, reading
nothing, until stdin closes.
"""

from __future__ import annotations

import sys

import zmq

from troupe.messages import Request, encode


def main() -> None:
    address, identity, count, endpoint, id_bytes = sys.argv[1:6]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, identity.encode())
    sock.setsockopt(zmq.SNDHWM, 0)  # queue every request here: sending never blocks
    sock.setsockopt(zmq.RCVHWM, 1)  # and take in as few replies as ZeroMQ allows
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(address)
    pad = "x" * int(id_bytes)
    for i in range(int(count)):
        rid: int | str = f"{pad}{i}" if pad else i
        sock.send(encode(Request(rid, endpoint, b"x")))
    print("sent", flush=True)
    sys.stdin.read()
    sock.close(linger=0)
    ctx.term()


if __name__ == "__main__":
    main()
