"""`troupe call` as a user meets it: defaults in --help, a wait that says so, a request that is not
JSON reported as such, a handler's failure named (with the worker's traceback at debug level)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from troupe import Config, RequestContext, Runtime
from troupe.cli import main


@pytest.fixture
def file_kv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """File discovery shared by this process's runtimes and `troupe call` (run in-process)."""
    env = {
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_FILE_KV": str(tmp_path / "kv"),
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_LOG": "warning",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


async def words(request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
    for word in request["text"].split():
        yield word


async def boom(request: Any, ctx: RequestContext) -> AsyncIterator[Any]:
    raise ValueError(f"boom: {request}")
    yield None


@pytest.fixture
def worker(file_kv: dict[str, str]) -> Iterator[Runtime]:
    with Runtime(Config.from_env(file_kv), handle_signals=False) as rt:
        rt.serve("demo.backend.words", words)
        rt.serve("demo.backend.boom", boom)
        yield rt


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["call", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--wait SECONDS how long to wait for a first instance" in text
    assert "(default: 5; 0: fail at once)" in text
    assert "(default: round_robin)" in text
    assert "send the request N times (default: 1)" in text
    assert "default: null" in text


@pytest.mark.parametrize(
    ("request_text", "says"),
    [
        ("{bad", ["the request is not valid JSON", "line 1 column 2 (char 1)", "in '{bad'"]),
        (
            '{"text": "' + "word " * 40 + '", oops}',
            [
                "line 1 column 214 (char 213)",
                'in \'{"text": "word word word',
                "'... (218 characters)",
            ],
        ),
        ("", ["the request is empty"]),
    ],
    ids=["short", "long", "empty"],
)
def test_a_request_that_is_not_json_is_reported_as_such(
    request_text: str, says: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["call", "ns.comp.ep", request_text, "--wait", "0"]) == 2
    [line] = lines(capsys.readouterr().err)
    assert line.startswith("troupe: invalid request: ")
    assert "configuration error" not in line
    for text in says:
        assert text in line


def test_waiting_for_an_instance_is_said_then_ends_in_one_clear_line(
    file_kv: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["call", "demo.backend.nobody", '{"text": "x"}', "--wait", "0.6"]) == 1
    err = lines(capsys.readouterr().err)
    assert (
        err[0]
        == "troupe: no instance of demo.backend.nobody known yet; waiting up to 0.6 s (--wait)"
    )
    assert err[-1].startswith(
        "troupe: error: no instance of demo.backend.nobody appeared within 0.6 s (--wait)"
    )
    assert len(err) == 2


def test_an_instance_known_at_once_is_called_without_a_word_about_waiting(
    worker: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["call", "demo.backend.words", '{"text": "one two"}']) == 0
    out = capsys.readouterr()
    assert [json.loads(line) for line in lines(out.out)] == ["one", "two"]
    assert "waiting" not in out.err


def test_a_handler_failure_names_the_remote_type_and_message(
    worker: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["call", "demo.backend.boom", '"x"']) == 1
    # The worker runs in this process too: its own log lines (the traceback) go to stderr.
    [line] = [line for line in lines(capsys.readouterr().err) if line.startswith("troupe:")]
    assert line.startswith(
        "troupe: error: handler raised ValueError: boom: x (demo.backend.boom at "
    )


def test_at_debug_level_the_workers_traceback_comes_first(
    worker: Runtime, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DYN_LOG", "debug")  # for both runtimes: logging is process-wide
    assert main(["call", "demo.backend.boom", '"y"']) == 1
    err = capsys.readouterr().err
    assert "the worker's traceback:\nTraceback (most recent call last):" in err
    assert "in boom\n" in err
    assert lines(err)[-1].startswith("troupe: error: handler raised ValueError: boom: y (")
