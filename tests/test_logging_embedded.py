"""An application that embeds a Runtime keeps its own logging (checked in a real process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

APP = textwrap.dedent(
    """
    import logging
    import httpx
    import troupe

    config = troupe.Config.from_env(
        {"DYN_DISCOVERY_BACKEND": "memory", "DYN_SYSTEM_PORT": "0", "DYN_LOG": "debug"}
    )
    with troupe.Runtime(config, handle_signals=False) as rt:
        for _ in range(20):
            httpx.get(rt.status.url.replace("0.0.0.0", "127.0.0.1") + "/live")
        logging.getLogger("app").warning("the application's own warning")
        print("root level", logging.getLogger().level, "handlers", logging.getLogger().handlers)
    """
)


@pytest.mark.timeout(60)
def test_an_embedded_runtime_prints_no_library_chatter_and_each_line_once() -> None:
    done = subprocess.run(
        [sys.executable, "-c", APP], capture_output=True, text=True, timeout=50, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "HTTP Request" not in done.stderr  # httpx's INFO lines: not asked for
    assert "httpcore" not in done.stderr  # nor its DEBUG ones, at DYN_LOG=debug
    assert done.stderr.count("status server listening") == 1
    assert "the application's own warning" in done.stderr  # Python's last resort still works
    assert "root level 30 handlers []" in done.stdout  # root logger untouched
