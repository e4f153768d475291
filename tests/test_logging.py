"""Tests of the logging setup: JSON and console output, per-target levels, idempotent setup."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from troupe._support._logging import TRACE, configure_logging, get_logger, reset_logging
from troupe.config import Config, LogConfig


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    reset_logging()
    structlog.reset_defaults()
    assert root.level == level


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def configure(spec: str, *, as_json: bool = True) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(LogConfig(level=spec, json=as_json), stream=stream)
    return stream


def test_json_lines_carry_event_level_logger_and_values() -> None:
    stream = configure("info")
    get_logger("troupe.test").info("request served", endpoint="ns.comp.ep", n=3)
    [record] = json_lines(stream)
    assert record["event"] == "request served"
    assert record["level"] == "info"
    assert record["logger"] == "troupe.test"
    assert (record["endpoint"], record["n"]) == ("ns.comp.ep", 3)
    assert record["timestamp"].endswith("Z")


def test_other_libraries_are_left_alone_unless_named() -> None:
    root = logging.getLogger()
    before = (root.level, list(root.handlers), logging.getLogger("httpx").level)
    stream = configure("debug")
    logging.getLogger("httpx").info('HTTP Request: GET http://x "HTTP/1.1 200 OK"')
    logging.getLogger("asyncio").warning("not ours")
    assert json_lines(stream) == []
    # An embedding application's logging is untouched: no root level, no root handler.
    assert (root.level, list(root.handlers), logging.getLogger("httpx").level) == before


def test_a_named_library_logger_flows_through_the_same_output() -> None:
    stream = configure("info,asyncio=warning")
    logging.getLogger("asyncio").warning("slow callback %.1f s", 0.5)
    logging.getLogger("asyncio").info("below its level")
    [record] = json_lines(stream)
    assert (record["event"], record["level"], record["logger"]) == (
        "slow callback 0.5 s",
        "warning",
        "asyncio",
    )


def test_global_level_filters() -> None:
    stream = configure("warning")
    log = get_logger("troupe.test")
    log.info("dropped")
    log.warning("kept")
    logging.getLogger("pykka").info("dropped too")
    assert [r["event"] for r in json_lines(stream)] == ["kept"]


def test_target_levels_apply_to_the_logger_and_its_children_only() -> None:
    stream = configure("warning,troupe.transports=debug,noisy=error")
    get_logger("troupe.transports.tcp").debug("tcp detail")
    get_logger("troupe.transports").debug("transport detail")
    get_logger("troupe.transportsx").info("a sibling name, not a child")
    get_logger("troupe.discovery").info("not a target")
    logging.getLogger("noisy.lib").warning("quieter than the global level")
    logging.getLogger("noisy.lib").error("loud enough")
    events = [r["event"] for r in json_lines(stream)]
    assert events == ["tcp detail", "transport detail", "loud enough"]


def test_trace_is_below_debug() -> None:
    stream = configure("debug,troupe.wire=trace")
    get_logger("troupe.other").trace("hidden at debug")
    get_logger("troupe.wire").trace("frame %d", 7, size=10)
    get_logger("troupe.wire").log(TRACE, "via log()")
    records = json_lines(stream)
    assert [(r["event"], r["level"]) for r in records] == [
        ("frame 7", "trace"),
        ("via log()", "trace"),
    ]
    assert TRACE == logging.DEBUG - 5
    assert logging.getLevelName(TRACE) == "TRACE"


def test_exceptions_are_rendered() -> None:
    stream = configure("info")
    try:
        raise KeyError("missing")
    except KeyError as exc:
        get_logger("troupe.test").error("lookup failed", exc_info=exc)
    [record] = json_lines(stream)
    assert "KeyError: 'missing'" in record["exception"]


def test_contextvars_are_merged() -> None:
    stream = configure("info,hypercorn=info")
    with structlog.contextvars.bound_contextvars(request_id="r-1"):
        get_logger("troupe.test").info("inside")
        logging.getLogger("hypercorn").info("foreign inside")
    get_logger("troupe.test").info("outside")
    records = json_lines(stream)
    assert [r.get("request_id") for r in records] == ["r-1", "r-1", None]


def test_console_output_is_readable_plain_text() -> None:
    stream = configure("info,nats=info", as_json=False)
    get_logger("troupe.runtime").info("runtime started", plane="tcp")
    logging.getLogger("nats").warning("reconnecting")
    text = stream.getvalue()
    lines = text.splitlines()
    assert len(lines) == 2
    assert "runtime started" in lines[0]
    assert "info" in lines[0]
    assert "troupe.runtime" in lines[0]
    assert "plane=tcp" in lines[0]
    assert "reconnecting" in lines[1]
    assert "warning" in lines[1]
    assert "\x1b[" not in text  # no colour codes
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


def test_configuring_twice_does_not_duplicate_output() -> None:
    stream = io.StringIO()
    config = LogConfig(level="info", json=True)
    configure_logging(config, stream=stream)
    configure_logging(config, stream=stream)
    get_logger("troupe.test").info("once")
    assert [r["event"] for r in json_lines(stream)] == ["once"]
    ours = [
        h
        for h in logging.getLogger("troupe").handlers
        if type(h).__module__ == "troupe._support._logging"
    ]
    assert len(ours) == 1
    assert logging.getLogger().handlers == [
        h for h in logging.getLogger().handlers if type(h).__module__ != "troupe._support._logging"
    ]


def test_reconfiguring_replaces_stream_format_and_target_levels() -> None:
    first = configure("warning,troupe.a=debug")
    second = configure("warning", as_json=False)
    get_logger("troupe.a").debug("target level from the first setup is gone")
    get_logger("troupe.a").warning("to the second stream")
    assert first.getvalue() == ""
    assert "to the second stream" in second.getvalue()
    assert "target level" not in second.getvalue()


def test_reset_restores_levels_and_removes_the_handler() -> None:
    root = logging.getLogger()
    target = logging.getLogger("troupe.reset_test")
    target.setLevel(logging.ERROR)
    before = (root.level, list(root.handlers))
    configure("debug,troupe.reset_test=trace")
    assert target.level == TRACE
    reset_logging()
    assert (root.level, list(root.handlers)) == before
    assert target.level == logging.ERROR
    target.setLevel(logging.NOTSET)


def test_default_stream_follows_sys_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogConfig(level="info", json=True))
    get_logger("troupe.test").info("to stderr")
    captured = capsys.readouterr()
    assert json.loads(captured.err.splitlines()[-1])["event"] == "to stderr"
    assert captured.out == ""


def test_the_applications_structlog_setup_is_left_alone() -> None:
    before = structlog.get_config()
    configure("info")
    assert structlog.get_config() == before


def test_a_worker_label_and_pid_tell_processes_apart() -> None:
    stream = io.StringIO()
    configure_logging(LogConfig(level="info", json=False), stream=stream, label="worker-2")
    get_logger("troupe.test").info("serving", endpoint="a.b.c")
    try:
        raise KeyError("k")
    except KeyError as exc:
        get_logger("troupe.test").error("failed", exc_info=exc)
    lines = stream.getvalue().splitlines()
    assert all(line.startswith(f"[worker-2 {os.getpid()}] ") for line in lines), lines
    assert len(lines) > 2  # the traceback's lines carry the prefix too
    stream = io.StringIO()
    configure_logging(LogConfig(level="info", json=True), stream=stream, label="worker-0")
    get_logger("troupe.test").info("serving")
    [record] = json_lines(stream)
    assert (record["worker"], record["pid"]) == ("worker-0", os.getpid())


def test_log_config_from_the_environment_drives_logging() -> None:
    config = Config.from_env({"DYN_LOG": "error,troupe.x=info", "DYN_LOGGING_JSONL": "true"})
    stream = io.StringIO()
    configure_logging(config.log, stream=stream)
    get_logger("troupe.x.y").info("kept")
    get_logger("troupe.z").warning("dropped")
    assert [r["event"] for r in json_lines(stream)] == ["kept"]
