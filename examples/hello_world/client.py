"""Hello world, the client: find a worker through discovery and stream its answer.

DYN_DISCOVERY_BACKEND=file python examples/hello_world/client.py Ada Grace Linus
"""

from __future__ import annotations

import asyncio
import sys

from troupe import Runtime


async def call(rt: Runtime, names: list[str]) -> None:
    router = rt.router("hello.world.generate")
    await router.wait_for_instances(timeout=10)
    async for greeting in router.generate({"names": names}):
        print(greeting, flush=True)


def main() -> int:
    names = sys.argv[1:] or ["world"]
    with Runtime.from_env() as rt:
        asyncio.run(call(rt, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
