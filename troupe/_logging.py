"""Structured logging: structlog events rendered through the stdlib ``logging`` tree.

troupe's modules log with :func:`get_logger`, which returns a structlog logger bound to the stdlib
logger of the same name, so levels, per-target filtering and handlers are plain ``logging``: library
loggers (asyncio, pykka, nats, hypercorn) flow through the same pipeline and look the same.
:func:`configure_logging` turns a :class:`~troupe.config.LogConfig` (``DYN_LOG``,
``DYN_LOGGING_JSONL``) into that setup:

- the global level goes on the root logger; each ``target=level`` pair goes on the logger named by
  the target, which covers that logger and every logger below it (``troupe.transports`` covers
  ``troupe.transports.tcp``);
- one handler on the root logger renders every record as a JSON line (``event``, ``level``,
  ``logger``, ``timestamp`` and the bound key-values) or as plain console text (no colours, no
  ``rich``/``colorama`` needed).

``trace`` is :data:`TRACE` = ``DEBUG - 5`` (level name ``TRACE``), a step below ``debug`` for
per-message detail; :meth:`TroupeLogger.trace` logs at it.

Until :func:`configure_logging` runs, records still reach the stdlib tree (so an application's own
``logging`` setup sees them), but their message is the raw event dict: render them with a
``structlog.stdlib.ProcessorFormatter`` or call :func:`configure_logging`.
"""

from __future__ import annotations

import logging
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


class _Handler(logging.StreamHandler[TextIO]):
    """The one handler troupe installs on the root logger.

    It remembers the levels it replaced so that :func:`reset_logging` (and the next
    :func:`configure_logging`) can put them back. Without an explicit stream it writes to the
    current ``sys.stderr`` at each record, so a swapped stderr (pytest capture) is followed.
    """

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self._follow_stderr = stream is None
        self.saved_levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if self._follow_stderr:
            self.stream = sys.stderr  # emit runs under the handler lock
        super().emit(record)


def _formatter(json: bool) -> structlog.stdlib.ProcessorFormatter:
    steps: list[structlog.typing.Processor]
    if json:
        steps = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        console = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
        steps = [console]
    return structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *steps],
        foreign_pre_chain=list(_SHARED),
    )


def reset_logging() -> None:
    """Remove troupe's handler from the root logger and restore the levels it changed."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _Handler):
            root.removeHandler(handler)
            for name, level in handler.saved_levels.items():
                (root if name == "" else logging.getLogger(name)).setLevel(level)
            handler.close()


def configure_logging(config: LogConfig, *, stream: TextIO | None = None) -> None:
    """Set up logging from ``config``; calling it again replaces the previous setup.

    Args:
        config: level, per-target levels and JSON-or-console choice (``DYN_LOG``,
            ``DYN_LOGGING_JSONL``).
        stream: where records are written; the current ``sys.stderr`` when None.
    """
    reset_logging()
    root = logging.getLogger()
    handler = _Handler(stream)
    handler.setFormatter(_formatter(config.json))
    handler.saved_levels[""] = root.level
    root.setLevel(_LEVELS[config.level])
    for target, level in config.targets:
        logger = logging.getLogger(target)
        handler.saved_levels.setdefault(target, logger.level)
        logger.setLevel(_LEVELS[level])
    root.addHandler(handler)
    # Applications that log with structlog.get_logger() get the same pipeline.
    structlog.configure(
        processors=list(_PROCESSORS),
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=TroupeLogger,
        cache_logger_on_first_use=False,
    )
