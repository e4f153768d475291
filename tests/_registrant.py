"""A worker-like process for multi-process discovery tests.

Registers one instance of ``ns.comp.ep`` with the backend configured in its environment, prints
``registered <instance_id>``, and waits for SIGTERM/SIGINT (a clean stop revokes the lease).
"""

from __future__ import annotations

import sys

from troupe import Runtime


def main() -> int:
    with Runtime.from_env() as rt:
        record = rt.register("ns", "comp", "ep", {"tcp": "tcp://127.0.0.1:1"}, {"model": "m"})
        print(f"registered {record.instance_id}", flush=True)
        rt.wait_for_shutdown()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
