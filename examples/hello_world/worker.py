"""Hello world, the worker: serve ``hello.world.generate`` until Ctrl-C / SIGTERM.

DYN_DISCOVERY_BACKEND=file python examples/hello_world/worker.py
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

from troupe import Runtime


async def generate(request: Any, ctx: Any) -> AsyncIterator[str]:
    """Greet each name in ``request["names"]``, one chunk each."""
    for name in request["names"]:
        if ctx.is_stopped():
            return
        await asyncio.sleep(0.01)
        yield f"hello, {name}!"


def main() -> int:
    with Runtime.from_env() as rt:
        rt.serve(rt.namespace("hello").component("world").endpoint("generate"), generate)
        print(f"serving hello.world.generate as instance {rt.instance_id}", flush=True)
        rt.wait_for_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
