"""The error hierarchy.

Every error persona raises derives from :class:`PersonaError`. Each subclass also inherits the
builtin a caller would naturally catch (``KeyError`` for something missing, ``ValueError`` for bad
input), so ``except KeyError`` keeps working for code that does not know persona.

Messages say what was wrong and what to do about it; the CLI prints them as they are.
"""

from __future__ import annotations


class PersonaError(Exception):
    """Base class of every error raised by persona."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else self.__class__.__name__


class InvalidName(PersonaError, ValueError):
    """An adapter name, alias or kind breaks the naming rule."""


class InvalidReference(PersonaError, ValueError):
    """A reference such as ``user:alice@v3`` or a stack ``A+B`` is malformed."""


class InvalidConfig(PersonaError, ValueError):
    """A configuration has an unknown key or a value out of range."""


class InvalidResponseFormat(InvalidConfig):
    """A ``response_format`` (JSON schema) that constrained decoding cannot follow."""


class InvalidPrompt(InvalidConfig):
    """A prompt the base cannot continue: no tokens at all, or more than its context holds."""


class InvalidInteractions(PersonaError, ValueError):
    """An interactions file has a bad line; the message names the file, the line and the reason."""


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


class NonFiniteWeights(PersonaError, ValueError):
    """Tensors holding NaN or infinity were about to be published; nothing was written."""


class BaseMismatch(PersonaError):
    """An adapter (or store) is bound to another base model fingerprint."""


class UnsafeWeightFile(PersonaError):
    """A weight file in a format persona never opens (pickle: ``.bin``, ``.pt``, ``.pth``, ...)."""


class BaseModelUnavailable(PersonaError, FileNotFoundError):
    """The base model cannot be found or loaded (missing package, offline without a cache, ...)."""


class LockTimeout(PersonaError, TimeoutError):
    """Another writer holds the adapter's lock for longer than the timeout."""


class Overloaded(PersonaError, RuntimeError):
    """A limit on work in flight is reached (the server's queue, or one token's concurrent requests); retry later."""
