"""Crash-safe file primitives: every write goes to a temp path in the same folder, is fsynced,
and appears under its final name through one ``os.replace``. A crash leaves the old state or the
new one, never a torn file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable

TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_sibling(path: Path) -> Path:
    """A fresh, hidden name beside ``path`` (same folder, so ``os.replace`` is atomic)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(6)}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = temp_sibling(path)
    try:
        with open(tmp, "xb") as f:
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


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, dumps_json(obj))


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
