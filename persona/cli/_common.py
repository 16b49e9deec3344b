"""What every ``persona`` command shares: the group that reports failures, ``--store``/``--json``,
options generated from the library's config dataclasses, and how a failure is shown.

A failure is one line on stderr and a non-zero exit, never a traceback (issue 10, item 12):

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

import dataclasses
import errno
import json
import os
import sys
import tempfile
import time
import traceback
import types
import typing
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Literal, Mapping, TypeVar

import click

from ..errors import PersonaError, mapping_for
from .._fs import TMP_PREFIX
from ..refs import MAX_STACK

BROKEN_PIPE_EXIT = 141  # what a shell reports for a command SIGPIPE killed (128 + 13)

if TYPE_CHECKING:
    from ..serving.engine import Engine
    from ..store import Store

F = TypeVar("F", bound=Callable[..., Any])

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


_ARGV = "persona.argv"


class PersonaGroup(click.Group):
    """Turns every failure into one line on stderr and a non-zero exit (see :func:`to_cli_error`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta.setdefault(_ARGV, list(args))  # the group's own parse: every argument, before the command's
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):  # a normal exit, or click's own "Aborted!"
            raise
        except BrokenPipeError:
            _quiet_broken_pipe()
        except (Exception, KeyboardInterrupt) as exc:
            # --json as the command parsed it; before its options were parsed, as it was typed
            as_json = ctx.meta.get(JSON_FLAG, "--json" in ctx.meta.get(_ARGV, ()))
            raise to_cli_error(exc, as_json, store_root=ctx.meta.get(STORE_ROOT)) from None


def _quiet_broken_pipe() -> typing.NoReturn:
    """A reader that stopped early (``persona show | head``) is not an error: exit as a tool killed by
    SIGPIPE does (128 + 13), with nothing on stderr. stdout now points at /dev/null, so the
    interpreter's final flush of the unsent bytes does not fail again on the way out."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    raise SystemExit(BROKEN_PIPE_EXIT)


def _remember_store(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from ..store import default_root

    ctx.meta[STORE_ROOT] = value or str(default_root())  # named by an error whose OSError names no file
    return value


def store_option(f: F) -> F:
    return click.option(
        "--store",
        "store_root",
        envvar="PERSONA_HOME",
        type=click.Path(file_okay=False),
        default=None,
        show_envvar=True,
        callback=_remember_store,
        help="Store root folder. Default: ./adapters.",
    )(f)


def _remember_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    ctx.meta[JSON_FLAG] = value  # meta is shared with the group, which prints errors as JSON then
    return value


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, callback=_remember_json,
                        help="Print machine-readable JSON on stdout (errors: {\"error\": {...}} on stderr).")(f)


def emit(as_json: bool, data: Any, text: str | None = None) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text`` (when there is one)."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    elif text is not None:
        click.echo(text)


def open_store(store_root: str | None) -> "Store":
    from ..store import Store

    return Store.open(store_root)


def open_engine(store_root: str | None, max_resident: int = 16, max_batch: int = 8, route_top_k: int = 1, *,
                device: str = "auto", dtype: str = "auto", **engine_options) -> "Engine":
    from ..serving.engine import Engine

    # The engine resolves device and dtype first: a missing GPU is refused before any weight is read.
    return Engine(open_store(store_root), max_resident=max_resident, max_batch=max_batch, route_top_k=route_top_k,
                  device=device, dtype=dtype, **engine_options)


def check_placement(device: str, dtype: str, *, training: bool = False) -> None:
    """Refuse a device or dtype this machine lacks (``--device cuda`` without a GPU) before anything else
    is read: the error is one line, and nothing was loaded."""
    from ..base import resolve_device

    resolve_device(device, dtype, training=training)


def placement_options(f: F) -> F:
    """``--device`` and ``--dtype`` (from :class:`persona.base.Placement`): where the base runs, in which dtype."""
    from ..base import Placement

    return options_from(Placement, {"device": "--device", "dtype": "--dtype"})(f)


def route_top_k_option(f: F) -> F:
    return click.option(
        "--route-top-k", type=click.IntRange(1, MAX_STACK), default=1, show_default=True,
        help="How many domain adapters domain:auto becomes, weighted by the router (softmax of their scores, "
             "summing to 1; 1: the best domain at weight 1).",
    )(f)


class FieldOption(click.Option):
    """An option generated from a config dataclass field: ``source`` is ``(dataclass, field name)``."""

    def __init__(self, *args: Any, source: tuple[type, str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.source = source


def _comma_tuple(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    return tuple(t.strip() for t in value.split(",") if t.strip()) if value else None


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    """The field's type, ``X | None`` read as ``X`` (a ``None`` default stays the option's default)."""
    hint = f.type
    if isinstance(hint, str):  # ``from __future__ import annotations``: evaluated where the class was written
        hint = eval(hint, vars(sys.modules[cls.__module__]))  # noqa: S307 - the dataclass's own annotation
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    return hint


def _option_kwargs(cls: type, f: dataclasses.Field) -> dict[str, Any]:
    hint, bounds = _field_type(cls, f), f.metadata.get("range")
    kwargs: dict[str, Any] = {"default": f.default, "show_default": True, "help": f.metadata.get("help")}
    if typing.get_origin(hint) is Literal:
        kwargs["type"] = click.Choice(list(typing.get_args(hint)))
    elif hint is bool:
        kwargs["is_flag"] = True
    elif hint is int:
        kwargs["type"] = click.IntRange(**bounds) if bounds else int
    elif hint is float:
        kwargs["type"] = click.FloatRange(**bounds) if bounds else float
    elif typing.get_origin(hint) is tuple and f.default == ():  # a repeatable option
        kwargs["multiple"] = True
    elif typing.get_origin(hint) is tuple:  # a tuple or None: comma-separated on the command line
        kwargs["callback"] = _comma_tuple
    else:
        raise TypeError(f"no option for {cls.__name__}.{f.name}: {hint!r}")
    return kwargs


def options_from(cls: type, options: Mapping[str, str]) -> Callable[[F], F]:
    """Click options for fields of the config dataclass ``cls``, in the order of ``options``.

    ``options`` maps a field name to its option declaration (``"--lr"``, ``"--supersede/--no-supersede"``).
    Each option's default is the field's default, its help the field's ``metadata["help"]``, and its
    type the field's type narrowed to ``metadata["range"]`` (``click.IntRange``/``FloatRange`` keywords),
    so a default, range or help is written once, on the dataclass. The command receives each value
    under the field's name.

    >>> @options_from(LoraSettings, {"rank": "--rank", "target_modules": "--targets"})  # doctest: +SKIP
    ... def create(rank, target_modules): ...
    """
    by_name = {f.name: f for f in dataclasses.fields(cls)}

    def decorate(command: F) -> F:
        for name, decls in reversed(options.items()):  # the last decorator applied is shown first
            option = click.option(*decls.split(), name, cls=FieldOption, source=(cls, name),
                                  **_option_kwargs(cls, by_name[name]))
            command = option(command)
        return command

    return decorate


def field_values(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a command's keyword arguments that are fields of ``cls``: ``cls(**field_values(cls, kw))``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}
