"""Supersession: when new interactions revise what older ones said, the older ones stop counting.

Issue 11: a user who moved told the assistant the new city; the update learned it, but the gate
measured "forgetting" on replay rows that still said the old city, refused the update, and the old
city stayed ``current``. Learning a revision looks exactly like forgetting unless the revised rows
are taken out first. This module finds them.

An older row (a replay row) is **superseded** by a newer row (this update's data) when:

1. **explicitly**: the newer row carries ``"supersedes": "TEXT"`` and the older row's text (user
   and assistant turns) contains TEXT, case and spacing ignored; or
2. **detected**: both are question/answer rows (chat or prompt/completion), their answers differ,
   and their questions ask the same thing. "Ask the same thing" is a score:
   ``0.5 * embedding cosine + 0.5 * lexical overlap >= threshold`` (default
   :data:`SUPERSEDE_THRESHOLD`), where the embedding is the frozen base's prompt embedding (the
   router's: :mod:`persona.embed`) centred on a fixed set of unrelated background prompts, and the
   lexical overlap is the Jaccard index of the questions' content words (lowercased, stop words
   out, light stemming). A **subject veto** stops the commonest false match, a different question
   with the same words ("my cat's name" vs "my dog's name", whose embeddings are 0.98 alike): the
   older row's subject words (content words in both its question and its answer, e.g. "dog")
   must appear somewhere in the newer row. Answers "differ" when the older answer has a content
   word that is neither in the newer answer nor in either question (the value that changed);
3. **same statement**: its answer is, word for word, the answer of a row superseded by 1 or 2
   (the fact was revised, however its question was phrased); answers without a content word
   ("Yes.") do not spread.

Superseded rows are not replayed, are not in the gate's forgetting sample, and leave the replay
buffer when the version is promoted; the version's metrics record how many and which (digest and
a short excerpt of each, with the row that superseded it). The newest statement wins: any memory
that serves a user's facts (replay today, a retrieval memory later) must follow the same rule.

The threshold was chosen on ``benchmarks/revision.py``'s question pairs (docs/TRAINING.md).

>>> detector = SupersessionDetector(base.model, base.tokenizer)          # doctest: +SKIP
>>> result = detector.detect(replay.items, new_interactions)             # doctest: +SKIP
>>> result.count, result.kept                                            # doctest: +SKIP
(2, (...))
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..interactions import Interaction

if TYPE_CHECKING:  # torch loads only when detecting: `persona show` reads metrics without it
    import torch

__all__ = [
    "SUPERSEDE_THRESHOLD",
    "Superseded",
    "Supersession",
    "SupersessionDetector",
    "content_words",
    "sample_replay",
]

SUPERSEDE_THRESHOLD = 0.45
"""Score from which two questions count as the same (benchmarks/revision.py: no false match among
different questions of its 8 slots, cat/dog and sister/brother included, at this value)."""

MAX_LISTED = 20  # superseded rows listed in a version's metrics (the count is always exact)
_EXCERPT = 60

# Content-free words of English questions and answers: they say how something is asked, not what.
_STOP = frozenset("""
a an the i me my mine myself you your yours yourself we our us he him his she her it its they them their
is am are was were be been being do does did done doing have has had having what whats which who whom whose
where when why how that this these those there here of in on at to for from by with about as into over
under again now then so and or but not no yes can could would should will shall may might must also just
tell remember know please call called name named s t don doesn didn isn aren m re ve ll d like best most
top days currently still anymore remind give write say again some any one line
""".split())
_WORD = re.compile(r"[a-z0-9]+")

# Unrelated prompts whose mean embedding is subtracted before comparing: raw embeddings of a small
# base share a large common direction (any two questions are ~0.8 alike), which says nothing.
_BACKGROUND = (
    "What time is it?", "How do I bake bread?", "Explain photosynthesis.", "What is the capital of France?",
    "Write a poem about the sea.", "How far is the moon?", "Translate hello into Spanish.", "What is 12 times 7?",
    "Summarize this article.", "Who wrote Hamlet?", "How do vaccines work?", "Give me a recipe for soup.",
    "What's the weather like today?", "How do I fix a flat tire?", "Recommend a good book.", "Why is the sky blue?",
)


def _stem(word: str) -> str:
    for suffix in ("ing", "es", "s"):
        if len(word) > 4 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> frozenset[str]:
    """Lowercased, stemmed words of ``text`` that carry content (stop words out).

    >>> sorted(content_words("What's my cat called?"))
    ['cat']
    """
    return frozenset(_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP)


def _question_answer(item: Interaction) -> tuple[str, str] | None:
    if item.messages is not None:
        question = "\n".join(c for r, c in item.messages if r == "user")
        answer = "\n".join(c for r, c in item.messages if r == "assistant")
        return (question, answer) if question.strip() else None
    if item.prompt is not None:
        return item.prompt, item.completion or ""
    return None


def _full_text(item: Interaction) -> str:
    if item.messages is not None:
        return "\n".join(c for _, c in item.messages)
    if item.prompt is not None:
        return f"{item.prompt}\n{item.completion}"
    return item.text or ""


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def row_digest(item: Interaction) -> str:
    """Short sha256 of a row's canonical JSON: names a replay row in metrics without its text."""
    line = json.dumps(item.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(line.encode("utf-8")).hexdigest()[:16]


def _excerpt(item: Interaction) -> str:
    qa = _question_answer(item)
    text = f"{qa[0]} -> {qa[1]}" if qa else _full_text(item)
    text = " ".join(text.split())
    return text if len(text) <= _EXCERPT else text[: _EXCERPT - 3] + "..."


def answers_differ(old_q: str, old_a: str, new_q: str, new_a: str) -> bool:
    """True when the older answer says something the newer row does not (the changed value)."""
    if _normal(old_a) == _normal(new_a):
        return False
    values = content_words(old_a) - content_words(new_a) - content_words(old_q) - content_words(new_q)
    return bool(values)


def subject_conflict(old_q: str, old_a: str, new_q: str, new_a: str) -> bool:
    """The older row's subject words (in its question and its answer) are all absent from the newer row."""
    subject = content_words(old_q) & content_words(old_a)
    return bool(subject) and not subject & (content_words(new_q) | content_words(new_a))


def lexical_overlap(a: str, b: str) -> float:
    """Jaccard index of the content words (0 when either has none)."""
    wa, wb = content_words(a), content_words(b)
    return len(wa & wb) / len(wa | wb) if wa and wb else 0.0


@dataclass(frozen=True)
class Superseded:
    """One older row taken out: its digest and excerpt, the newer row that superseded it, and how."""

    digest: str
    excerpt: str
    by: str
    how: str  # "explicit", "detected", or "same statement" (states what a detected row stated)
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "excerpt": self.excerpt, "by": self.by, "how": self.how,
                "score": round(self.score, 4)}


@dataclass(frozen=True)
class Supersession:
    """The outcome for one update: the older rows still valid, and those superseded."""

    kept: tuple[Interaction, ...]
    superseded: tuple[Superseded, ...]
    threshold: float

    @property
    def count(self) -> int:
        return len(self.superseded)

    def to_metrics(self) -> dict[str, Any]:
        """What a version's ``meta.json`` records (``metrics.superseded``)."""
        return {"count": self.count, "threshold": self.threshold,
                "rows": [s.to_dict() for s in self.superseded[:MAX_LISTED]]}

    @classmethod
    def none(cls, old: Sequence[Interaction], threshold: float = SUPERSEDE_THRESHOLD) -> "Supersession":
        return cls(tuple(old), (), threshold)


class SupersessionDetector:
    """Finds the older rows that newer interactions supersede, on a frozen base (see the module doc).

    ``model`` runs as the base alone while detecting (no adapter active); the background centre is
    computed once per detector.
    """

    def __init__(self, model: Any, tokenizer: Any, threshold: float = SUPERSEDE_THRESHOLD):
        self.model = model
        self.tokenizer = tokenizer
        self.threshold = float(threshold)
        self._centre: "torch.Tensor | None" = None

    def _embed(self, texts: Sequence[str]) -> "torch.Tensor":
        import torch

        from ..embed import embed_texts

        if self._centre is None:
            self._centre = embed_texts(self.model, self.tokenizer, _BACKGROUND).double().mean(0)
        rows = embed_texts(self.model, self.tokenizer, texts).double() - self._centre
        return torch.nn.functional.normalize(rows, dim=1)

    def scores(self, old_questions: Sequence[str], new_questions: Sequence[str]) -> "torch.Tensor":
        """``[old, new]`` matrix of question scores: 0.5 * centred embedding cosine + 0.5 * lexical overlap."""
        import torch

        if not old_questions or not new_questions:
            return torch.zeros(len(old_questions), len(new_questions), dtype=torch.float64)
        emb = self._embed(list(old_questions) + list(new_questions))
        cos = emb[: len(old_questions)] @ emb[len(old_questions):].T
        lex = torch.tensor([[lexical_overlap(o, n) for n in new_questions] for o in old_questions], dtype=torch.float64)
        return 0.5 * cos + 0.5 * lex

    def detect(self, old: Sequence[Interaction], new: Sequence[Interaction]) -> Supersession:
        """Split ``old`` into the rows still valid and those that a row of ``new`` supersedes."""
        old = list(old)
        found: dict[int, Superseded] = {}
        for n in new:  # explicit markers first: the application knows best
            marker = getattr(n, "supersedes", None)
            if not marker:
                continue
            needle = _normal(marker)
            for k, o in enumerate(old):
                if k not in found and needle in _normal(_full_text(o)):
                    found[k] = Superseded(row_digest(o), _excerpt(o), _excerpt(n), "explicit", 1.0)
        old_qa = [(k, qa) for k, o in enumerate(old) if k not in found and (qa := _question_answer(o))]
        new_qa = [(n, qa) for n in new if (qa := _question_answer(n))]
        if old_qa and new_qa:
            score = self.scores([qa[0] for _, qa in old_qa], [qa[0] for _, qa in new_qa])
            for row, (k, (oq, oa)) in enumerate(old_qa):
                best, by = -1.0, None
                for col, (n, (nq, na)) in enumerate(new_qa):
                    s = float(score[row, col])
                    if s >= self.threshold and s > best and answers_differ(oq, oa, nq, na) \
                            and not subject_conflict(oq, oa, nq, na):
                        best, by = s, n
                if by is not None:
                    found[k] = Superseded(row_digest(old[k]), _excerpt(old[k]), _excerpt(by), "detected", best)
            self._same_statement(old, old_qa, found)
        kept = tuple(o for k, o in enumerate(old) if k not in found)
        return Supersession(kept, tuple(found[k] for k in sorted(found)), self.threshold)


    @staticmethod
    def _same_statement(old: list[Interaction], old_qa: list, found: dict[int, Superseded]) -> None:
        """An older row that states, word for word, what a superseded row stated is superseded too.

        The statement is the fact, not the question: when "You work as a nurse." is revised, every
        row answering "You work as a nurse." is stale, however its question was phrased ("What's my
        profession?" shares no word with "What is my occupation?"). Only answers that carry a value
        (a content word) spread; "Yes." does not.
        """
        stale = {_normal(qa[1]): found[k] for k, qa in old_qa if k in found and content_words(qa[1])}
        for k, (_, answer) in old_qa:
            source = stale.get(_normal(answer))
            if k not in found and source is not None:
                found[k] = Superseded(row_digest(old[k]), _excerpt(old[k]), source.by, "same statement", source.score)


def sample_replay(rng: random.Random, examples: Sequence[Any], k: int, recency: float = 1.0) -> list[Any]:
    """``k`` replay rows without replacement; with ``recency`` > 1 newer rows are likelier.

    ``examples`` run oldest to newest (the replay buffer keeps that order). A row's weight grows
    geometrically with its position, the newest weighing ``recency`` times the oldest
    (Efraimidis-Spirakis keys). ``recency == 1`` is exactly ``rng.sample`` (uniform).
    """
    k = min(k, len(examples))
    if recency == 1.0 or len(examples) < 2:
        return rng.sample(list(examples), k)
    n = len(examples)
    keys = []
    for i in range(n):
        weight = recency ** (i / (n - 1))
        keys.append((rng.random() ** (1.0 / weight), i))
    keys.sort(reverse=True)
    return [examples[i] for _, i in keys[:k]]


def metrics_summary(metrics: Mapping[str, Any]) -> str | None:
    """One line for ``persona show``: how many replay rows this version superseded, and the first few."""
    sup = metrics.get("superseded")
    if not isinstance(sup, Mapping) or not sup.get("count"):
        return None
    rows = sup.get("rows") or []
    shown = "; ".join(f"{r.get('excerpt')!s} [{r.get('how')}]" for r in rows[:3])
    more = f"; +{sup['count'] - 3} more" if sup["count"] > 3 else ""
    return f"superseded {sup['count']} replay row(s): {shown}{more}"
