"""Adapter references: the one place where names, versions, aliases, stacks and weights are parsed.

Grammar (see docs/REFERENCES.md)::

    REF    := KIND ":" NAME [ "@" SELECTOR ]
    KIND   := "user" | "domain" | "merged"
    NAME   := [a-z0-9][a-z0-9._-]{0,63}
    SELECTOR := "v" DIGITS            (a version number, v3 == v0003)
              | ALIAS                 ([a-z][a-z0-9_-]{0,31}, e.g. current, candidate)
    STACK  := PART ( "+" PART )*      (at most 8 parts, each adapter once)
    PART   := REF [ "*" WEIGHT ]      (no weight means 1)
    WEIGHT := ( "0" | [1-9][0-9]* ) [ "." [0-9]+ ]
                                      (a plain decimal: 0.5, 2, 1.25; no sign, exponent, ".5" or "2.";
                                       its value in (0, 10])

A weight scales that part's LoRA delta: ``domain:finance*0.5`` applies finance at half its own
scale (effective scale = alpha / r x weight). Everything else is rejected with an error that states
the rule. Names are ASCII only: a unicode look-alike of a letter is not a letter here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from .errors import InvalidName, InvalidReference

KINDS = ("user", "domain", "merged")
NAME_RULE = "[a-z0-9][a-z0-9._-]{0,63}"
ALIAS_RULE = "[a-z][a-z0-9_-]{0,31}, not of the form v<digits>"
CURRENT = "current"
CANDIDATE = "candidate"
# Names kept for features that interpret them (``domain:auto`` asks the router).
RESERVED_NAMES = frozenset({"auto"})

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
_ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}", re.ASCII)
_VERSION_RE = re.compile(r"v([0-9]{1,9})", re.ASCII)
_WEIGHT_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?", re.ASCII)
MAX_STACK = 8
MAX_WEIGHT = 10.0
WEIGHT_RULE = f"a weight is a plain decimal such as 0.5 or 2, greater than 0 and at most {MAX_WEIGHT:g}"


def validate_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InvalidName(f"unknown adapter kind {kind!r}: the kind must be one of {', '.join(KINDS)}")
    return kind


def validate_name(name: str) -> str:
    """Return ``name`` if it matches the naming rule, else raise :class:`InvalidName`."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise InvalidName(
            f"invalid adapter name {name!r}: a name must match {NAME_RULE} "
            "(lowercase ASCII letters and digits, then up to 63 of letters, digits, '.', '_', '-')"
        )
    return name


def validate_alias(alias: str) -> str:
    """Return ``alias`` if it is a legal alias name, else raise :class:`InvalidName`."""
    if not isinstance(alias, str) or _ALIAS_RE.fullmatch(alias) is None or _VERSION_RE.fullmatch(alias):
        raise InvalidName(f"invalid alias {alias!r}: an alias must match {ALIAS_RULE}")
    return alias


def parse_version(text: str | int) -> int:
    """Parse ``v3``, ``v0003`` or ``3`` into the version number 3."""
    if isinstance(text, int) and not isinstance(text, bool):
        number = text
    elif isinstance(text, str) and (m := _VERSION_RE.fullmatch(text) or re.fullmatch(r"([0-9]{1,9})", text)):
        number = int(m.group(1))
    else:
        raise InvalidReference(f"invalid version {text!r}: a version is v<number>, for example v3")
    if number < 1:
        raise InvalidReference(f"invalid version {text!r}: versions start at v1")
    return number


def format_version(number: int) -> str:
    return f"v{number:04d}"


@dataclass(frozen=True)
class AdapterRef:
    """One adapter, optionally pinned to a version number or an alias.

    >>> AdapterRef.parse("user:alice@v2")
    AdapterRef(kind='user', name='alice', version=2, alias=None)
    """

    kind: str
    name: str
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        validate_kind(self.kind)
        validate_name(self.name)
        if self.version is not None and self.alias is not None:
            raise InvalidReference("a reference selects a version or an alias, not both")
        if self.version is not None:
            parse_version(self.version)
        if self.alias is not None:
            validate_alias(self.alias)

    @classmethod
    def parse(cls, text: str) -> "AdapterRef":
        """Parse ``KIND:NAME[@vN|@alias]``; raise :class:`InvalidReference` naming the rule."""
        if not isinstance(text, str):
            raise InvalidReference(f"an adapter reference must be a string, got {type(text).__name__}")
        rule = f"an adapter reference is KIND:NAME[@vN|@alias] with KIND in {{{', '.join(KINDS)}}} and NAME matching {NAME_RULE}"
        if "+" in text:
            raise InvalidReference(f"{text!r} is a stack (A+B); a single adapter is expected here")
        if "*" in text:
            raise InvalidReference(f"{text!r} has a weight (*W), which only a part of a stack takes; "
                                   "a single adapter is expected here")
        kind, sep, rest = text.partition(":")
        if not sep:
            raise InvalidReference(f"invalid reference {text!r}: {rule}")
        name, at, selector = rest.partition("@")
        try:
            validate_kind(kind)
            validate_name(name)
        except InvalidName as exc:
            raise InvalidReference(f"invalid reference {text!r}: {exc}") from None
        if not at:
            return cls(kind, name)
        if _VERSION_RE.fullmatch(selector):
            return cls(kind, name, version=parse_version(selector))
        try:
            return cls(kind, name, alias=validate_alias(selector))
        except InvalidName as exc:
            raise InvalidReference(f"invalid reference {text!r}: after '@' comes v<number> or an alias; {exc}") from None

    @property
    def id(self) -> str:
        """The adapter without its selector: ``user:alice``."""
        return f"{self.kind}:{self.name}"

    @property
    def selector(self) -> str:
        """The version selector as text; ``current`` when none was given."""
        if self.version is not None:
            return format_version(self.version)
        return self.alias or CURRENT

    def unpinned(self) -> "AdapterRef":
        return AdapterRef(self.kind, self.name)

    def at(self, version: int) -> "AdapterRef":
        return AdapterRef(self.kind, self.name, version=version)

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.id}@v{self.version}"
        if self.alias is not None:
            return f"{self.id}@{self.alias}"
        return self.id


def parse_ref(text: str | AdapterRef) -> AdapterRef:
    """Parse one adapter reference (an :class:`AdapterRef` passes through)."""
    return text if isinstance(text, AdapterRef) else AdapterRef.parse(text)


def validate_weight(weight: float, text: str | None = None) -> float:
    """Return ``weight`` as a float if it is a finite number in (0, MAX_WEIGHT], else raise.

    ``text`` is how the weight was written, for the message.
    """
    shown = repr(text) if text is not None else repr(weight)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise InvalidReference(f"invalid weight {shown}: {WEIGHT_RULE}")
    value = float(weight)
    if value == 0:
        raise InvalidReference(f"invalid weight {shown}: {WEIGHT_RULE} (to leave an adapter out, leave it out of the stack)")
    if not math.isfinite(value) or not 0 < value <= MAX_WEIGHT:
        raise InvalidReference(f"invalid weight {shown}: {WEIGHT_RULE}")
    return value


def parse_weight(text: str) -> float:
    """Parse the text after ``*`` in a stack part: ``0.5`` -> 0.5; refuse anything but a plain decimal."""
    if _WEIGHT_RE.fullmatch(text) is None:
        hint = " (a weight comes last: KIND:NAME@vN*W)" if "@" in text else ""
        raise InvalidReference(f"invalid weight {text!r}: {WEIGHT_RULE}{hint}")
    return validate_weight(float(text), text)


def format_weight(weight: float) -> str:
    """The shortest plain decimal that parses back to exactly ``weight``: 0.5, 2, 0.000000002."""
    text = format(Decimal(repr(float(weight))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass(frozen=True)
class StackPart:
    """One part of a stack: an adapter and the weight its LoRA delta is scaled by (1: as trained).

    >>> StackPart.parse("domain:finance*0.5")
    StackPart(ref=AdapterRef(kind='domain', name='finance', version=None, alias=None), weight=0.5)
    >>> str(StackPart.parse("domain:finance*1.0"))       # a weight of 1 is no weight
    'domain:finance'
    """

    ref: AdapterRef
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.ref, AdapterRef):
            raise InvalidReference(f"a stack part holds an AdapterRef, got {type(self.ref).__name__}")
        object.__setattr__(self, "weight", validate_weight(self.weight))

    @classmethod
    def parse(cls, text: str) -> StackPart:
        """Parse ``REF[*WEIGHT]``."""
        if not isinstance(text, str):
            raise InvalidReference(f"a stack part must be a string, got {type(text).__name__}")
        ref_text, star, weight_text = text.partition("*")
        if not star:
            return cls(AdapterRef.parse(text))
        if "*" in weight_text:
            raise InvalidReference(f"invalid stack part {text!r}: one '*' per part, followed by its weight")
        if not weight_text:
            raise InvalidReference(f"invalid stack part {text!r}: '*' must be followed by a weight; {WEIGHT_RULE}")
        return cls(AdapterRef.parse(ref_text), parse_weight(weight_text))

    def __str__(self) -> str:
        return str(self.ref) if self.weight == 1.0 else f"{self.ref}*{format_weight(self.weight)}"


def parse_stack(text: str) -> tuple[StackPart, ...]:
    """Parse ``A+B*0.5+...`` into parts; a single reference is a stack of one part of weight 1.

    >>> [str(p) for p in parse_stack("user:alice+domain:finance*0.5")]
    ['user:alice', 'domain:finance*0.5']
    """
    if not isinstance(text, str) or not text:
        raise InvalidReference(
            "an adapter stack is one or more references joined by '+', each optionally weighted, "
            "e.g. user:alice+domain:finance*0.5"
        )
    pieces = text.split("+")
    if len(pieces) > MAX_STACK:
        raise InvalidReference(f"a stack holds at most {MAX_STACK} adapters, got {len(pieces)}")
    parts = tuple(StackPart.parse(p) for p in pieces)
    ids = [p.ref.id for p in parts]
    if len(set(ids)) != len(ids):
        raise InvalidReference(f"stack {text!r} names the same adapter twice")
    return parts


def format_stack(parts: Sequence[StackPart]) -> str:
    """The stack text of ``parts`` (what :func:`parse_stack` reads back)."""
    return "+".join(str(p) for p in parts)
