"""A fake Kubernetes API server for tests of the ``kubernetes`` discovery backend.

``python -m troupe.testing.fake_kubernetes --port P`` serves until interrupted and prints the
server's URL and kubeconfig path.
"""

from __future__ import annotations

import argparse
import signal
import threading

from troupe.testing.fake_kubernetes._server import FakeKubernetes


def main(argv: list[str] | None = None) -> int:
    """``python -m troupe.testing.fake_kubernetes``: serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--dir", default=None, help="directory for the kubeconfig file")
    parser.add_argument("--token", default="fake-token", help="bearer token clients must send")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server = FakeKubernetes(port=args.port, directory=args.dir, token=args.token)
    server.start()
    try:
        print(f"url={server.url} kubeconfig={server.kubeconfig}", flush=True)
        stop.wait()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
