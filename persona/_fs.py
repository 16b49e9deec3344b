"""Crash-safe file primitives: every write goes to a temp path in the same folder, is fsynced,
and appears under its final name through one ``os.replace``. A crash leaves the old state or the
new one, never a torn file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Iterable

from .errors import IntegrityError

TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20
# Files holding a person's interactions or secrets (pending and replay queues, tokens) are created
# with this mode, never widened later: a chmod after the write leaves a window where others read it.
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path) -> Path:
    """A fresh, hidden name beside ``path`` (same folder, so ``os.replace`` is atomic)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(6)}")


def atomic_write_bytes(path: Path, data: bytes, mode: int = PUBLIC_MODE) -> None:
    """Replace ``path`` with ``data`` in one ``os.replace``; the temp file is created with ``mode``
    (the umask can only narrow it), so a private file is never readable by others, even mid-write."""
    tmp = temp_sibling(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def dumps_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: Path, obj: Any, mode: int = PUBLIC_MODE) -> None:
    atomic_write_bytes(path, dumps_json(obj), mode)


def read_regular_file(path: Path) -> bytes:
    """The bytes of ``path``, refusing a symlink (docs/STORE.md: no symlinks under the root) and
    anything that is not a regular file (a FIFO or device would block or never end).

    Raises ``FileNotFoundError`` when it is missing and :class:`IntegrityError` when it is unsafe.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise IntegrityError(f"{path} is a symlink; the store refuses symlinks (remove it, see `persona verify`)") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IntegrityError(f"{path} is not a regular file; the store holds only regular files and folders")
        return f.read()


def open_private_append(path: Path) -> int:
    """An ``O_APPEND`` descriptor on ``path``, created with :data:`PRIVATE_MODE`, never through a symlink.

    A file an older persona left wider than private is narrowed at once (it holds interactions).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0),
                     PRIVATE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise IntegrityError(f"{path} is a symlink; refusing to write through it (remove it, see `persona verify`)") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise IntegrityError(f"{path} is not a plain regular file (a device, pipe or hard link); refusing to write to it")
    if info.st_mode & 0o077:
        os.fchmod(fd, PRIVATE_MODE)
    return fd


def symlinks_under(root: Path) -> list[Path]:
    """Every symlink under ``root`` (not following any), relative to ``root``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if os.path.islink(os.path.join(dirpath, name)):
                found.append(Path(dirpath, name).relative_to(root))
    return sorted(found)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and then each folder, deepest first."""
    dirs = []
    for dirpath, _, filenames in os.walk(root):
        dirs.append(Path(dirpath))
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        fsync_dir(d)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def remove_tree(path: Path) -> None:
    """Make ``path`` disappear at once (rename to a hidden name), then delete its files."""
    if not path.exists():
        return
    doomed = temp_sibling(path)
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def stale_temp_paths(folder: Path, name: str | None = None) -> Iterable[Path]:
    """Temp paths in ``folder``: all of them, or only those made by :func:`temp_sibling` for ``name``."""
    if not folder.is_dir():
        return
    exact = re.compile(re.escape(f"{TMP_PREFIX}{name}-") + r"[0-9a-f]{12}") if name is not None else None
    for p in folder.iterdir():
        if p.name.startswith(TMP_PREFIX) and (exact is None or exact.fullmatch(p.name)):
            yield p


def remove_stale(folder: Path, name: str | None = None) -> None:
    """Remove temp files and dirs a crashed writer left in ``folder``. Call with the lock held."""
    for stale in list(stale_temp_paths(folder, name)):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
