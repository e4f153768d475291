"""The code blocks of README.md and docs/*.md run as written, and the docs stand alone.

Every fenced block names its language. A ``python``, ``bash``, ``sh`` or ``shell`` block either
runs as written on the embedded defaults (no etcd, NATS or Kubernetes) or says ``fragment`` after
its language (```` ```python fragment ````): an excerpt that needs context it does not show.
Each runnable block is one test, named ``file:line``:

- a Python block runs with this interpreter in an empty temporary directory;
- a shell block runs with ``bash -e`` from the repository root, this interpreter's
  directory (the virtualenv's ``bin``) first on ``PATH``.

Both get a scrubbed environment (no ``DYN_``/``ETCD_``/``NATS_``/``POD_`` variables: only what
the block sets itself) whose ``TMPDIR`` is the test's own directory, so the file store's default
directory is private to the block. A block must finish within its timeout, exit 0, and leave no
process running; every ``# prints: TEXT`` comment in it must appear in what it printed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))

RUNNABLE = frozenset({"python", "bash", "sh", "shell"})
FRAGMENT = "fragment"
BLOCK_TIMEOUT = 60.0  # seconds each runnable block may take
_SCRUBBED_PREFIXES = ("DYN_", "ETCD_", "NATS_", "POD_")
_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_PRINTS = re.compile(r"#\s*prints:\s*(?P<text>.+?)\s*$")

# What a public doc must not name: paths outside the repository and internal shorthand.
_FORBIDDEN = (
    (re.compile(r"shared/"), "a path outside the repository"),
    # `seed`, the OpenAI request field, may stay: only the word outside code spans and quotes.
    (re.compile(r"(?<![`\"'\w])seeds?\b", re.IGNORECASE), "internal shorthand 'the seed'"),
    (re.compile(r"\bthe issue\b", re.IGNORECASE), "internal shorthand 'the issue'"),
    (re.compile(r"\bDESIGN\b"), "the internal design document"),
    (re.compile(r"design card", re.IGNORECASE), "internal shorthand 'the design card'"),
)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    doc: Path
    line: int  # of the opening fence, 1-based
    language: str
    words: tuple[str, ...]  # the info string's words after the language
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def fragment(self) -> bool:
        return FRAGMENT in self.words


def extract_blocks(doc: Path, markdown: str) -> list[Block]:
    """The fenced code blocks of ``markdown`` (CommonMark fences: backticks or tildes)."""
    blocks: list[Block] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence = opening["fence"]
        info = opening["info"].split()
        body: list[str] = []
        end = index + 1
        while end < len(lines):
            closing = lines[end].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[end])
            end += 1
        language = info[0] if info else ""
        words = tuple(info[1:])
        blocks.append(Block(doc, index + 1, language, words, "\n".join(body) + "\n"))
        index = end + 1
    return blocks


def _all_blocks() -> list[Block]:
    return [block for doc in DOCS for block in extract_blocks(doc, doc.read_text())]


BLOCKS = _all_blocks()
RUNNABLE_BLOCKS = [b for b in BLOCKS if b.language in RUNNABLE and not b.fragment]


# --- the rules --------------------------------------------------------------------------------


def test_the_extractor_sees_languages_and_fragments() -> None:
    markdown = (
        "text\n```python\nprint(1)\n```\n~~~~bash fragment\n```\nmake test\n~~~~\n```\nx\n```\n"
    )
    blocks = extract_blocks(ROOT / "README.md", markdown)
    assert [(b.line, b.language, b.fragment, b.text) for b in blocks] == [
        (2, "python", False, "print(1)\n"),
        (5, "bash", True, "```\nmake test\n"),
        (9, "", False, "x\n"),
    ]


def test_every_block_names_its_language_and_marks_only_fragments() -> None:
    assert len(RUNNABLE_BLOCKS) >= 5, "the extractor found almost no blocks"
    unmarked = [b.id for b in BLOCKS if not b.language]
    assert not unmarked, f"blocks with no language (use ```text for plain text): {unmarked}"
    odd = [
        f"{b.id}: {' '.join((b.language, *b.words))!r}"
        for b in BLOCKS
        if b.words and (b.words != (FRAGMENT,) or b.language not in RUNNABLE)
    ]
    assert not odd, (
        f"info strings other than '<language>' or '<python|bash|sh|shell> fragment': {odd}"
    )


def test_docs_stand_alone() -> None:
    """No path outside the repository, no internal shorthand."""
    found = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            for pattern, what in _FORBIDDEN:
                if pattern.search(line):
                    found.append(f"{doc.relative_to(ROOT)}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


# --- running the blocks ---------------------------------------------------------------------


def _environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env["TMPDIR"] = str(tmp_path)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stat(pid: str) -> tuple[str, str, int] | None:
    """A process's command name, state and process group; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    return head.partition("(")[2], fields[0], int(fields[2])


def _alive(pid: str) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] != "Z"


def _group_members(pgid: int) -> list[str]:
    """The live (not zombie) processes of process group ``pgid``, as 'pid command'."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _stat(entry.name)
        if stat is not None and stat[2] == pgid and stat[1] != "Z":
            members.append(f"{entry.name} {stat[0]}")
    return members


def _stop_group(pgid: int, grace: float) -> list[str]:
    """Kill what is left of the block's process group; return what was left."""
    deadline = time.monotonic() + grace  # a block's own `kill` may still be landing
    left = _group_members(pgid)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _group_members(pgid)
    if left:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@dataclass(frozen=True)
class Run:
    """What running a block gave: its exit status (None: timed out), output, leftovers."""

    returncode: int | None
    output: str
    left: list[str]


def run_block(
    block: Block, tmp_path: Path, timeout: float = BLOCK_TIMEOUT, grace: float = 5.0
) -> Run:
    """Run ``block`` as the module docstring says, in its own session; clean up after it."""
    if block.language == "python":
        script = tmp_path / "block.py"
        command = [sys.executable, str(script)]
        cwd = tmp_path
    else:
        script = tmp_path / "block.sh"
        command = ["bash", "-e", str(script)]
        cwd = ROOT
    script.write_text(block.text)
    log = tmp_path / "output.txt"
    # A file, not a pipe: a process the block leaves behind must not hold the test up.
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=_environment(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        returncode: int | None
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        finally:
            left = _stop_group(process.pid, grace)
    return Run(returncode, log.read_text(), left)


def missing_prints(block: Block, output: str) -> list[str]:
    """The ``# prints: TEXT`` promises of ``block`` that ``output`` does not keep."""
    shown = (_PRINTS.search(line) for line in block.text.splitlines())
    return [match["text"] for match in shown if match is not None and match["text"] not in output]


@pytest.mark.timeout(BLOCK_TIMEOUT + 30)
@pytest.mark.parametrize("block", RUNNABLE_BLOCKS, ids=[b.id for b in RUNNABLE_BLOCKS])
def test_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    run = run_block(block, tmp_path)
    assert run.returncode is not None, f"{block.id} ran past {BLOCK_TIMEOUT:.0f} s:\n{run.output}"
    assert run.returncode == 0, f"{block.id} exited {run.returncode}:\n{run.output}"
    assert not run.left, f"{block.id} left processes running: {run.left}\n{run.output}"
    missing = missing_prints(block, run.output)
    assert not missing, f"{block.id} did not print {missing}:\n{run.output}"


# --- the runner itself ----------------------------------------------------------------------


def _block(language: str, text: str) -> Block:
    return Block(ROOT / "README.md", 1, language, (), text)


def test_a_block_sees_no_troupe_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_DISCOVERY_BACKEND", "etcd")
    monkeypatch.setenv("ETCD_ENDPOINTS", "http://192.0.2.1:2379")
    code = (
        "import os, tempfile\nprint([k for k in os.environ if k.startswith(('DYN_', 'ETCD_'))])\n"
    )
    code += "print(tempfile.gettempdir())\n"
    run = run_block(_block("python", code), tmp_path)
    assert run.returncode == 0, run.output
    assert run.output.splitlines() == ["[]", str(tmp_path)]


def test_a_block_that_leaves_a_process_behind_is_caught(tmp_path: Path) -> None:
    run = run_block(_block("bash", "sleep 30 &\necho started\n"), tmp_path, grace=0.5)
    assert run.returncode == 0
    assert run.output == "started\n"
    assert [entry.split()[1] for entry in run.left] == ["sleep"]
    pid = run.left[0].split()[0]
    deadline = time.monotonic() + 5.0
    while _alive(pid):
        assert time.monotonic() < deadline, "the leftover process was not killed"
        time.sleep(0.02)


def test_a_block_that_fails_or_hangs_is_caught(tmp_path: Path) -> None:
    (tmp_path / "failing").mkdir()
    failing = run_block(_block("bash", "false\necho not reached\n"), tmp_path / "failing")
    assert failing.returncode == 1
    assert failing.output == ""
    hanging = run_block(_block("python", "import time\ntime.sleep(30)\n"), tmp_path, timeout=1)
    assert hanging.returncode is None
    assert not hanging.left


def test_prints_comments_are_promises() -> None:
    block = _block("python", "print(1 + 2)  # prints: 3\nprint('a')\n# prints: b c\n")
    assert missing_prints(block, "3\na\n") == ["b c"]
    assert missing_prints(block, "3\nb c\n") == []
