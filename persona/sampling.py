"""Per-request sampling settings, and choosing each row's next token in a mixed batch.

Rows of one batch belong to different requests, so every row carries its own settings and, when it
samples, its own ``torch.Generator``: the same seed gives the same tokens whatever else is batched
with it (given the same logits).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch

from .errors import InvalidConfig

MAX_NEW_TOKENS = 4096
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates.

    >>> SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, stop=("\\n\\n",), seed=1)  # doctest: +ELLIPSIS
    SamplingParams(max_new_tokens=64, ...)

    ``temperature=0`` is greedy decoding (``top_p`` and ``seed`` then have no effect). A row ends at
    the model's end-of-sequence token, at the first stop string (the text before it is returned), or
    after ``max_new_tokens`` (further capped by the base's context length).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
            raise InvalidConfig(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}, got {n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 100.0:
            raise InvalidConfig(f"temperature must be a number in [0, 100] (0 is greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise InvalidConfig(f"top_p must be a number in (0, 1], got {p!r}")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (tuple, list)):
            raise InvalidConfig(f"stop must be a sequence of strings, got {type(stop).__name__}")
        stop = tuple(stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidConfig(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_LENGTH:
                raise InvalidConfig(
                    f"a stop string is a non-empty string of at most {MAX_STOP_LENGTH} characters, got {s!r}"
                )
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise InvalidConfig(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamplingParams":
        """Build from a mapping, refusing unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidConfig(f"unknown sampling setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The row's own random stream (None for greedy rows); an unseeded row gets a fresh random seed."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def choose_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Next token of every row: argmax for greedy rows, temperature + top-p sampling for the others.

    ``logits`` is ``[batch, vocab]``; returns a LongTensor ``[batch]``.
    """
    tokens = logits.argmax(dim=-1)
    for i, (p, gen) in enumerate(zip(params, generators, strict=False)):
        if not p.greedy:
            tokens[i] = _sample_row(logits[i].float(), p, gen)
    return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return order[pick[0]]
    return torch.multinomial(probs, 1, generator=generator)[0]
