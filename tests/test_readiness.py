"""The readiness channel's messages, codec and the worker's end of it."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from troupe._readiness import (
    Draining,
    Failed,
    ParentLink,
    Serving,
    decode_report,
    encode_report,
    one_line,
)
from troupe.errors import ConfigError


def test_reports_round_trip_one_line_each() -> None:
    reports = [
        Serving(pid=7, instance_id="ab", address="tcp://127.0.0.1:1", status_url=None),
        Serving(pid=7, instance_id="ab", address="tcp://h:1", status_url="http://h:2"),
        Failed(error="port in use", config=True),
        Draining(),
    ]
    for report in reports:
        line = encode_report(report)
        assert line.endswith(b"\n")
        assert line.count(b"\n") == 1
        assert decode_report(line) == report


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\n", b"hello", b"\xff\xfe", b'{"type": "nope"}', b'{"type": "serving"}', b"[1, 2]"],
)
def test_anything_else_decodes_to_none(garbage: bytes) -> None:
    assert decode_report(garbage) is None


def test_one_line_folds_and_cuts() -> None:
    assert one_line("a\n  b\tc\n") == "a b c"
    assert one_line("x" * 50, limit=10) == "x" * 9 + "…"


def test_parent_link_reports_and_notices_the_parent_leaving() -> None:
    parent, child = socket.socketpair()
    link = ParentLink(os.dup(child.fileno()))
    child.close()
    gone = threading.Event()
    try:
        assert link.report(Draining())
        assert decode_report(parent.recv(4096)) == Draining()
        link.watch_parent(gone.set)
        assert not gone.wait(0.05)
        parent.close()  # the parent dies
        assert gone.wait(5)
        assert not link.report(Draining())  # nobody to tell: no exception either
    finally:
        link.close()
        parent.close()


def test_parent_link_close_stops_watching_without_calling_back() -> None:
    parent, child = socket.socketpair()
    link = ParentLink(os.dup(child.fileno()))
    child.close()
    called = threading.Event()
    link.watch_parent(called.set)
    link.close()  # joins the watcher thread
    assert not called.is_set()
    assert not link.report(Draining())
    parent.close()


def test_parent_link_on_a_bad_descriptor_is_a_config_error() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(ConfigError, match="--ready-fd"):
        ParentLink(r)
