"""Routing: pick the domain adapters for a prompt, top-k with weights (what ``domain:auto`` asks for).

The router is built from what the store already has and never picks a user or merged adapter:
only ``domain:*`` adapters, each at its ``current`` version, are candidates.

Two scorers:

- ``centroid`` (default): each domain is the mean of the frozen base's embeddings of the prompts it
  was trained on (its replay buffer holds them). A prompt's embedding is the base decoder's last
  hidden state, mean-pooled over the prompt's tokens (the first token is left out: it is the
  attention sink, with a huge norm that says nothing about content). Embeddings are centred on the
  mean of the domain centroids and divided by the per-dimension spread of all the domains'
  prompts, then compared by cosine. One base forward over the prompt (no LM head) is the whole
  cost. A domain with no training interactions cannot be routed to (see :attr:`Router.skipped`).
- ``arrow`` (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of
  LoRAs"): each domain's prototype at each adapted layer is the top right singular vector of its
  ``B @ A``, computed from the weights alone; a prompt scores ``|cos(h, prototype)|`` averaged over
  its tokens and layers, ``h`` being the layer's input. Needs no data, but needs trained weights.

benchmarks/compose.py measures both on the real base; centroid is the default because it was
the more accurate there at the same cost (see docs).

Weights are a softmax of the top-k scores divided by ``temperature`` (default 0.1): the scores are
cosines, so a domain 0.1 closer gets e times the weight of the next, near-ties share, and top-1 is
weight 1 exactly. It equals the softmax over every domain restricted to the top k and renormalized
to sum to 1. ``domain:auto*W`` in a stack multiplies these weights by W (see ``persona.serving.engine``).

Per-domain state is cached in memory keyed by (domain, version) and checked on every call (one
small ``refs.json`` read per domain), so a new version is picked up at once. Centroids are also
persisted, as derived data, under ``ROOT/.cache/router/`` (safetensors, atomically written,
validated against the domain's version, replay digest and the base fingerprint before use).

>>> router = Router.load(Store.open())                                    # doctest: +SKIP
>>> router.route("How long do I boil an egg?", top_k=1)                   # doctest: +SKIP
(RouteChoice(adapter='domain:cooking@v2', weight=1.0, score=0.61),)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import torch

from ..embed import EMBEDDING_ID, embed_texts
from ..errors import AdapterNotFound, InvalidConfig, PersonaError
from .._fs import atomic_write_bytes
from ..lora_runtime import AdapterLinear, AdapterWeights
from ..refs import AdapterRef
from ..store import Store

ROUTE_METHODS = ("centroid", "arrow")
CACHE_DIR = "router"  # under the store's cache folder (Store.cache_dir)
_EPS = 1e-6

Prompt = Union[str, Sequence[Mapping[str, str]], Sequence[Sequence[str]], Any]


@dataclass(frozen=True)
class RouteScore:
    """One domain's score for a prompt (higher is closer); ``adapter`` is pinned (``domain:x@v2``)."""

    adapter: str
    score: float

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef.parse(self.adapter)

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "score": self.score}


@dataclass(frozen=True)
class RouteChoice:
    """A chosen domain adapter (pinned) and its weight in the stack; the weights of a route sum to 1."""

    adapter: str
    weight: float
    score: float

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef.parse(self.adapter)

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "weight": self.weight, "score": self.score}


def select(scores: Sequence[RouteScore], top_k: int = 1, temperature: float = 0.1) -> tuple[RouteChoice, ...]:
    """The ``top_k`` best scores, weighted by a softmax of ``score / temperature`` over them."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidConfig(f"top_k must be a positive integer, got {top_k!r}")
    best = sorted(scores, key=lambda s: (-s.score, s.adapter))[:top_k]
    if not best:
        return ()
    logits = torch.tensor([s.score / temperature for s in best], dtype=torch.float64)
    weights = torch.softmax(logits, dim=0).tolist()
    return tuple(RouteChoice(s.adapter, w, s.score) for s, w in zip(best, weights))


def prompt_text(prompt: Prompt) -> str:
    """The text routing looks at: the user turns of a chat (joined), a prompt, or a plain string."""
    if isinstance(prompt, str):
        text = prompt
    elif getattr(prompt, "messages", None) is not None:  # an Interaction
        text = "\n".join(c for r, c in prompt.messages if r == "user")
    elif getattr(prompt, "prompt", None) is not None:
        text = prompt.prompt
    elif getattr(prompt, "text", None) is not None:
        text = prompt.text
    elif isinstance(prompt, Sequence):
        parts = []
        for message in prompt:
            role, content = (message.get("role"), message.get("content")) if isinstance(message, Mapping) else tuple(message)
            if role == "user":
                if not isinstance(content, str):
                    raise InvalidConfig("routing reads text messages only: a message's content must be a string")
                parts.append(content)
        text = "\n".join(parts)
    else:
        raise InvalidConfig(f"cannot route a {type(prompt).__name__}: give a string or chat messages")
    if not text.strip():
        raise InvalidConfig("nothing to route: the prompt has no user text")
    return text


class Router:
    """Scores a prompt against every ``domain:*`` adapter of a store, on a frozen base.

    ``model`` and ``tokenizer`` are the store's base (an engine passes its own; run-time LoRA
    wrappers are fine as long as no adapter is active during :meth:`route`).

    >>> router = Router(store, base.model, base.tokenizer)                   # doctest: +SKIP
    >>> [c.adapter for c in router.route(messages, top_k=2)]                 # doctest: +SKIP
    ['domain:finance@v3', 'domain:medicine@v1']
    """

    def __init__(self, store: Store, model: Any, tokenizer: Any, *, method: str = "centroid",
                 temperature: float = 0.1, max_tokens: int = 256, persist: bool = True):
        if method not in ROUTE_METHODS:
            raise InvalidConfig(f"unknown routing method {method!r}; choose one of {', '.join(ROUTE_METHODS)}")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise InvalidConfig(f"temperature must be > 0, got {temperature!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise InvalidConfig(f"max_tokens must be an integer >= 2, got {max_tokens!r}")
        self.store = store
        self.model = model
        self.tokenizer = tokenizer
        self.method = method
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.persist = persist
        self._lock = threading.Lock()
        self._hooks_lock = threading.Lock()
        self._state: dict[str, tuple[int, Any]] = {}  # domain -> (version, centroid stats or prototypes)
        self._skipped: dict[str, str] = {}
        self._skip_version: dict[str, int] = {}  # the version a skipped domain was skipped at

    @classmethod
    def load(cls, store: Store, *, device: Any = "auto", dtype: Any = "auto", **options: Any) -> "Router":
        """A router over ``store`` with its base loaded (frozen) for the purpose, placed by ``device``/``dtype``
        as :func:`persona.base.resolve_device` reads them (``auto``: a GPU in bfloat16 where there is one)."""
        from ..base import check_base, load_base

        base = load_base(store.config.base_id, device=device, dtype=dtype)
        check_base(base.info, base_id=store.config.base_id, fingerprint=store.config.base_fingerprint,
                   store_root=store.root)
        return cls(store, base.model, base.tokenizer, **options)

    # ------------------------------------------------------------------ public
    @property
    def skipped(self) -> dict[str, str]:
        """Domains that cannot be routed to, with the reason (as of the last refresh)."""
        return dict(self._skipped)

    def refresh(self) -> None:
        """Bring the per-domain state up to date with the store (new, changed, deleted domains)."""
        current = self._domains()
        with self._lock:
            state = {d: s for d, s in self._state.items() if d in current and s[0] == current[d]}
            skipped = {d: r for d, r in self._skipped.items() if d in current and self._skip_version.get(d) == current[d]}
            for domain, version in sorted(current.items()):
                if domain in state or domain in skipped:
                    continue
                try:
                    state[domain] = (version, self._build(domain, version))
                except _Unroutable as why:
                    skipped[domain] = str(why)
                    self._skip_version[domain] = version
            self._state, self._skipped = state, skipped
        if self.persist and self.method == "centroid":
            self._prune_cache(set(current))

    def scores(self, prompt: Prompt) -> tuple[RouteScore, ...]:
        """Every routable domain's score for ``prompt``, best first."""
        text = prompt_text(prompt)
        self.refresh()
        state = dict(self._state)
        if not state:
            why = "; ".join(f"{d}: {r}" for d, r in sorted(self._skipped.items())) or "the store has no domain adapters"
            raise AdapterNotFound(f"no domain adapter to route to ({why}). Create and train one: "
                                  "`persona create domain:NAME` then `persona update domain:NAME --data FILE`")
        self._require_base_alone()
        domains = sorted(state)
        if self.method == "centroid":
            values = self._centroid_scores(text, [state[d][1] for d in domains])
        else:
            with self._hooks_lock:  # the hooks would see every forward on this model, another thread's too
                values = self._arrow_scores(text, [state[d][1] for d in domains])
        out = [RouteScore(f"domain:{d}@v{state[d][0]}", float(v)) for d, v in zip(domains, values)]
        return tuple(sorted(out, key=lambda s: (-s.score, s.adapter)))

    def route(self, prompt: Prompt, top_k: int = 1, *, exclude: Iterable[str] = ()) -> tuple[RouteChoice, ...]:
        """The ``top_k`` domain adapters for ``prompt`` (pinned refs), best first, weights summing to 1.

        ``exclude`` names domains (``domain:finance``) not to pick, e.g. those a stack already
        holds. Fewer than ``top_k`` come back when fewer domains are routable; none when every
        routable domain is excluded.
        """
        skip = set(exclude)
        return select([s for s in self.scores(prompt) if s.ref.id not in skip], top_k, self.temperature)

    # ------------------------------------------------------------------ store side

    def _domains(self) -> dict[str, int]:
        """``{name: current version}`` of every domain adapter."""
        return self.store.domains()

    def _build(self, domain: str, version: int) -> Any:
        if self.method == "centroid":
            return self._centroid(domain, version)
        return self._prototypes(domain, version)

    # ------------------------------------------------------------------ centroid
    def _cache_path(self, domain: str) -> Path:
        return self.store.cache_dir(CACHE_DIR) / "centroid" / f"{domain}.safetensors"

    def _centroid(self, domain: str, version: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load as load_safetensors, save

        ref = AdapterRef("domain", domain)
        key = {
            "adapter": f"domain:{domain}",
            "version": str(version),
            "replay_sha256": self.store.replay_digest(ref),
            "base_fingerprint": self.store.config.base_fingerprint,
            "embedding": EMBEDDING_ID,
            "max_tokens": str(self.max_tokens),
        }
        path = self._cache_path(domain)
        if self.persist and path.is_file():
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    if (f.metadata() or {}) == key:
                        return load_safetensors(path.read_bytes())
            except Exception:  # a damaged cache file is recomputed, never trusted
                pass
        texts = []
        for item in self.store.replay(ref).items:
            try:
                texts.append(prompt_text(item))
            except InvalidConfig:
                continue
        if not texts:
            raise _Unroutable("no training prompts in its replay buffer (train it with `persona update`)")
        embeddings = self._embed(texts).double()
        stats = {"count": torch.tensor([float(len(texts))], dtype=torch.float64),
                 "sum": embeddings.sum(0), "sumsq": (embeddings ** 2).sum(0)}
        if self.persist:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, save(stats, metadata=key))
        return stats

    def _prune_cache(self, domains: set[str]) -> None:
        folder = self.store.cache_dir(CACHE_DIR) / "centroid"
        if not folder.is_dir():
            return
        for path in folder.glob("*.safetensors"):
            if path.stem not in domains:
                path.unlink(missing_ok=True)

    def _centroid_scores(self, text: str, stats: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
        means = torch.stack([s["sum"] / s["count"] for s in stats])
        count = sum(float(s["count"]) for s in stats)
        total = torch.stack([s["sum"] for s in stats]).sum(0)
        total_sq = torch.stack([s["sumsq"] for s in stats]).sum(0)
        spread = (total_sq / count - (total / count) ** 2).clamp_min(0).sqrt() + _EPS
        # Centre on the mean of the domains (not of all prompts: a big domain must not pull the
        # centre toward itself); with one domain there is nothing to centre against.
        centre = means.mean(0) if len(stats) > 1 else torch.zeros_like(means[0])
        prompt = self._embed([text])[0].double()
        protos = torch.nn.functional.normalize((means - centre) / spread, dim=1)
        query = torch.nn.functional.normalize((prompt - centre) / spread, dim=0)
        return (protos @ query).tolist()

    def _embed(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Mean-pooled last hidden state of the base decoder, first token left out, one row a text."""
        return embed_texts(self.model, self.tokenizer, texts, max_tokens=self.max_tokens, batch_size=batch_size)

    # ------------------------------------------------------------------ arrow
    def _prototypes(self, domain: str, version: int) -> dict[str, torch.Tensor]:
        loaded = self.store.load(AdapterRef("domain", domain, version=version))
        weights = AdapterWeights.from_peft(loaded.tensors, loaded.config)
        protos = {}
        for module, (a, b) in weights.factors.items():
            vector = top_right_singular_vector(a.double(), b.double())
            if vector is not None:
                protos[module] = vector.float()
        if not protos:
            raise _Unroutable("its weights are still the identity (B = 0): train it before routing to it")
        return protos

    @torch.inference_mode()
    def _arrow_scores(self, text: str, prototypes: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
        modules = sorted(set().union(*(p.keys() for p in prototypes)))
        sums = torch.zeros(len(prototypes), dtype=torch.float64)
        counts = torch.zeros(len(prototypes), dtype=torch.float64)
        handles = []

        def hook_for(module: str):
            which = [i for i, p in enumerate(prototypes) if module in p]
            stack = torch.stack([prototypes[i][module] for i in which])

            def hook(_mod, args):
                x = args[0][0]
                x = x[1:] if x.shape[0] > 1 else x  # the attention sink again
                cos = (torch.nn.functional.normalize(x.float(), dim=-1) @ stack.to(x.device).T).abs().mean(0)
                for j, i in enumerate(which):
                    sums[i] += float(cos[j])
                    counts[i] += 1

            return hook

        try:
            for module in modules:
                handles.append(self.model.get_submodule(module).register_forward_pre_hook(hook_for(module)))
            ids = self.tokenizer(text, add_special_tokens=False).input_ids[-self.max_tokens:]
            device = next(self.model.parameters()).device
            decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model
            decoder(input_ids=torch.tensor([ids], device=device))
        finally:
            for handle in handles:
                handle.remove()
        return (sums / counts.clamp_min(1)).tolist()

    # ------------------------------------------------------------------ guards
    def _require_base_alone(self) -> None:
        for module in self.model.modules():
            if isinstance(module, AdapterLinear) and (module.active or getattr(module, "routes", ())):
                raise PersonaError("route() scores on the base alone, but adapters are active on this model; "
                                   "route before activating the chosen adapters")


class _Unroutable(Exception):
    """A domain the router cannot use yet (no training prompts, or untrained weights)."""


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """The unit top right singular vector of ``B @ A`` (sign arbitrary), without forming ``B @ A``.

    ``A^T = Q R`` makes ``B A = (B R^T) Q^T``; the SVD of the small ``B R^T`` gives ``V`` and the
    answer is ``Q V[:, 0]``. None when ``B @ A`` is zero.
    """
    q, r = torch.linalg.qr(a.T)  # q [in, r], r [r, r]
    small = b @ r.T  # [out, r]
    _, s, vh = torch.linalg.svd(small, full_matrices=False)
    if not len(s) or float(s[0]) <= _EPS * max(1.0, float(small.abs().max())):
        return None
    return q @ vh[0]


__all__ = ["ROUTE_METHODS", "RouteChoice", "RouteScore", "Router", "prompt_text", "select", "top_right_singular_vector"]
