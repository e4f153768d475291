"""Finding a handler by name: ``module:function`` or ``path/to/file.py:function``.

Worker processes started by ``troupe worker`` and :meth:`Runtime.spawn_workers` import their
handler this way, so a handler must be importable from a fresh interpreter.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from troupe.errors import ConfigError

__all__ = ["handler_factory", "handler_spec", "load_handler", "serve_loaded"]

_EXPECTED = "module:function or path/to/file.py:function"


def load_handler(spec: str) -> Callable[..., Any]:
    """Import the callable that ``spec`` names.

    Raises:
        ConfigError: malformed spec, module or file not found, attribute missing or not callable.
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError("HANDLER", spec, _EXPECTED)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            if not path.is_file():
                raise ConfigError("HANDLER", spec, f"{_EXPECTED} (no file {path})")
            unique = f"troupe_handler_{abs(hash(str(path)))}"
            module_spec = importlib.util.spec_from_file_location(unique, path)
            if module_spec is None or module_spec.loader is None:
                raise ConfigError("HANDLER", spec, _EXPECTED)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("HANDLER", spec, f"{_EXPECTED} ({exc})") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError("HANDLER", spec, f"{_EXPECTED} ({module_name} has no {attr!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError("HANDLER", spec, f"{_EXPECTED} ({attr!r} is not callable)")
    return target  # type: ignore[no-any-return]


def handler_spec(handler: Callable[..., Any] | str) -> str:
    """The spec a child process can load ``handler`` with.

    A function defined in a script run as ``__main__`` is named by the script's path.
    """
    if isinstance(handler, str):
        load_handler(handler)  # fail here, in the parent, rather than N times in children
        return handler
    module = getattr(handler, "__module__", None)
    qualname = getattr(handler, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        raise ConfigError(
            "handler", handler, "a module-level function that worker processes can import"
        )
    if module == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        if main_file is None:
            raise ConfigError("handler", handler, "a function from an importable module or file")
        return f"{Path(main_file).resolve()}:{qualname}"
    return f"{module}:{qualname}"


_FACTORY = "__troupe_handler_factory__"


def handler_factory(factory: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``factory(rt, endpoint)`` as making the handler a worker process serves.

    Named like a handler (``troupe worker ENDPOINT module:factory``, ``rt.spawn_workers``), it
    is called once the worker's runtime runs, and returns the handler, or ``(handler,
    metadata)`` to add to the instance's record: what a handler needs its runtime for (a KV
    event publisher, ``rt.kv_events``) is made there.
    """
    setattr(factory, _FACTORY, True)
    return factory


def serve_loaded(
    rt: Any,
    endpoint: Any,
    loaded: Callable[..., Any],
    *,
    max_inflight: int | None,
    metadata: dict[str, Any] | None,
) -> None:
    """``rt.serve`` what :func:`load_handler` found: the handler, or what a
    :func:`handler_factory` makes for this runtime.

    Raises:
        ConfigError: a factory returned something that is not a handler.
    """
    handler: Any = loaded
    if getattr(loaded, _FACTORY, False):
        handler = loaded(rt, endpoint)
        if isinstance(handler, tuple):
            handler, extra = handler
            metadata = {**extra, **(metadata or {})}
        if not callable(handler):
            raise ConfigError("HANDLER", loaded, "a handler factory returning a handler")
    rt.serve(endpoint, handler, max_inflight=max_inflight, metadata=metadata)
