"""Per-request sampling settings, and choosing each row's next token in a mixed batch.

Rows of one batch belong to different requests, so every row carries its own settings and, when it
samples, its own ``torch.Generator``: the same seed gives the same tokens whatever else is batched
with it (given the same logits).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..errors import InvalidConfig, refuse_unknown_keys

if TYPE_CHECKING:  # torch is imported where tokens are chosen: the CLI builds its options from SamplingParams
    import torch

    from .constrain import ResponseFormat

MAX_NEW_TOKENS = 4096
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries; OpenAI's own limit


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates.

    >>> SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, stop=("\\n\\n",), seed=1)  # doctest: +ELLIPSIS
    SamplingParams(max_new_tokens=64, ...)

    ``temperature=0`` is greedy decoding (``top_p`` and ``seed`` then have no effect). A row ends at
    the model's end-of-sequence token, at the first stop string (the text before it is returned), or
    after ``max_new_tokens`` (further capped by the base's context length).

    ``logprobs=K`` records, for every generated token, its log-probability and the ``K`` most likely
    alternatives (0..20; None records nothing). They are the model's log-softmax of the raw logits,
    before temperature, top-p, ``logit_bias`` or a grammar shaped the choice (what OpenAI reports).
    ``logit_bias`` adds a bias in [-100, 100] to given token ids' logits before choosing
    (``((token_id, bias), ...)`` or a mapping). ``response_format`` constrains the output to JSON
    (``persona.serving.constrain``).
    """

    # metadata: help and validated range, from which the CLI builds its options (persona.cli._common)
    max_new_tokens: int = field(default=128, metadata={
        "help": "Most tokens to generate (further capped by the base's context length).",
        "range": {"min": 1, "max": MAX_NEW_TOKENS}})
    temperature: float = field(default=0.0, metadata={
        "help": "Sampling temperature; 0 is greedy (OpenAI's range, as the server's).", "range": {"min": 0, "max": 2}})
    top_p: float = field(default=1.0, metadata={
        "help": "Nucleus sampling: the smallest set of likeliest tokens whose probability reaches top_p.",
        "range": {"min": 0, "max": 1, "min_open": True}})
    stop: tuple[str, ...] = field(default=(), metadata={
        "help": "Stop string (repeatable); the text before it is returned."})
    seed: int | None = field(default=None, metadata={
        "help": "Sampling seed (same seed, same text), in [0, 2**63)."})
    logprobs: int | None = field(default=None, metadata={
        "help": "Alternatives recorded per generated token, with its log-probability (None: none recorded).",
        "range": {"min": 0, "max": MAX_TOP_LOGPROBS}})
    logit_bias: tuple[tuple[int, float], ...] = field(default=(), metadata={
        "help": "(token_id, bias) pairs, bias in [-100, 100], added to those tokens' logits before choosing."})
    response_format: ResponseFormat | None = field(default=None, metadata={
        "help": "Constrain the output to JSON (persona.serving.constrain)."})

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
            raise InvalidConfig(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}, got {n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 2.0:
            raise InvalidConfig(f"temperature must be a number in [0, 2] (0 is greedy), got {t!r}")
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
        k = self.logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS):
            raise InvalidConfig(
                f"logprobs must be None or an integer in 0..{MAX_TOP_LOGPROBS} (alternatives per token), got {k!r}"
            )
        if self.response_format is not None and not isinstance(self.response_format, _response_format_class()):
            raise InvalidConfig(
                f"response_format must be a ResponseFormat or None, got {type(self.response_format).__name__}"
            )
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))

    @property
    def shapes_logits(self) -> bool:
        """Whether this row's logits are changed before choosing (bias or grammar): other rows skip that work."""
        return bool(self.logit_bias) or self.response_format is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamplingParams":
        """Build from a mapping, refusing unknown keys."""
        refuse_unknown_keys(cls, data, "sampling setting")
        return cls(**data)


def _response_format_class() -> type:
    from .constrain import ResponseFormat  # imports torch: only a request with a response_format gets here

    return ResponseFormat


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise InvalidConfig(f"logit_bias must map token ids to biases, got {type(value).__name__}")
    pairs: dict[int, float] = {}
    for item in items:
        token, bias = item if isinstance(item, (list, tuple)) and len(item) == 2 else (None, None)
        if isinstance(token, str) and token.isascii() and token.isdigit():  # JSON object keys are strings
            token = int(token)
        if (
            isinstance(token, bool) or not isinstance(token, int) or token < 0
            or isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100
        ):
            raise InvalidConfig(
                f"logit_bias maps token ids (non-negative integers) to numbers in [-100, 100], got {item!r}"
            )
        pairs[token] = float(bias)
    if len(pairs) > MAX_LOGIT_BIAS:
        raise InvalidConfig(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(pairs)}")
    return tuple(sorted(pairs.items()))


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token at a step: its text, raw bytes and log-probability."""

    token: str
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token with its log-probability and the most likely alternatives at that step."""

    token_id: int
    token: str
    bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], top: Sequence[int], token_bytes: Callable[[int], bytes]
) -> list[TokenLogprob]:
    """Entries for the chosen ``tokens`` of some rows, from those rows' raw ``logits`` (``[rows, vocab]``).

    Row j gets its token's log-probability (log-softmax of the logits) and its ``top[j]`` most likely
    alternatives. One batched pass for all rows. ``token_bytes(id) -> bytes`` spells a token; its
    text is those bytes as UTF-8 (a token that ends inside a character shows U+FFFD, the bytes stay
    exact).
    """
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(list(tokens), device=logprobs.device).view(-1, 1)).view(-1).tolist()
    k = max(top, default=0)
    best_values, best_ids = logprobs.topk(k, dim=-1) if k else (None, None)
    best_values = best_values.tolist() if k else None
    best_ids = best_ids.tolist() if k else None

    def spell(i: int) -> tuple[str, bytes]:
        raw = token_bytes(i)
        return raw.decode("utf-8", errors="replace"), raw

    entries = []
    for j, (token, logprob) in enumerate(zip(tokens, chosen, strict=True)):
        alternatives = ()
        if top[j]:
            pairs = zip(best_ids[j][: top[j]], best_values[j][: top[j]], strict=True)
            alternatives = tuple(TopLogprob(*spell(i), v) for i, v in pairs)
        entries.append(TokenLogprob(int(token), *spell(int(token)), logprob, alternatives))
    return entries


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The row's own random stream (None for greedy rows); an unseeded row gets a fresh random seed."""
    import torch

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
    import torch

    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return order[pick[0]]
    return torch.multinomial(probs, 1, generator=generator)[0]
