"""How the ``persona`` command reports a failure: one line on stderr and a non-zero exit, never a
traceback (issue 10, item 12).

- A library error (:class:`~persona.errors.PersonaError`) prints its message as it is and exits with
  the code of its row in :data:`persona.errors.ERROR_TABLE`.
- An ``OSError`` (a missing file, a read-only store, a full disk) prints what failed, on which
  path, and what to do.
- Anything else is a bug: one line naming it, and the file the full traceback was written to
  (under ``$PERSONA_CACHE/errors/``, or the system temp dir when that cannot be written).
- With ``--json``, the error is ``{"error": {"type": ..., "message": ...}}`` on stderr instead
  (issue 9, item 6), so a script reading stdout never mistakes it for data.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import IO, Any

import click

from ..errors import PersonaError, mapping_for
from .._fs import TMP_PREFIX

JSON_FLAG = "persona.json"
"""``ctx.meta`` key: whether the running command was given ``--json`` (set by its option)."""
STORE_ROOT = "persona.store"
"""``ctx.meta`` key: the store root the running command uses (set by its ``--store`` option)."""
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

_REMEDY = {
    errno.ENOSPC: "the disk is full: free some space and run the command again",
    errno.EDQUOT: "the disk quota is exhausted: free some space and run the command again",
    errno.EROFS: "the file system is read-only: use a writable --store (or $PERSONA_HOME)",
    errno.EACCES: "permission denied: check the folder's owner and mode, or use another --store",
    errno.EPERM: "operation not permitted: check the folder's owner and mode, or use another --store",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "it is a folder, not a file",
}


class CliError(click.ClickException):
    """A failure as the user sees it: ``Error: message`` or, with ``--json``, a JSON object on stderr."""

    def __init__(self, message: str, type_name: str, *, as_json: bool, exit_code: int = 1):
        super().__init__(message)
        self.type_name = type_name
        self.as_json = as_json
        self.exit_code = exit_code

    def show(self, file: IO[Any] | None = None) -> None:
        if not self.as_json:
            super().show(file)
            return
        body = json.dumps({"error": {"type": self.type_name, "message": self.message}}, ensure_ascii=False)
        click.echo(body, file=file, err=file is None)


def _shown_path(name: Any) -> str:
    """A temp name (``.tmp-x-1a2b``) means nothing to a user: name the folder it was being written in."""
    path = Path(os.fsdecode(name))
    return f"cannot write in {path.parent}" if path.name.startswith(TMP_PREFIX) else str(path)


def describe_os_error(exc: OSError, store_root: str | None = None) -> str:
    """``/store/user/alice/pending.jsonl: the disk is full: free some space ...``, in one line.

    A failed ``write(2)`` names no file; then a write error names the store the command writes to.
    """
    what = _REMEDY.get(exc.errno) or (exc.strerror or str(exc) or type(exc).__name__)
    where = _shown_path(exc.filename) if exc.filename is not None else None
    if where is None and store_root and exc.errno in _WRITE_ERRORS:
        where = f"cannot write in the store {store_root}"
    if where and exc.filename2 is not None:
        where = f"{where} -> {_shown_path(exc.filename2)}"
    return " ".join((f"{where}: {what}" if where else what).split())


def _traceback_dirs() -> list[Path]:
    from ..base import cache_dir

    return [cache_dir() / "errors", Path(tempfile.gettempdir())]


def write_traceback(exc: BaseException) -> Path | None:
    """Save ``exc``'s full traceback to a private file; its path, or None when nothing could be written."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for folder in _traceback_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"persona-error-{stamp}-", suffix=".txt", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:  # mkstemp: mode 0600
                f.write(text)
            return Path(name)
        except OSError:
            continue
    return None


def to_cli_error(exc: BaseException, as_json: bool, store_root: str | None = None) -> click.ClickException:
    """Turn any exception a command raised into the one-line error that is shown."""
    if isinstance(exc, click.ClickException):
        if not as_json:
            return exc
        return CliError(exc.format_message(), type(exc).__name__, as_json=True, exit_code=exc.exit_code)
    if isinstance(exc, PersonaError):
        return CliError(str(exc), type(exc).__name__, as_json=as_json, exit_code=mapping_for(exc).exit_code)
    if isinstance(exc, KeyboardInterrupt):
        return CliError("interrupted; nothing was published", "Interrupted", as_json=as_json, exit_code=130)
    if isinstance(exc, OSError):
        return CliError(describe_os_error(exc, store_root), type(exc).__name__, as_json=as_json)
    saved = write_traceback(exc)
    where = f"full traceback in {saved}" if saved else "the traceback could not be saved (no writable folder)"
    summary = " ".join(str(exc).split())[:300]
    message = f"unexpected {type(exc).__name__}{': ' + summary if summary else ''} (a bug in persona; {where})"
    return CliError(message, type(exc).__name__, as_json=as_json)
