"""Structured logging: structlog events rendered through the stdlib ``logging`` tree.

troupe's modules log with :func:`get_logger`, which returns a structlog logger bound to the stdlib
logger of the same name, so levels, per-target filtering and handlers are plain ``logging``.
:func:`configure_logging` turns a :class:`~troupe.config.LogConfig` (``DYN_LOG``,
``DYN_LOGGING_JSONL``) into that setup, and touches **only troupe's own loggers** and the ones the
user names: an application that embeds a runtime keeps its own logging (no root level changed, no
root handler, no library turned up to INFO behind its back):

- the global level goes on the ``troupe`` logger; each ``target=level`` pair goes on the logger
  named by the target, which covers that logger and every logger below it (``troupe.transports``
  covers ``troupe.transports.tcp``); a target outside ``troupe`` (``DYN_LOG=info,httpx=debug``)
  is how a user asks to see a library's records too;
- one handler, on ``troupe`` and on each such outside target (which then stop propagating to the
  root, so a record is written once), renders every record as a JSON line (``event``, ``level``,
  ``logger``, ``timestamp`` and the bound key-values) or as plain console text (no colours, no
  ``rich``/``colorama`` needed);
- a ``label`` (a supervised worker's ``worker-N``) and the process id start every console line,
  and are the ``worker`` and ``pid`` keys of every JSON line, so that the logs of several worker
  processes sharing a terminal can be told apart.

``trace`` is :data:`TRACE` = ``DEBUG - 5`` (level name ``TRACE``), a step below ``debug`` for
per-message detail; :meth:`TroupeLogger.trace` logs at it.

Until :func:`configure_logging` runs, records still reach the stdlib tree (so an application's own
``logging`` setup sees them), but their message is the raw event dict: render them with a
``structlog.stdlib.ProcessorFormatter`` or call :func:`configure_logging`. Records of other
libraries that nobody named keep going wherever the application sends them (with no logging set
up, Python prints their warnings and errors to stderr).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from troupe.config import LogConfig

__all__ = ["TRACE", "TroupeLogger", "configure_logging", "get_logger", "reset_logging"]

TRACE = logging.DEBUG - 5
"""Numeric level of ``trace``: one step below DEBUG."""

logging.addLevelName(TRACE, "TRACE")

_LEVELS: Mapping[str, int] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# structlog method names -> stdlib levels, for the level check before an event is built.
_METHOD_LEVELS: Mapping[str, int] = {
    **_LEVELS,
    "exception": logging.ERROR,
    "fatal": logging.CRITICAL,
}


def _filter_by_level(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Drop the event unless the stdlib logger is enabled for it (knows ``trace``)."""
    if isinstance(logger, logging.Logger) and not logger.isEnabledFor(
        _METHOD_LEVELS.get(method_name, logging.NOTSET)
    ):
        raise structlog.DropEvent
    return event_dict


# Steps shared by structlog events and foreign (plain stdlib) records.
_SHARED: tuple[structlog.typing.Processor, ...] = (
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
)

_PROCESSORS: tuple[structlog.typing.Processor, ...] = (
    _filter_by_level,
    *_SHARED,
    structlog.stdlib.PositionalArgumentsFormatter(),
    structlog.processors.StackInfoRenderer(),
    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
)


class TroupeLogger(structlog.stdlib.BoundLogger):
    """A structlog stdlib logger that also knows the ``trace`` level."""

    def trace(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at :data:`TRACE` (below DEBUG)."""
        logger = self._logger
        if not logger.isEnabledFor(TRACE):
            return None
        if args:
            kw["positional_args"] = args
        try:
            call_args, call_kw = self._process_event("trace", event, kw)
        except structlog.DropEvent:
            return None
        return logger.log(TRACE, *call_args, **call_kw)

    def log(self, level: int, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at a numeric level; :data:`TRACE` is accepted too."""
        if level == TRACE:
            return self.trace(event, *args, **kw)
        return super().log(level, event, *args, **kw)


def get_logger(name: str) -> TroupeLogger:
    """A structured logger for ``name`` (a dotted module path such as ``troupe.transports.tcp``).

    It does not depend on structlog's global configuration: events always go to the stdlib logger
    ``name``, whose level (root, or a ``DYN_LOG`` target) decides whether they are kept.
    """
    return TroupeLogger(logging.getLogger(name), processors=_PROCESSORS, context={})


_ROOT = "troupe"
"""The logger every troupe module logs below."""


class _Handler(logging.StreamHandler[TextIO]):
    """The one handler troupe installs (on ``troupe`` and on outside ``DYN_LOG`` targets).

    It remembers the levels and ``propagate`` flags it replaced, and the loggers it was added to,
    so that :func:`reset_logging` (and the next :func:`configure_logging`) can put them back.
    Without an explicit stream it writes to the current ``sys.stderr`` at each record, so a
    swapped stderr (pytest capture) is followed.
    """

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self._follow_stderr = stream is None
        self.saved: dict[str, tuple[int, bool]] = {}  # logger name -> (level, propagate)
        self.attached: list[str] = []

    def save(self, logger: logging.Logger) -> None:
        """Remember ``logger``'s level and ``propagate`` flag (once) before changing them."""
        self.saved.setdefault(logger.name, (logger.level, logger.propagate))

    def emit(self, record: logging.LogRecord) -> None:
        if self._follow_stderr:
            self.stream = sys.stderr  # emit runs under the handler lock
        super().emit(record)


class _ConsolePrefix(structlog.stdlib.ProcessorFormatter):
    """The console formatter, each line started with ``[label pid]``."""

    def __init__(self, prefix: str, **kw: Any) -> None:
        super().__init__(**kw)
        self._prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return self._prefix + text.replace("\n", "\n" + self._prefix)


def _formatter(json: bool, label: str | None) -> structlog.stdlib.ProcessorFormatter:
    steps: list[structlog.typing.Processor]
    meta = structlog.stdlib.ProcessorFormatter.remove_processors_meta
    if json:
        processors: list[structlog.typing.Processor] = [meta]
        if label is not None:
            processors.append(_Stamp(label))
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        return structlog.stdlib.ProcessorFormatter(
            processors=processors, foreign_pre_chain=list(_SHARED)
        )
    console = structlog.dev.ConsoleRenderer(
        colors=False, exception_formatter=structlog.dev.plain_traceback
    )
    steps = [meta, console]
    if label is None:
        return structlog.stdlib.ProcessorFormatter(
            processors=steps, foreign_pre_chain=list(_SHARED)
        )
    return _ConsolePrefix(
        f"[{label} {os.getpid()}] ", processors=steps, foreign_pre_chain=list(_SHARED)
    )


class _Stamp:
    """Adds ``worker`` and ``pid`` to a JSON line."""

    def __init__(self, label: str) -> None:
        self._label = label

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict.setdefault("worker", self._label)
        event_dict.setdefault("pid", os.getpid())
        return event_dict


def reset_logging() -> None:
    """Remove troupe's handler and restore the levels and flags it changed."""
    for handler in list(logging.getLogger(_ROOT).handlers):
        if not isinstance(handler, _Handler):
            continue
        for name in handler.attached:
            logging.getLogger(name).removeHandler(handler)
        for name, (level, propagate) in handler.saved.items():
            restored = logging.getLogger(name)
            restored.setLevel(level)
            restored.propagate = propagate
        handler.close()


def _outside(target: str) -> bool:
    """Whether ``target`` names a logger that ``troupe``'s handler does not already cover."""
    return target != _ROOT and not target.startswith(_ROOT + ".")


def configure_logging(
    config: LogConfig, *, stream: TextIO | None = None, label: str | None = None
) -> None:
    """Set up logging from ``config``; calling it again replaces the previous setup.

    Only troupe's loggers (and the targets ``config`` names) are touched.

    Args:
        config: level, per-target levels and JSON-or-console choice (``DYN_LOG``,
            ``DYN_LOGGING_JSONL``).
        stream: where records are written; the current ``sys.stderr`` when None.
        label: what tells this process's lines apart (``worker-2``), with its pid.
    """
    reset_logging()
    handler = _Handler(stream)
    handler.setFormatter(_formatter(config.json, label))
    ours = logging.getLogger(_ROOT)
    handler.save(ours)
    ours.setLevel(_LEVELS[config.level])
    ours.propagate = False  # written once, here, whatever the application's root handler does
    ours.addHandler(handler)
    handler.attached.append(_ROOT)
    for target, level in config.targets:
        logger = logging.getLogger(target)
        handler.save(logger)
        logger.setLevel(_LEVELS[level])
        if _outside(target) and target not in handler.attached:
            logger.propagate = False
            logger.addHandler(handler)
            handler.attached.append(target)
