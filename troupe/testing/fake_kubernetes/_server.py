"""The fake API server: :class:`FakeKubernetes`, its thread, its socket and its kubeconfig.

The server runs hypercorn on an event loop in a thread of its own, bound to 127.0.0.1, and writes
a kubeconfig file that points at it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self, cast

from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.typing import ASGIFramework
from hypercorn.utils import wrap_app

from troupe.testing.fake_kubernetes._app import _App
from troupe.testing.fake_kubernetes._hooks import _Hooks
from troupe.testing.fake_kubernetes._store import _Watcher
from troupe.testing.fake_kubernetes._wire import _Object
from troupe.testing.servers import TlsFiles


class FakeKubernetes(_Hooks, _App):
    """A fake API server on ``127.0.0.1`` with the list/watch protocol of a real one.

    Args:
        port: the port to listen on (0: a free one; kept across :meth:`stop`/:meth:`start`).
        directory: where to write the kubeconfig (a temporary directory when omitted, removed by
            :meth:`close` and on leaving a ``with`` block).
        token: the bearer token clients must send (it is written into the kubeconfig).
        history_limit: how many events are retained for watches that resume from an old
            resourceVersion; older ones get 410 Gone.
        gone_as_http_status: answer a stale resourceVersion with an HTTP 410 response instead of
            the in-stream ``ERROR`` event a real API server sends.
        tls: serve HTTPS with these certificates (``troupe.testing.make_tls_files``), as a real
            API server does; the kubeconfig then names the CA.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        directory: str | Path | None = None,
        token: str = "fake-token",  # noqa: S107 - a test server's well-known token
        history_limit: int = 10_000,
        gone_as_http_status: bool = False,
        tls: TlsFiles | None = None,
    ) -> None:
        self.port = port
        self.token = token
        self.history_limit = history_limit
        self.gone_as_http_status = gone_as_http_status
        self.tls = tls
        self._directory = Path(directory) if directory is not None else None
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._lock = threading.RLock()
        self._rv = 0
        self._oldest = 0  # watches from a resourceVersion below this get 410 Gone
        self._objects: dict[tuple[str, str, str], _Object] = {}  # (plural, ns, name) -> object
        self._history: list[tuple[int, str, str, str, _Object]] = []  # rv, plural, ns, type, obj
        self._watchers: list[_Watcher] = []
        self._calls: Counter[tuple[str, str]] = Counter()
        self._watch_params: list[tuple[str, str | None, str | None]] = []  # plural, rv, timeout
        self._hooks: list[tuple[str, str, Callable[[], object]]] = []  # before_next
        self._changed = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self._held = False  # new watch requests wait while True (hold_watches)
        self._released: asyncio.Event | None = None  # on the server's loop; clear while held
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.kubeconfig: Path | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https`` with TLS)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Listen (on the same port as before after a :meth:`stop`) and write the kubeconfig."""
        if self._thread is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted sockets inherit it: without, Nagle + delayed ACK add 40 ms per request.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        self._write_kubeconfig()
        self._started.clear()
        self._error = None
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"FakeKubernetes-{self.port}"
        )
        self._thread.start()
        self._started.wait(10.0)
        error: BaseException | None = getattr(self, "_error")  # noqa: B009 - set by the thread
        if error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"fake API server failed to start: {error!r}")

    def stop(self) -> None:
        """Close every watch stream, stop serving and join the thread (the state is kept)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self.drop_watches()
        loop, shutdown, released = self._loop, self._shutdown, self._released
        if loop is not None and shutdown is not None:
            try:
                if released is not None:
                    loop.call_soon_threadsafe(released.set)  # held watch requests end too
                loop.call_soon_threadsafe(shutdown.set)
            except RuntimeError:  # already closed: the thread is ending
                pass
        thread.join()
        self._loop = None

    def close(self) -> None:
        """:meth:`stop`, and remove the kubeconfig's temporary directory."""
        self.stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def _write_kubeconfig(self) -> None:
        if self._directory is None:
            if self._tempdir is None:
                self._tempdir = tempfile.TemporaryDirectory(prefix="fake-kube-")
            directory = Path(self._tempdir.name)
        else:
            directory = self._directory
            directory.mkdir(parents=True, exist_ok=True)
        path = directory / "kubeconfig"
        cluster: dict[str, str] = {"server": self.url}
        if self.tls is not None:
            cluster["certificate-authority"] = self.tls.ca
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": "default"},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
        self.kubeconfig = path

    def _run(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(sock))
        except BaseException as exc:  # noqa: BLE001 - reported by start(); the thread ends anyway
            self._error = exc
        finally:
            self._started.set()
            sock.close()
            loop.close()

    async def _serve(self, sock: socket.socket) -> None:
        self._shutdown = asyncio.Event()
        self._released = asyncio.Event()
        with self._lock:
            if not self._held:
                self._released.set()
        config = HypercornConfig()
        config.accesslog = None
        config.errorlog = logging.getLogger("troupe.testing.fake_kubernetes")
        config.graceful_timeout = 1.0
        config.keep_alive_timeout = 30.0
        if self.tls is not None:
            config.certfile = self.tls.server_cert
            config.keyfile = self.tls.server_key
        sockets = Sockets([sock], [], []) if self.tls else Sockets([], [sock], [])
        app = wrap_app(cast("ASGIFramework", self), 0, "asgi")
        serving = asyncio.create_task(
            worker_serve(
                app,
                config,
                sockets=sockets,
                shutdown_trigger=self._shutdown.wait,
            ),
            name=f"FakeKubernetes-{self.port}-hypercorn",
        )
        await asyncio.sleep(0)
        self._started.set()
        await serving
