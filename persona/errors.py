"""Every public error persona raises, and the one table that says what each means to a caller.

Every error derives from :class:`PersonaError`. Each subclass also inherits the builtin a caller
would naturally catch (``KeyError`` for something missing, ``ValueError`` for bad input), so
``except KeyError`` keeps working for code that does not know persona. Messages say what was wrong
and what to do about it; the CLI prints them as they are.

``ERROR_TABLE`` maps every class to one :class:`ErrorMapping` row: the HTTP status and OpenAI error
``type`` (and ``code``/``param`` where the class alone decides them) the server answers, and the
exit code of the ``persona`` command. :func:`mapping_for` reads it for an error or class (the
nearest class in its MRO that has a row), and both interfaces read only that:

>>> mapping_for(LockTimeout("held")).http_status
503
>>> mapping_for(IntegrityError).client_message is not None   # an API client gets a generic line
True

A row with ``client_message`` is a server-side fault whose own message is for the operator (it may
name paths or a CLI remedy such as ``persona verify``): the server logs it and answers the client
that line instead. ``InvalidConfig`` is split by who is at fault: :class:`InvalidRequest` (the
caller's request, 400), :class:`UnsupportedAdapter` (a stored adapter persona cannot run, 500),
:class:`CapacityExceeded` (a server limit, 503); a plain ``InvalidConfig`` is a bad value from the
caller (400).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal


class PersonaError(Exception):
    """Base class of every error raised by persona."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else self.__class__.__name__


# ------------------------------------------------------------------------------------ bad input
class InvalidName(PersonaError, ValueError):
    """An adapter name, alias or kind breaks the naming rule."""


class InvalidReference(PersonaError, ValueError):
    """A reference such as ``user:alice@v3`` or a stack ``A+B`` is malformed."""


class InvalidConfig(PersonaError, ValueError):
    """A configuration has an unknown key or a value out of range."""


def refuse_unknown_keys(cls: type, data: Any, what: str) -> None:
    """Raise :class:`InvalidConfig` naming any key of ``data`` that is not a field of dataclass ``cls``
    (what every config's ``from_dict`` checks before building itself)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidConfig(f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


class InvalidRequest(InvalidConfig):
    """A request that cannot be served as sent; ``param`` names the request field at fault when known,
    ``code`` is a machine-readable reason (OpenAI's ``error.code``)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class InvalidResponseFormat(InvalidRequest):
    """A ``response_format`` (JSON schema) that constrained decoding cannot follow."""


class InvalidPrompt(InvalidRequest):
    """A prompt the base cannot continue: no tokens at all, or more than its context holds."""


class RequestTooLarge(InvalidRequest):
    """An HTTP request body over the server's size limit (refused before it is read)."""


class InvalidInteractions(PersonaError, ValueError):
    """An interactions file has a bad line; the message names the file, the line and the reason."""


class AuthError(PersonaError, PermissionError):
    """A missing, malformed, unknown or revoked token."""


class CrossSiteRequest(PersonaError, PermissionError):
    """A dashboard form post without its session's CSRF token, or sent from another origin."""


# ------------------------------------------------------------------------------ store contents
class StoreNotInitialized(PersonaError, FileNotFoundError):
    """The store root has no ``persona.json``; run ``persona init`` first."""


class StoreExists(PersonaError, FileExistsError):
    """``init`` was asked to bind a store that is already bound to a (different) base."""


class AdapterNotFound(PersonaError, KeyError):
    """No adapter of that kind and name exists in the store."""


class NoDomainToRoute(AdapterNotFound):
    """``domain:auto`` has no domain left to pick: the stack already names every routable domain."""


class AdapterExists(PersonaError, FileExistsError):
    """``create`` was asked for an adapter that already exists."""


class ExportTargetExists(PersonaError, FileExistsError):
    """``export`` was asked to write into a folder that already holds files."""


class AdapterHasDependents(PersonaError):
    """Deleting an adapter that merged, copied or layered adapters depend on, without cascade."""

    def __init__(self, message: str, dependents: tuple[str, ...] = ()):
        super().__init__(message)
        self.dependents = dependents


class VersionNotFound(PersonaError, KeyError):
    """The adapter exists but has no such version or alias."""


class IntegrityError(PersonaError):
    """A published file no longer matches the sha256 recorded when it was written."""


class DamagedAdapter(IntegrityError):
    """A version's ``meta.json`` or an adapter's ``refs.json`` is unreadable, malformed, names a file
    outside its folder, or claims another adapter or version than the folder it is in.

    Only that adapter is damaged: it is listed as such, refused for loading, and can be deleted.
    """

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class StoreDamaged(IntegrityError):
    """The store's own files (``persona.json``, ``.retired.json``) are unreadable or malformed: the
    whole store, not one adapter, cannot be trusted until it is repaired."""


class UnsupportedStoreFormat(PersonaError):
    """The store was written in a format this version of persona does not read."""


class UnsupportedAdapter(InvalidConfig):
    """A stored adapter uses a LoRA feature or shape persona cannot run on this base."""


class IncompatibleAdapter(UnsupportedAdapter):
    """Weights given to persona (``persona import``, ``create`` from tensors) do not fit the store's base
    (a target module it lacks, a tensor of the wrong shape) or are not a LoRA persona serves; nothing
    was written."""


class AdapterSourceNotFound(PersonaError, FileNotFoundError):
    """An adapter to import is not there: no such folder, or a Hub id that is neither cached (offline)
    nor downloadable, or a folder without ``adapter_model.safetensors``."""


class NonFiniteWeights(PersonaError, ValueError):
    """Tensors holding NaN or infinity were about to be published; nothing was written."""


class BaseMismatch(PersonaError):
    """An adapter (or store) is bound to another base model fingerprint."""


class UnsafeWeightFile(PersonaError):
    """A weight file in a format persona never opens (pickle: ``.bin``, ``.pt``, ``.pth``, ...)."""


class BaseModelUnavailable(PersonaError, FileNotFoundError):
    """The base model cannot be found or loaded (missing package, offline without a cache, ...)."""


class DeviceUnavailable(PersonaError, RuntimeError):
    """The device (or dtype on it) asked for is not on this machine: ``cuda`` where torch sees no GPU,
    a GPU index past the last one, ``bfloat16`` on a GPU without it. Nothing was loaded."""


# ----------------------------------------------------------------------------- busy, try again
class LockTimeout(PersonaError, TimeoutError):
    """Another writer holds the adapter's lock for longer than the timeout."""


class Overloaded(PersonaError, RuntimeError):
    """A limit on work in flight is reached (the server's queue, or one token's concurrent requests); retry later."""


class CapacityExceeded(InvalidConfig):
    """The engine cannot hold what a batch needs at once (more adapters than ``max_resident``)."""


class MergeCacheFull(CapacityExceeded):
    """The store's cache of materialized merges is at its size cap (``PERSONA_MERGE_CACHE_MAX_BYTES``):
    a new stack is not merged; those already cached are still served."""


class EngineClosed(PersonaError, RuntimeError):
    """The engine was closed (or the server is stopping); it takes no more requests."""


class UpstreamUnavailable(PersonaError, ConnectionError):
    """The gateway (``persona serve --upstream``) reached none of its upstream servers."""


class UpstreamRejected(PersonaError):
    """An upstream refused the gateway itself (its ``--upstream-key``): the operator's setup, not the client's request."""


# ----------------------------------------------------------------------------------- the table
OpenAIType = Literal["invalid_request_error", "authentication_error", "requests", "server_error"]


@dataclass(frozen=True)
class ErrorMapping:
    """What one error class means to each interface.

    ``http_status``/``openai_type`` are the server's answer; ``code`` and ``param`` fill OpenAI's
    ``error.code``/``error.param`` when the class alone decides them (an :class:`InvalidRequest`
    may carry its own); ``client_message``, when set, replaces the error's message in the answer
    (the server logs the real one); ``exit_code`` is the ``persona`` command's exit status.
    """

    http_status: int
    openai_type: OpenAIType
    exit_code: int = 1
    code: str | None = None
    param: str | None = None
    client_message: str | None = None

    @property
    def retry_later(self) -> bool:
        """Whether the same request may succeed later (the server sends ``Retry-After``)."""
        return self.http_status in (429, 503)


_BAD = "invalid_request_error"
_SERVER = "server_error"
_DAMAGED = ("the adapter's stored files are damaged or were modified, so it cannot be served; "
            "the server's log has the details for its administrator")

# Exit codes: 1 for every library error (scripts tell them apart with --json's error.type); click's
# usage errors are 2 and an interrupt 130, outside this table.
ERROR_TABLE: dict[type[PersonaError], ErrorMapping] = {
    PersonaError: ErrorMapping(500, _SERVER, code="internal_error"),
    # the caller's input
    InvalidName: ErrorMapping(400, _BAD),
    InvalidReference: ErrorMapping(400, _BAD, code="invalid_model", param="model"),
    InvalidConfig: ErrorMapping(400, _BAD),
    InvalidRequest: ErrorMapping(400, _BAD),
    InvalidResponseFormat: ErrorMapping(400, _BAD, param="response_format"),
    InvalidPrompt: ErrorMapping(400, _BAD),
    RequestTooLarge: ErrorMapping(413, _BAD, code="request_too_large"),
    InvalidInteractions: ErrorMapping(400, _BAD),
    AuthError: ErrorMapping(401, "authentication_error", code="invalid_api_key"),
    CrossSiteRequest: ErrorMapping(403, _BAD, code="csrf_failed"),
    # what the store holds (or not)
    AdapterNotFound: ErrorMapping(404, _BAD, code="model_not_found", param="model"),
    VersionNotFound: ErrorMapping(404, _BAD, code="model_not_found", param="model"),
    NoDomainToRoute: ErrorMapping(400, _BAD, code="invalid_model", param="model"),
    AdapterExists: ErrorMapping(409, _BAD),
    AdapterHasDependents: ErrorMapping(409, _BAD),
    StoreExists: ErrorMapping(409, _BAD),
    ExportTargetExists: ErrorMapping(409, _BAD),
    # server-side faults: the operator's message is logged, the client gets client_message
    StoreNotInitialized: ErrorMapping(500, _SERVER, client_message="the server's adapter store is not set up"),
    UnsupportedStoreFormat: ErrorMapping(500, _SERVER, client_message="the server cannot read its adapter store"),
    IntegrityError: ErrorMapping(500, _SERVER, code="adapter_damaged", client_message=_DAMAGED),
    DamagedAdapter: ErrorMapping(500, _SERVER, code="adapter_damaged", client_message=_DAMAGED),
    StoreDamaged: ErrorMapping(500, _SERVER, code="store_damaged",
                               client_message="the server's adapter store is damaged; its log has the details"),
    UnsafeWeightFile: ErrorMapping(500, _SERVER, code="adapter_damaged", client_message=_DAMAGED),
    UnsupportedAdapter: ErrorMapping(500, _SERVER, code="adapter_unsupported"),
    IncompatibleAdapter: ErrorMapping(400, _BAD, code="adapter_incompatible"),
    AdapterSourceNotFound: ErrorMapping(400, _BAD),
    BaseMismatch: ErrorMapping(500, _SERVER, code="adapter_unsupported",
                               client_message="the adapter was made on another base model than the one this server runs"),
    NonFiniteWeights: ErrorMapping(500, _SERVER),
    BaseModelUnavailable: ErrorMapping(500, _SERVER, client_message="the server's base model is unavailable"),
    DeviceUnavailable: ErrorMapping(500, _SERVER, client_message="the server's device is unavailable"),
    # busy: the same request may work later
    LockTimeout: ErrorMapping(503, _SERVER, code="store_busy"),
    Overloaded: ErrorMapping(429, "requests", code="rate_limit_exceeded"),
    CapacityExceeded: ErrorMapping(503, _SERVER, code="capacity_exceeded"),
    MergeCacheFull: ErrorMapping(507, _SERVER, code="merge_cache_full",
                                 client_message="the server has no room to merge this stack now; cached stacks still run"),
    EngineClosed: ErrorMapping(503, _SERVER, code="server_stopping"),
    UpstreamUnavailable: ErrorMapping(503, _SERVER, code="upstream_unavailable",
                                      client_message="no upstream server could take the request; retry shortly"),
    UpstreamRejected: ErrorMapping(502, _SERVER, code="upstream_rejected",
                                   client_message="the gateway's upstream server refused it; its log has the details"),
}


def mapping_for(error: PersonaError | type[PersonaError]) -> ErrorMapping:
    """The row of ``error`` (an instance or a class): its own, else its nearest ancestor's."""
    cls = error if isinstance(error, type) else type(error)
    for klass in cls.__mro__:
        row = ERROR_TABLE.get(klass)
        if row is not None:
            return row
    raise TypeError(f"{cls.__name__} is not a PersonaError")
