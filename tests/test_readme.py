"""Every code block of README.md runs as written (issue 9, item 5).

The blocks run as written, from a scratch folder with no ``$PERSONA_HOME`` (``./adapters`` is the
store, as the README says), with two changes that keep the whole file under a minute of CPU time:

- the embedded base's name is replaced by the tiny random base (:data:`SUBSTITUTIONS`), same
  tokenizer, loaded in a second;
- ``examples/interactions/*.jsonl`` hold the first :data:`EXAMPLE_LINES` lines of the repository's
  files (the rest of ``examples/`` is linked as it is), so an update is a few steps.

``bash`` blocks run line by line through the CLI in-process (a subprocess per line would spend most
of its time importing torch); ``python`` blocks are executed. What does not run here is skipped with
its reason: a ``<!-- readme-test: skip (reason) -->`` line right before a block, or a line in
:data:`SKIPPED_LINES`.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EMBEDDED = "smollm2-135m-instruct"
EXAMPLE_LINES = 10

SKIP_MARKER = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>.+)\)\s*-->")
FENCE = re.compile(r"^```(?P<lang>[a-z]*)\n(?P<code>.*?)^```\n", re.S | re.M)

SKIPPED_LINES = {
    # runs until Ctrl-C; the server is started on loopback and driven by the openai client in test_server.py
    "persona serve": "serves until stopped",
}


def readme_blocks() -> list[tuple[int, str, str, str | None]]:
    """``(line, language, code, skip reason)`` of every fenced block with a language."""
    text = README.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        if not m.group("lang"):
            continue  # plain text (the layout tree), not code
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = SKIP_MARKER.fullmatch(before.strip())
        line = text.count("\n", 0, m.start()) + 1
        blocks.append((line, m.group("lang"), m.group("code"), marker.group("reason") if marker else None))
    return blocks


BLOCKS = readme_blocks()


def runnable(language: str) -> list:
    return [pytest.param(line, code, id=f"README.md:{line}")
            for line, lang, code, skip in BLOCKS if lang == language and skip is None]


def test_readme_blocks_are_all_bash_or_python_and_every_skip_says_why():
    assert {lang for _, lang, _, _ in BLOCKS} <= {"bash", "python"}
    runnable = [b for b in BLOCKS if b[3] is None]
    assert any(lang == "bash" for _, lang, _, _ in runnable) and any(lang == "python" for _, lang, _, _ in runnable)
    assert all(len(reason.split()) >= 3 for *_, reason in BLOCKS if reason is not None)


@pytest.fixture
def readme_folder(tmp_path, tiny_base, monkeypatch):
    """A scratch working folder with ``examples/``; the store is ``./adapters`` (no $PERSONA_HOME)."""
    work = tmp_path / "work"
    (work / "examples" / "interactions").mkdir(parents=True)
    for item in (ROOT / "examples").iterdir():
        if item.name != "interactions":
            (work / "examples" / item.name).symlink_to(item)
    for sample in (ROOT / "examples" / "interactions").glob("*.jsonl"):
        head = sample.read_text(encoding="utf-8").splitlines(keepends=True)[:EXAMPLE_LINES]
        (work / "examples" / "interactions" / sample.name).write_text("".join(head), encoding="utf-8")
    monkeypatch.chdir(work)
    monkeypatch.delenv("PERSONA_HOME", raising=False)
    return work


SUBSTITUTIONS = {EMBEDDED: "the tiny random base (tests/conftest.py): same tokenizer, seconds instead of minutes"}


def substitute(code: str, tiny_base: str) -> str:
    for name in SUBSTITUTIONS:
        code = code.replace(name, tiny_base)
    return code


def cli_lines(code: str) -> list[tuple[str, list[str]]]:
    """Each command of a bash block, split as the shell would (comments dropped)."""
    commands = []
    for raw in code.splitlines():
        args = shlex.split(raw, comments=True)
        if args:
            commands.append((raw, args))
    return commands


@pytest.mark.parametrize("line,code", runnable("bash"))
def test_readme_bash_block_runs(readme_folder, tiny_base, line, code):
    from persona.cli import main

    runner = CliRunner()
    ran = 0
    for raw, args in cli_lines(substitute(code, tiny_base)):
        assert args[0] == "persona", f"README.md:{line}: only persona commands run here: {raw}"
        if any(raw.startswith(prefix) for prefix in SKIPPED_LINES):
            continue
        result = runner.invoke(main, args[1:], catch_exceptions=False)
        assert result.exit_code == 0, f"README.md:{line}: `{raw.strip()}` failed:\n{result.output}"
        ran += 1
    assert ran >= 1
    assert (readme_folder / "adapters" / "persona.json").is_file()  # ./adapters, the documented default


@pytest.mark.parametrize("line,code", runnable("python"))
def test_readme_python_block_runs(readme_folder, tiny_base, line, code, capsys):
    namespace = {"__name__": "__readme__"}
    exec(compile(substitute(code, tiny_base), f"README.md:{line}", "exec"), namespace)
    assert (readme_folder / "adapters" / "persona.json").is_file()
    assert os.environ.get("PERSONA_HOME") is None
