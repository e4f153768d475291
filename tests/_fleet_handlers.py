"""Handlers for the worker-fleet tests, loaded by ``troupe worker`` processes by file path.

- ``echo`` answers its request; a request of ``"crash"`` ends the process with status 3 (a crash
  after it served).
- With ``FLEET_TEST_SLOW_START`` set, a *supervised* worker (one given ``--ready-fd``) sleeps a
  minute on import, so it stays "starting"; the supervising process, which loads the handler to
  check it, does not.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

if os.environ.get("FLEET_TEST_SLOW_START") and "--ready-fd" in sys.argv:
    time.sleep(60)


def echo(request: Any, ctx: Any) -> Any:
    if request == "crash":
        os._exit(3)
    return request
