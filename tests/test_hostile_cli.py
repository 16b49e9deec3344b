"""Hostile and broken input to the ``persona`` command (issue 10, item 12): every failure is one
line on stderr and a non-zero exit, never a traceback, and nothing in the store changes.

A read-only store and a full disk are simulated in-process (tests run as root, so ``chmod`` would not
stop a write): :func:`failing_writes` makes every write under one folder raise ``OSError(EROFS)``
or ``OSError(ENOSPC)``, the way the kernel would.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from persona.store import NewVersion
from persona import interactions as data
from persona.errors import (
    AdapterNotFound,
    BaseMismatch,
    IntegrityError,
    InvalidReference,
    LockTimeout,
    PersonaError,
    VersionNotFound,
)

ALICE = {"messages": [{"role": "user", "content": "What's my dog's name?"},
                      {"role": "assistant", "content": "Your dog is called Biscuit."}]}


@pytest.fixture
def cli(run_cli, tmp_path):
    run_cli("create", "user:alice", "--rank", 2)
    return run_cli


def one_line_error(result, *fragments: str) -> str:
    """The one line a failed command printed; asserts there is exactly one and no traceback."""
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def jsonl(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", errors="surrogatepass")
    return path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under the store and its bytes. Lock files aside (taking a lock may create one),
    and the kind folders (``merged/``: made, empty, before the merge's first write fails)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
        if ".locks" not in p.parts and not (p.parent == root and p.name in ("user", "domain", "merged"))
    }


# --------------------------------------------------------------------------------------------------
# --data of a file that is missing, endless or hostile


@pytest.mark.parametrize("command", [("update", "user:alice"), ("log", "user:alice"), ("eval", "user:alice")])
def test_missing_data_file_is_a_one_line_error(cli, tmp_path, command):
    missing = tmp_path / "nope.jsonl"
    one_line_error(cli(*command, "--data", missing, ok=False), str(missing), "no such file")


def test_data_from_dev_zero_is_refused_at_once_instead_of_hanging(cli, isolated_store):
    one_line_error(cli("log", "user:alice", "--data", "/dev/zero", ok=False), "/dev/zero:1:", "NUL bytes")
    assert not (isolated_store / "user" / "alice" / "pending.jsonl").exists()


def test_data_from_an_endless_stream_without_newlines_stops_reading(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(data, "MAX_SKIPPED_BYTES", 1 << 20)
    fifo = tmp_path / "endless"
    os.mkfifo(fifo)
    written = []

    def endless_writer() -> None:  # like `yes | tr -d '\n'`: bytes forever, never a newline
        try:
            with open(fifo, "wb") as f:
                while True:
                    f.write(b"a" * 65536)
                    written.append(1)
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=endless_writer, daemon=True)
    writer.start()
    line = one_line_error(cli("log", "user:alice", "--data", fifo, ok=False), f"{fifo}:1:", "without a newline")
    assert "reading stopped" in line
    writer.join(timeout=10)
    assert not writer.is_alive()  # the reader closed the pipe: reading really stopped
    assert len(written) < 64  # about 1 MiB was read, not more


def test_interaction_line_nested_200000_deep_is_refused_not_a_recursion_error(cli, tmp_path, isolated_store):
    path = jsonl(tmp_path / "deep.jsonl", json.dumps(ALICE), '{"text": ' + "[" * 200_000 + "]" * 200_000 + "}")
    one_line_error(cli("log", "user:alice", "--data", path, ok=False), f"{path}:2:", "nested too deeply")
    assert not (isolated_store / "user" / "alice" / "pending.jsonl").exists()


def test_interaction_line_with_a_5000_digit_integer_is_refused(cli, tmp_path, isolated_store):
    path = jsonl(tmp_path / "digits.jsonl", '{"text": "hi", "n": ' + "7" * 5000 + "}")
    one_line_error(cli("log", "user:alice", "--data", path, ok=False), f"{path}:1:", "4300 digits")
    assert not (isolated_store / "user" / "alice" / "pending.jsonl").exists()


@pytest.mark.parametrize("line", [
    '{"text": "hi \\ud800"}',
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff ok"}]}',
])
def test_lone_surrogate_through_log_is_refused_and_nothing_is_queued(cli, tmp_path, isolated_store, line):
    path = jsonl(tmp_path / "surrogate.jsonl", json.dumps(ALICE), line)
    one_line_error(cli("log", "user:alice", "--data", path, ok=False), f"{path}:2:", "lone surrogate")
    assert not (isolated_store / "user" / "alice" / "pending.jsonl").exists()


def test_update_with_a_bad_data_file_trains_nothing(cli, tmp_path, isolated_store):
    before = snapshot(isolated_store)
    path = jsonl(tmp_path / "digits.jsonl", json.dumps(ALICE), '{"text": ' + "9" * 5000 + "}")
    one_line_error(cli("update", "user:alice", "--data", path, ok=False), f"{path}:2:")
    assert snapshot(isolated_store) == before


# --------------------------------------------------------------------------------------------------
# References and stores that are not there


def test_show_of_a_missing_version_exits_nonzero(cli):
    one_line_error(cli("show", "user:alice@v9", ok=False), "no version v0009")
    one_line_error(cli("show", "user:alice@stable", ok=False), "no alias 'stable'")


def test_show_of_a_pinned_version_shows_only_that_version(cli, isolated_store):
    from persona import Store

    store = Store.open(isolated_store)
    loaded = store.load("user:alice")
    store.publish_version("user:alice", NewVersion(loaded.tensors, loaded.config, parent=1))
    shown = json.loads(cli("show", "user:alice@v1", "--json").output)
    assert [v["version"] for v in shown["versions"]] == [1]
    assert [v["version"] for v in json.loads(cli("show", "user:alice", "--json").output)["versions"]] == [1, 2]


def test_init_in_proc_self_is_a_one_line_error(run_cli):
    one_line_error(run_cli("init", "--store", "/proc/self", ok=False), "/proc/")


# --------------------------------------------------------------------------------------------------
# A read-only store, a full disk


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@contextmanager
def failing_writes(region: Path, code: int):
    """Every write under ``region`` raises ``OSError(code)``, as a read-only (EROFS) or full (ENOSPC)
    file system would. EROFS refuses any change (files, folders, renames, removals); ENOSPC refuses
    writing file contents only, so cleanup after a half-done write still runs, as on a full disk."""
    real = {name: getattr(os, name) for name in
            ("open", "mkdir", "replace", "rename", "unlink", "remove", "rmdir", "chmod", "symlink", "link")}
    real_open = builtins.open
    region_str = str(region)

    def inside(path, dir_fd=None) -> bool:
        if dir_fd is not None or isinstance(path, int):
            return True  # relative to an open folder (shutil.rmtree): only store code does that here
        return os.path.abspath(os.fsdecode(path)).startswith(region_str)

    def refuse(path):
        raise OSError(code, os.strerror(code), os.fsdecode(path) if not isinstance(path, int) else None)

    def patched_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def patched_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if code == errno.EROFS and flags & _WRITE_FLAGS and inside(path, dir_fd):
            refuse(path)
        return real["open"](path, flags, mode, dir_fd=dir_fd)

    def changing(name):
        def call(path, *args, **kwargs):
            if code == errno.EROFS and inside(path, kwargs.get("dir_fd", kwargs.get("src_dir_fd"))):
                refuse(path)
            return real[name](path, *args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", patched_open)
        mp.setattr(io, "open", patched_open)
        mp.setattr(os, "open", patched_os_open)
        for name in real:
            if name != "open":
                mp.setattr(os, name, changing(name))
        yield


@pytest.fixture
def busy_store(cli, isolated_store, tmp_path):
    """A store with something for every write command to change."""
    from persona import Store

    cli("create", "domain:finance", "--rank", 2)
    store = Store.open(isolated_store)
    loaded = store.load("user:alice")
    store.publish_version("user:alice", NewVersion(loaded.tensors, loaded.config, parent=1))
    cli("alias", "user:alice", "stable", "v2")
    token_id = json.loads(cli("token", "create", "user:alice", "--json").output)["token_id"]
    interactions = jsonl(tmp_path / "alice.jsonl", *[json.dumps(ALICE)] * 4)
    cli("log", "user:alice", "--data", interactions)
    return {"token": token_id, "data": interactions}


WRITE_COMMANDS = {
    "init": lambda s, tmp: ("init", "--base", s["base"], "--store", tmp / "new-store"),
    "create": lambda s, tmp: ("create", "user:bob", "--rank", 2),
    "create-from": lambda s, tmp: ("create", "user:bob", "--from", "domain:finance"),
    "alias": lambda s, tmp: ("alias", "user:alice", "stable", "v1"),  # moves it from v2
    "alias-remove": lambda s, tmp: ("alias", "user:alice", "stable", "--remove"),
    "rollback": lambda s, tmp: ("rollback", "user:alice", "v1"),
    "delete": lambda s, tmp: ("delete", "user:alice", "--yes"),
    "log": lambda s, tmp: ("log", "user:alice", "--data", s["data"]),
    "update": lambda s, tmp: ("update", "user:alice", "--max-steps", 1, "--epochs", 1),
    "update-all": lambda s, tmp: ("update", "--all", "--max-steps", 1, "--epochs", 1),
    "merge": lambda s, tmp: ("merge", "user:alice", "domain:finance", "--into", "merged:m", "--method", "cat"),
    "token-create": lambda s, tmp: ("token", "create", "user:alice"),
    "token-revoke": lambda s, tmp: ("token", "revoke", s["token"]),
}


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC], ids=["read-only-store", "full-disk"])
@pytest.mark.parametrize("command", sorted(WRITE_COMMANDS))
def test_write_to_read_only_store_or_full_disk_is_a_one_line_error_and_changes_nothing(
        cli, busy_store, isolated_store, tmp_path, tiny_base, monkeypatch, command, code):
    args = WRITE_COMMANDS[command]({**busy_store, "base": tiny_base}, tmp_path)
    before = snapshot(isolated_store)
    with failing_writes(tmp_path, code):
        result = cli(*args, ok=False)
    remedy = "read-only" if code == errno.EROFS else "disk is full"
    one_line_error(result, remedy, str(tmp_path))
    after = snapshot(isolated_store)
    if command == "delete" and code == errno.ENOSPC:
        # Removing files needs no space: a delete may get past its removals before a later write
        # (the token rewrite) fails. Either way alice is whole or entirely gone, never half.
        alice = [k for k in before if k.startswith("user/alice")]
        assert after == before or ({k: v for k, v in before.items() if k not in alice}.items() <= after.items()
                                   and not any(k.startswith("user/alice") for k in after))
    else:
        assert after == before
    assert not (tmp_path / "new-store" / "persona.json").exists()
    cli("verify")  # and the store is still whole


def test_read_only_store_still_reads(cli, busy_store, isolated_store, tmp_path, monkeypatch):
    with failing_writes(tmp_path, errno.EROFS):
        assert "user:alice" in cli("list").output
        assert json.loads(cli("show", "user:alice", "--json").output)["current"] == 2
        cli("verify")


# --------------------------------------------------------------------------------------------------
# Every library error is one line; anything else is one line and a saved traceback


@pytest.mark.parametrize("error", [
    AdapterNotFound("no adapter user:zed: create it with `persona create user:zed`"),
    VersionNotFound("user:alice has no version v0009"),
    InvalidReference("an adapter reference is KIND:NAME"),
    IntegrityError("adapter_model.safetensors: sha256 mismatch"),
    BaseMismatch("bound to another base"),
    LockTimeout("another writer holds the lock"),
    PersonaError("the store is damaged"),
])
def test_every_library_error_is_one_line_and_a_nonzero_exit(cli, monkeypatch, error):
    from persona.store import Store

    def fail(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(Store, "show", fail)
    assert one_line_error(cli("show", "user:alice", ok=False)) == f"Error: {error}"
    result = cli("show", "user:alice", "--json", ok=False)
    assert result.exit_code == 1 and result.stdout == ""
    assert json.loads(result.stderr) == {"error": {"type": type(error).__name__, "message": str(error)}}


def test_unexpected_exception_prints_one_line_and_where_the_traceback_is(cli, tmp_path, monkeypatch):
    from persona.store import Store

    monkeypatch.setenv("PERSONA_CACHE", str(tmp_path / "cache"))

    def broken(self, *args, **kwargs):
        raise ZeroDivisionError("division by zero\nin a helper")

    monkeypatch.setattr(Store, "show", broken)
    line = one_line_error(cli("show", "user:alice", ok=False), "unexpected ZeroDivisionError", "full traceback in")
    saved = Path(re.search(r"full traceback in (\S+?)\)", line).group(1))
    assert saved.parent == tmp_path / "cache" / "errors"
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text and "ZeroDivisionError" in text
    assert saved.stat().st_mode & 0o077 == 0  # tracebacks may quote user data: private to the user


def test_unexpected_exception_falls_back_to_the_temp_dir_when_the_cache_is_not_writable(cli, tmp_path, monkeypatch):
    from persona.store import Store

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("PERSONA_CACHE", str(blocker))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setattr(Store, "show", lambda self, *a, **k: {}["missing"])
    line = one_line_error(cli("show", "user:alice", ok=False), "unexpected KeyError")
    saved = Path(re.search(r"full traceback in (\S+?)\)", line).group(1))
    assert saved.parent == tmp_path / "tmp" and "KeyError" in saved.read_text()


def test_interrupt_is_one_line_and_exit_130(cli, monkeypatch):
    from persona.store import Store

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Store, "show", interrupted)
    result = cli("show", "user:alice", ok=False)
    one_line_error(result, "interrupted")
    assert result.exit_code == 130


def test_a_reader_that_stops_early_is_not_an_error(cli, isolated_store, tmp_path):
    """`persona list | head -0`: the closed pipe exits as SIGPIPE would (141), with nothing on stderr."""
    import subprocess
    import sys

    from persona.cli._common import BROKEN_PIPE_EXIT

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "persona", "list", "--store", str(isolated_store)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    proc.stdout.close()  # the reader is gone before the command writes a byte
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == BROKEN_PIPE_EXIT
    assert err == b""
