"""The serving engine: one frozen base, many LoRA adapters, mixed batches.

>>> engine = Engine(Store.open())                                            # doctest: +SKIP
>>> engine.generate([
...     GenerationRequest("user:alice", prompt="Hello"),
...     GenerationRequest("user:bob+domain:finance", messages=({"role": "user", "content": "Hi"},)),
...     GenerationRequest(engine.base_name, prompt="Hello", params=SamplingParams(temperature=0.7, seed=1)),
... ])                                                                       # doctest: +SKIP

- Every row of a batch names its own model: an adapter reference, a stack ``A+B``, a weighted stack
  ``A+B*0.5`` (B's LoRA delta scaled by 0.5), or the base's name (no adapter). Each row computes
  what that adapter (or stack) alone would.
- ``domain:auto`` in a stack is replaced, at admission, by the router's ``route_top_k`` best domain
  adapters for the request's prompt, weighted by the router (weights summing to 1, times the auto
  part's own weight); ``GenerationResult.resolved`` shows the stack that ran.
- A layered adapter (``create --over``) is served as it was trained: ``user:carol`` runs as
  ``user:carol@v1+domain:finance@v1``, its layer pinned at the version recorded in its meta; the
  two are one unit (a part's weight scales both), and a stack naming the layer's adapter chooses it.
- A request's references are pinned to versions when it is admitted (``Store.resolve``); the pinned
  version is what runs, and what is cached (keys are ``kind:name@vN``), so a moved ``current`` is
  picked up by the next request and an old version is never served under the new name. An unknown
  adapter, version or malformed reference raises the store's error: there is no fallback to the base.
- Adapters are loaded on first use into slot tensors (``persona.slots``) and applied per row by a
  batched gather (``persona.layers.SlotRoute``); stacks loop over their depth, and a part's weight
  scales that row's update at that depth (one slot serves an adapter at any weight).
- Generation runs its own decode loop over a KV cache, with left padding, per-row sampling
  (``persona.sampling``), incremental detokenization and stop strings (``persona.detokenize``).
  Finished rows leave the batch. A row may also record logprobs, bias its logits (``logit_bias``)
  or follow a JSON grammar (``response_format``, ``persona.constrain``); rows that ask for none of
  these are not touched.
- ``generate`` runs in the caller's thread; ``submit``/``stream`` go through one worker thread
  that gathers concurrent requests into mixed batches (``persona.batching``).

Thread safety: every public method may be called from any thread; model execution is serialized by
one lock. The engine owns its base model while it lives: do not run a ``Trainer`` on the same
``BaseModel`` object at the same time.
"""

from __future__ import annotations

import inspect
import threading
from concurrent.futures import CancelledError as _CancelledError
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch

from ..base import BaseModel, load_base
from .scheduler import BatchWorker, EngineClosed, Handle
from .constrain import RowGrammar, Vocabulary
from .detokenize import TextStream
from ..errors import BaseMismatch, InvalidConfig, InvalidPrompt, InvalidReference, NoDomainToRoute
from ..lora_runtime import LoraRuntime
from ..refs import MAX_STACK, RESERVED_NAMES, AdapterRef, StackPart, format_stack, parse_stack
from .sampling import SamplingParams, TokenLogprob, choose_tokens, make_generator, token_logprobs
from .slots import AdapterCache, SlotBank, distinct_keys, group_rows

__all__ = [
    "Engine",
    "EngineClosed",
    "EngineStats",
    "GenerationRequest",
    "GenerationResult",
    "Handle",
    "SamplingParams",
]

ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: OpenAI's newer name for system
LAYER_CACHE = 1 << 16  # pinned versions whose layer (or lack of one) admission remembers
PREGATHER_BYTES = 512 << 20  # transient memory a decode batch may use for its rows' gathered factors
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationRequest:
    """One request: which model, a prompt or chat messages, and how to sample.

    ``model`` is an adapter reference (``user:alice``, ``user:alice@v2``), a stack
    (``user:alice+domain:finance``), optionally weighted per part (``user:alice+domain:finance*0.5``)
    and with ``domain:auto`` for the router's choice, or ``Engine.base_name``. Exactly one of ``prompt`` (raw text,
    tokenized as is) and ``messages`` (OpenAI-style ``{"role", "content"}`` dicts, rendered with the
    base tokenizer's chat template and a generation prompt) is given. A message may carry a ``name``
    (passed to the template, which may ignore it); the ``developer`` role is rendered as ``system``.
    """

    model: str
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise InvalidReference(f"model must be an adapter reference or the base's name, got {self.model!r}")
        if (self.prompt is None) == (self.messages is None):
            raise InvalidConfig("a request has exactly one of prompt and messages")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InvalidConfig(f"prompt must be a string, got {type(self.prompt).__name__}")
        if self.messages is not None:
            if isinstance(self.messages, (str, bytes)) or not isinstance(self.messages, Sequence) or not self.messages:
                raise InvalidConfig("messages must be a non-empty sequence of {'role': ..., 'content': ...} dicts")
            checked = []
            for i, m in enumerate(self.messages):
                if not isinstance(m, Mapping) or not {"role", "content"} <= set(m) <= {"role", "content", "name"}:
                    raise InvalidConfig(f"message {i} must have the keys 'role' and 'content' (and optionally 'name')")
                if m["role"] not in ROLES or not isinstance(m["content"], str):
                    raise InvalidConfig(f"message {i}: role must be one of {', '.join(ROLES)} and content a string")
                message = {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                if "name" in m:
                    if not isinstance(m["name"], str) or not m["name"]:
                        raise InvalidConfig(f"message {i}: name must be a non-empty string")
                    message["name"] = m["name"]
                checked.append(message)
            object.__setattr__(self, "messages", tuple(checked))
        if not isinstance(self.params, SamplingParams):
            raise InvalidConfig(f"params must be SamplingParams, got {type(self.params).__name__}")


@dataclass(frozen=True)
class GenerationResult:
    """What one request produced.

    ``finish_reason`` is ``stop`` (end-of-sequence token or a stop string; the stop string is not in
    ``text``) or ``length`` (``max_new_tokens`` or the context length). ``model`` is the request's
    model as sent. ``resolved`` lists the pinned parts that ran, with their weights
    (``("user:alice@v3", "domain:finance@v1*0.5")``; empty for the base); ``domain:auto`` appears as
    the domains the router chose, a layered adapter as itself followed by its pinned layer. Joined
    with ``+`` it is a model that computes the same row.
    ``logprobs`` (when the request's ``params.logprobs`` is set) has one entry per generated token,
    the end-of-sequence token excepted.
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    model: str
    resolved: tuple[str, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine started, and what is resident now."""

    resident: tuple[str, ...]  # pinned refs in slots, least recently used first
    cpu_cached: tuple[str, ...]  # pinned refs in the CPU tier
    max_resident: int
    loads: int  # adapter versions read from the store (hash-checked)
    cpu_hits: int  # loads served by the CPU tier instead
    resident_hits: int  # uses of an adapter already in a slot
    evictions: int  # slots given to another adapter
    requests: int  # requests finished (generate, submit, stream)
    failed: int  # requests that ended in an error
    cancelled: int  # submitted requests stopped by Handle.cancel() (e.g. their HTTP client went away)
    prompt_tokens: int
    tokens_generated: int
    batches: int  # forward batches run (generate chunks and worker batches)
    largest_batch: int
    slot_bytes: int  # memory of the slot tensors
    cpu_cache_bytes: int  # memory of the CPU tier

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["resident"], d["cpu_cached"] = list(self.resident), list(self.cpu_cached)
        return d


@dataclass
class _Job:
    """An admitted request: pinned parts, prompt tokens, the effective token budget, and its sink."""

    request: GenerationRequest
    parts: tuple[StackPart, ...]
    prompt_ids: list[int]
    max_new_tokens: int
    handle: Handle
    grammar: RowGrammar | None = None  # the row's response_format state, built at admission

    @property
    def refs(self) -> tuple[AdapterRef, ...]:
        return tuple(p.ref for p in self.parts)


class _Row:
    """One live row of a decode loop: its text, its budget, and where its output goes."""

    def __init__(self, job: _Job, engine: "Engine"):
        self.job = job
        self.params = job.request.params
        self.text = TextStream(engine.tokenizer, job.prompt_ids, job.request.params.stop)
        self.generator = make_generator(self.params, engine.device)
        self.eos = engine.eos_token_ids
        self.tokens = 0
        self.done = False
        self._engine = engine
        self.grammar = job.grammar
        self.logprobs: list[TokenLogprob] | None = [] if self.params.logprobs is not None else None
        self._unsent = 0  # logprobs entries not yet handed out with a text delta
        self.shapes_logits = self.params.shapes_logits
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.params.logit_bias:
            ids, values = zip(*self.params.logit_bias, strict=True)
            self.bias = (torch.tensor(ids, device=engine.device), torch.tensor(values, device=engine.device))

    def push(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """Take the chosen token (with its logprobs entry when the row records them)."""
        self.tokens += 1
        if token in self.eos:
            return self._finish("stop")
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if self.grammar is not None:
            self.grammar.advance(token)
        with self._engine._tokenizer_lock:
            delta = self.text.add(token)
        if delta:
            self._emit(delta)
        if self.text.stopped:
            self._finish("stop")
        elif self.grammar is not None and self.grammar.complete:  # the JSON is closed: nothing may follow
            self._finish("stop")
        elif self.tokens >= self.job.max_new_tokens:
            self._finish("length")

    def _emit(self, text: str) -> None:
        if self.logprobs is None:
            return self.job.handle.emit(text)
        self.job.handle.emit(text, tuple(self.logprobs[self._unsent :]))
        self._unsent = len(self.logprobs)

    def _finish(self, reason: FinishReason) -> None:
        with self._engine._tokenizer_lock:
            rest = self.text.finish()
        if rest or (self.logprobs is not None and self._unsent < len(self.logprobs)):
            self._emit(rest)
        self.done = True
        self.job.handle.finish(
            GenerationResult(
                text=self.text.text,
                finish_reason=reason,
                prompt_tokens=len(self.job.prompt_ids),
                completion_tokens=self.tokens,
                model=self.job.request.model,
                resolved=tuple(str(p) for p in self.job.parts),
                logprobs=tuple(self.logprobs) if self.logprobs is not None else None,
            )
        )


class Engine:
    """A multi-LoRA inference engine around one frozen base model.

    ``base`` defaults to the store's base, loaded frozen; ``device`` defaults to where ``base`` is
    (else the CPU). ``max_resident`` bounds the adapters held in slots (least recently used are
    evicted); ``cpu_cache`` bounds the decoded adapters kept in CPU memory; ``max_batch`` bounds the
    rows of one batch; ``batch_wait_s`` is how long the worker waits for more requests to batch.
    ``route_top_k`` is how many domain adapters ``domain:auto`` becomes (1: the router's best, at
    weight 1).
    """

    def __init__(
        self,
        store,
        *,
        base: BaseModel | None = None,
        max_resident: int = 16,
        cpu_cache: int = 64,
        max_batch: int = 8,
        device: str | torch.device | None = None,
        batch_wait_s: float = 0.005,
        route_top_k: int = 1,
    ):
        limits = (
            ("max_resident", max_resident, 1, 4096),
            ("cpu_cache", cpu_cache, 0, 1 << 20),
            ("max_batch", max_batch, 1, 4096),
            ("route_top_k", route_top_k, 1, MAX_STACK),
        )
        for name, value, low, high in limits:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidConfig(f"{name} must be an integer in {low}..{high}, got {value!r}")
        if route_top_k > max_resident:
            raise InvalidConfig(f"route_top_k={route_top_k} cannot exceed max_resident={max_resident}")
        if not isinstance(batch_wait_s, (int, float)) or not 0 <= batch_wait_s <= 10:
            raise InvalidConfig(f"batch_wait_s must be in [0, 10] seconds, got {batch_wait_s!r}")
        self.store = store
        if device is None:  # where the given base already is, else the CPU
            device = next(base.model.parameters()).device if base is not None else "cpu"
        self.device = torch.device(device)
        self.base = base if base is not None else load_base(store.config.base_id, device=str(self.device))
        if self.base.info.fingerprint != store.config.base_fingerprint:
            raise BaseMismatch(
                f"the engine's base {self.base.info.id} ({self.base.info.fingerprint[:19]}) is not the store's base "
                f"{store.config.base_id} ({store.config.base_fingerprint[:19]})"
            )
        self.model = self.base.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = self.base.tokenizer
        self.max_batch = max_batch
        self.route_top_k = route_top_k
        self.runtime = LoraRuntime.attach(self.model)
        dtype = next(self.model.parameters()).dtype
        bank = SlotBank(self.runtime, device=self.device, dtype=dtype)
        self._cache = AdapterCache(store, bank, max_resident=max_resident, cpu_cache=cpu_cache)
        self.context_length = _context_length(self.model.config)
        self.eos_token_ids = _eos_ids(self.model, self.tokenizer)
        self.vocabulary = Vocabulary(self.tokenizer, _vocab_size(self.model, self.tokenizer), self.eos_token_ids)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids, default=0)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._logits_to_keep = "logits_to_keep" in params
        self._lock = threading.RLock()  # the model and the slots
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share across threads
        self._stats_lock = threading.Lock()  # counters and a snapshot of residency: stats() never waits on a batch
        self._counts = dict(requests=0, failed=0, cancelled=0, prompt_tokens=0, tokens_generated=0, batches=0, largest_batch=0)
        self._residency: dict[str, Any] = {}
        self._snapshot_residency()
        self._router = None  # built on the first domain:auto request
        self._layers: dict[str, AdapterRef | None] = {}  # pinned ref -> its layer (immutable, like the slots' keys)
        self._layers_lock = threading.Lock()
        self._worker = BatchWorker(self._run_jobs, max_batch=max_batch, wait_s=batch_wait_s)

    # ------------------------------------------------------------------ names and versions
    @property
    def base_name(self) -> str:
        """The model name that selects no adapter (the base's id, e.g. ``smollm2-135m-instruct``)."""
        return self.base.info.id

    def resolve(self, model: str) -> tuple[StackPart, ...]:
        """Pin ``model`` to versions: ``user:a+domain:b*0.5`` -> ``(user:a@v3, domain:b@v1*0.5)``; the base -> ``()``.

        A layered adapter brings its pinned layer: ``user:carol`` -> ``(user:carol@v1, domain:finance@v1)``.

        Raises ``InvalidReference``, ``AdapterNotFound`` or ``VersionNotFound``; never falls back.
        ``domain:auto`` is refused here: it is chosen per prompt, when a request is admitted.
        """
        parts = self._parse(model)
        for part in parts:
            if _is_auto(part.ref):
                raise InvalidReference(
                    f"{part.ref.id} is chosen per prompt by the router: send it in a request (generate, submit, HTTP), "
                    "or see the choice with `persona route PROMPT`"
                )
        return self._pin(parts)

    def check(self, model: str) -> tuple[StackPart, ...]:
        """Validate ``model`` before any prompt is known: pin every part but ``domain:auto``.

        Raises what :meth:`resolve` raises; a ``domain:auto`` part is left out of the result (the
        router picks it per prompt at admission). Returns the pinned fixed parts.
        """
        parts = self._parse(model)
        fixed = tuple(p for p in parts if not _is_auto(p.ref))
        if len(parts) > len(fixed):
            self._check_routed_depth(parts)
        pinned = self._pin(fixed)
        if len(parts) > len(fixed) and len(pinned) > len(fixed):  # layers made the fixed part deeper
            self._check_routed_depth(parts, fixed_depth=len(pinned))
        return pinned

    def _parse(self, model: str) -> tuple[StackPart, ...]:
        return () if model == self.base_name else parse_stack(model)

    def _pin(self, parts: Sequence[StackPart]) -> tuple[StackPart, ...]:
        if len(parts) > self._cache.max_resident:
            raise InvalidConfig(
                f"{format_stack(parts)!r} stacks {len(parts)} adapters but max_resident is {self._cache.max_resident}"
            )
        pinned = self._with_layers([StackPart(self.store.resolve(p.ref), p.weight) for p in parts])
        limit = min(MAX_STACK, self._cache.max_resident)
        if len(pinned) > limit:
            raise InvalidConfig(
                f"{format_stack(parts)!r} runs as {format_stack(pinned)!r} with the layers its adapters were "
                f"trained on: "
                f"{len(pinned)} adapters, but at most {limit} fit (a stack holds {MAX_STACK}, "
                f"max_resident is {self._cache.max_resident})"
            )
        return pinned

    def _with_layers(self, parts: Sequence[StackPart]) -> tuple[StackPart, ...]:
        """Serve a layered adapter (``create --over``) as it was trained: followed by its layer, pinned
        at the version recorded when it was created (not the layer's moving ``current``).

        The layered adapter and its layer are one unit: a part's weight scales both (the LoRA deltas
        add, so ``user:carol*0.5`` is ``(carol + finance@v1) * 0.5``). A stack that names the layer's
        adapter itself chooses its version and weight, and the layer is not added again; so this is
        idempotent and ``resolved`` computes the same row when sent back. Two parts layered on the
        same adapter that the stack does not name are refused (a stack applies an adapter once).
        """
        named = {p.ref.id for p in parts}
        carried: dict[str, AdapterRef] = {}
        out: list[StackPart] = []
        for part in parts:
            out.append(part)
            layer = self._layer_of(part.ref)
            if layer is None or layer.id in named:
                continue
            if layer.id in carried:
                raise InvalidReference(
                    f"{carried[layer.id]} and {part.ref} are both layered on {layer.id}, and a stack applies an "
                    f"adapter once: name {layer.id} in the stack (with a version, e.g. {layer}) to choose it"
                )
            carried[layer.id] = part.ref
            out.append(StackPart(self.store.resolve(layer), part.weight))  # a missing layer fails at admission
        return tuple(out)

    def _layer_of(self, pinned: AdapterRef) -> AdapterRef | None:
        """The layer a pinned version was trained on, read once per version: a version's meta never changes,
        and admission should not read it again for every request (it costs more than pinning)."""
        key = str(pinned)
        with self._layers_lock:
            if key in self._layers:
                return self._layers[key]
        layer = self.store.version_info(pinned).over_ref
        with self._layers_lock:
            if len(self._layers) >= LAYER_CACHE:
                self._layers.pop(next(iter(self._layers)))
            self._layers[key] = layer
        return layer

    def _check_routed_depth(self, parts: Sequence[StackPart], fixed_depth: int | None = None) -> None:
        """Refuse a stack with ``domain:auto`` that top-k routing could grow past the stack or slot limit.

        ``fixed_depth``: the pinned depth of the other parts, when layers make it more than they are."""
        depth = (len(parts) - 1 if fixed_depth is None else fixed_depth) + self.route_top_k
        limit = min(MAX_STACK, self._cache.max_resident)
        if depth > limit:
            raise InvalidReference(
                f"{format_stack(parts)!r} with route_top_k={self.route_top_k} can become {depth} adapters; "
                f"at most {limit} fit (a stack holds {MAX_STACK}, max_resident is {self._cache.max_resident}): "
                "lower the top-k or name fewer adapters"
            )

    def preload(self, model: str) -> tuple[StackPart, ...]:
        """Make ``model``'s adapters resident now (e.g. at startup); return the pinned parts."""
        parts = self.resolve(model)
        with self._lock:
            try:
                for part in parts:
                    self._cache.acquire(part.ref, protected={str(p.ref) for p in parts})
            finally:
                self._snapshot_residency()
        return parts

    # ------------------------------------------------------------------ forward passes
    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, models: Sequence[str] = ()
    ) -> torch.Tensor:
        """Full-sequence logits ``[batch, seq, vocab]``, row i computed with ``models[i]``.

        Padding must be on the left; position ids follow the attention mask.
        """
        if input_ids.dim() != 2 or len(models) != input_ids.shape[0]:
            raise InvalidConfig(
                f"logits needs input_ids [batch, seq] and one model per row; "
                f"got {tuple(input_ids.shape)} and {len(models)} models"
            )
        parts = [self.resolve(m) for m in models]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out: list[torch.Tensor | None] = [None] * len(parts)
        with self._lock, torch.no_grad():
            for group in group_rows([[p.ref for p in row] for row in parts], self._cache.max_resident):
                rows = torch.tensor(group)
                ids, mask = input_ids[rows].to(self.device), attention_mask[rows].to(self.device)
                try:
                    self._route([parts[i] for i in group])
                    logits = self._forward(ids, mask, _positions(mask), cache=None, last_only=False)
                finally:
                    self.runtime.clear_routes()
                for j, i in enumerate(group):
                    out[i] = logits[j]
                self._count(batches=1)
        return torch.stack(out)  # type: ignore[arg-type]

    def _route(self, parts_per_row: Sequence[Sequence[StackPart]], *, decoding: bool = False) -> None:
        """Make every adapter of these rows resident and route each row to its slots, at its parts' weights.

        A decode loop pre-gathers each row's factors once (when that fits ``PREGATHER_BYTES``)
        rather than gathering them again at every step.
        """
        refs_per_row = [[p.ref for p in parts] for parts in parts_per_row]
        keys = distinct_keys(refs_per_row)
        protected = {str(r) for r in keys}
        for ref in keys:
            self._cache.acquire(ref, protected)
        self._snapshot_residency()
        bank = self._cache.bank
        depth = max((len(r) for r in refs_per_row), default=0)
        pregather = decoding and len(refs_per_row) * depth * bank.slot_nbytes <= PREGATHER_BYTES
        slots = self._cache.slots_for(refs_per_row)
        self.runtime.set_routes(bank.routes(slots, _weight_table(parts_per_row, slots.shape), pregather=pregather))

    def _forward(self, input_ids, attention_mask, position_ids, *, cache, last_only: bool) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = False
        if last_only and self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        logits = self.model(**kwargs).logits
        return logits[:, -1] if last_only else logits

    # ------------------------------------------------------------------ admission
    def _resolve_request(self, request: GenerationRequest) -> tuple[StackPart, ...]:
        """Pin the request's model. A ``domain:auto*W`` part becomes the router's ``route_top_k`` best
        domains for this prompt (never one the stack already names), each at W x its routing weight;
        at top-1 that is one domain at weight W, so the row computes exactly what that domain computes."""
        parts = self._parse(request.model)
        if not any(_is_auto(p.ref) for p in parts):
            return self.resolve(request.model)
        fixed = self.check(request.model)  # pinned, layers included, depth checked
        named = {p.ref.id for p in parts} | {p.ref.id for p in fixed}  # never route to a layer already served
        # The router runs the base model: never while a batch has adapters routed on it.
        with self._lock, self._tokenizer_lock:
            if self._router is None:
                from ..compose.route import Router

                self._router = Router(self.store, self.model, self.tokenizer)
            prompt = request.messages if request.messages is not None else request.prompt
            choices = self._router.route(prompt, top_k=self.route_top_k, exclude=named)
        if not choices:
            raise NoDomainToRoute(
                f"domain:auto has no domain adapter left to pick: {request.model!r} already names every routable domain"
            )
        pinned: list[StackPart] = []
        ids = {p.ref.id for p in parts}
        fixed_parts = iter(p for p in fixed if p.ref.id in ids)  # the named parts, as pinned above (not their layers)
        for part in parts:
            if _is_auto(part.ref):
                pinned.extend(StackPart(c.ref, part.weight * c.weight) for c in choices if part.weight * c.weight > 0)
            else:
                pinned.append(next(fixed_parts))
        return self._pin(pinned)

    def _admit(self, request: GenerationRequest, *, streaming: bool = True) -> _Job:
        if not isinstance(request, GenerationRequest):
            raise InvalidConfig(f"expected a GenerationRequest, got {type(request).__name__}")
        parts = self._resolve_request(request)
        with self._tokenizer_lock:
            if request.messages is not None:
                try:
                    text = self.tokenizer.apply_chat_template(
                        list(request.messages), add_generation_prompt=True, tokenize=False
                    )
                except Exception as exc:  # jinja errors: a template may demand alternating roles, no system role, ...
                    raise InvalidConfig(f"the base's chat template refused these messages: {exc}") from None
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(request.prompt)["input_ids"]
        if not ids:
            raise InvalidPrompt("the prompt is empty: it has no tokens to continue from")
        room = self.context_length - len(ids)
        if room < 1:
            raise InvalidPrompt(f"the prompt has {len(ids)} tokens; the base's context holds {self.context_length}")
        params = request.params
        if params.logit_bias and params.logit_bias[-1][0] >= self.vocabulary.vocab_size:
            raise InvalidConfig(f"logit_bias names token {params.logit_bias[-1][0]}; this base's vocabulary has "
                                f"{self.vocabulary.vocab_size} tokens")
        grammar = self.vocabulary.matcher(params.response_format) if params.response_format is not None else None
        handle = Handle(request, tuple(str(p) for p in parts), streaming=streaming)
        return _Job(request, parts, list(ids), min(request.params.max_new_tokens, room), handle, grammar)

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run requests as mixed batches (chunks of ``max_batch``) in this thread; results in order.

        Every request is admitted first, so a bad model raises before anything runs.
        """
        if isinstance(requests, GenerationRequest):
            raise InvalidConfig("generate takes a sequence of requests; wrap a single one in a list")
        jobs = [self._admit(r, streaming=False) for r in requests]
        for start in range(0, len(jobs), self.max_batch):
            self._run_jobs(jobs[start : start + self.max_batch])
        results = []
        for job in jobs:
            results.append(job.handle.result(timeout=0))
        return results

    def submit(self, request: GenerationRequest) -> Handle:
        """Queue a request for the batching worker; bad requests raise here, in the caller's thread."""
        job = self._admit(request)
        job.handle.add_done_callback(self._count_cancelled)
        self._worker.put(job)
        return job.handle

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Text deltas of one request as tokens are produced (batched with concurrent requests).

        The request is admitted when ``stream`` is called, so a bad model raises at once.
        """
        return self.submit(request).stream()

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker: queued requests fail with ``EngineClosed``, a running batch finishes."""
        self._worker.close(timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run_jobs(self, jobs: Sequence[_Job]) -> None:
        """Run admitted jobs to completion; every job's handle ends finished or failed."""
        with self._lock:
            try:
                for group in group_rows([j.refs for j in jobs], self._cache.max_resident):
                    self._run_group([jobs[i] for i in group])
            except BaseException as exc:
                for job in jobs:  # a failed forward fails the requests it left unfinished
                    job.handle.fail(exc)
                raise
            finally:
                self._snapshot_residency()
                for job in jobs:
                    result = job.handle._result
                    if result is not None:
                        self._count(
                            requests=1, prompt_tokens=result.prompt_tokens, tokens_generated=result.completion_tokens
                        )
                    elif job.handle.done():
                        self._count(failed=1)

    def _run_group(self, jobs: list[_Job]) -> None:
        # Load each adapter on its own, so one that fails (a damaged file) fails only its requests.
        protected = {str(r) for j in jobs for r in j.refs}
        broken: dict[str, BaseException] = {}
        for ref in distinct_keys([j.refs for j in jobs]):
            try:
                self._cache.acquire(ref, protected)
            except Exception as exc:  # noqa: BLE001 - handed to the requests that need this adapter
                broken[str(ref)] = exc
        live = []
        for job in jobs:
            error = next((broken[str(r)] for r in job.refs if str(r) in broken), None)
            if error is not None:
                job.handle.fail(error)
            elif job.handle.cancelled:
                job.handle.fail(_cancelled())
            else:
                live.append(job)
        if live:
            with torch.no_grad():
                try:
                    self._decode([_Row(j, self) for j in live])
                finally:
                    self.runtime.clear_routes()

    def _decode(self, rows: list[_Row]) -> None:
        with self._stats_lock:
            self._counts["batches"] += 1
            self._counts["largest_batch"] = max(self._counts["largest_batch"], len(rows))
        width = max(len(r.job.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's last prompt token is in the last column
            n = len(row.job.prompt_ids)
            ids[i, width - n :] = torch.tensor(row.job.prompt_ids)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = _positions(mask)
        self._route([r.job.parts for r in rows], decoding=True)
        cache = _new_cache(self.model)
        logits = self._forward(ids, mask, positions, cache=cache, last_only=True)
        next_pos = positions[:, -1:] + 1
        while True:
            recorded, raw = _shape_logits(logits, rows)
            tokens = choose_tokens(logits, [r.params for r in rows], [r.generator for r in rows])
            entries = self._logprobs(recorded, raw, tokens, rows)
            for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=False)):
                if row.job.handle.cancelled:
                    row.done = True
                    row.job.handle.fail(_cancelled())
                else:
                    row.push(token, entries.get(i))
            keep = [i for i, row in enumerate(rows) if not row.done]
            if not keep:
                return
            if len(keep) < len(rows):  # finished rows leave the batch: cache, mask, positions and routes
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                rows = [rows[i] for i in keep]
                self._route([r.job.parts for r in rows], decoding=True)
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            logits = self._forward(tokens.view(-1, 1), mask, next_pos, cache=cache, last_only=True)
            next_pos = next_pos + 1

    def _logprobs(
        self, recorded: list[int], raw: torch.Tensor | None, tokens: torch.Tensor, rows: Sequence[_Row]
    ) -> dict[int, TokenLogprob]:
        """The logprobs entries of the rows that record them, for this step's chosen tokens."""
        if not recorded:
            return {}
        chosen = tokens[recorded].tolist()
        top = [rows[i].params.logprobs or 0 for i in recorded]
        entries = token_logprobs(raw, chosen, top, self.vocabulary.token_bytes)
        return dict(zip(recorded, entries, strict=True))

    # ------------------------------------------------------------------ observability
    def stats(self) -> EngineStats:
        """Counters and residency; answers at once, even while a batch runs (state as of its start)."""
        with self._stats_lock:
            return EngineStats(max_resident=self._cache.max_resident, **self._residency, **self._counts)

    def _snapshot_residency(self) -> None:
        """Copy the cache's state for ``stats()``; called (under the model lock) after it changes."""
        cache = self._cache
        c = cache.counters()
        snapshot = dict(
            resident=tuple(cache.resident), cpu_cached=tuple(cache.cpu), loads=c.loads, cpu_hits=c.cpu_hits,
            resident_hits=c.resident_hits, evictions=c.evictions, slot_bytes=cache.bank.nbytes,
            cpu_cache_bytes=cache.cpu_nbytes,
        )
        with self._stats_lock:
            self._residency = snapshot

    def _count_cancelled(self, handle: Handle) -> None:
        # Counted wherever the cancel lands: in the queue, before a batch, or at a decode step.
        if handle.cancelled and isinstance(handle.error, _CancelledError):
            self._count(cancelled=1)

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for key, value in increments.items():
                self._counts[key] += value


def _shape_logits(logits: torch.Tensor, rows: Sequence[_Row]) -> tuple[list[int], torch.Tensor | None]:
    """Per-row logit work, paid only by rows that ask for it (others are not touched).

    Copies the raw logits of the rows that record logprobs (before anything shapes the choice: the
    log-probabilities OpenAI reports), then adds ``logit_bias`` and applies the grammar mask in place.
    Returns those rows' indices and their raw logits.
    """
    recorded = [i for i, row in enumerate(rows) if row.logprobs is not None]
    raw = logits[recorded].float() if recorded else None  # indexing with a list copies
    for i, row in enumerate(rows):
        if row.shapes_logits:
            if row.bias is not None:
                ids, values = row.bias
                logits[i, ids] += values.to(logits.dtype)
            if row.grammar is not None:
                row.grammar.mask_(logits[i])
    return recorded, raw


def _vocab_size(model, tokenizer) -> int:
    """Width of the logits (models often pad their vocabulary past the tokenizer's)."""
    embeddings = model.get_output_embeddings()
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[0]) if weight is not None else max(int(model.config.vocab_size), len(tokenizer))


def _is_auto(ref: AdapterRef) -> bool:
    return ref.kind == "domain" and ref.name in RESERVED_NAMES


def _weight_table(parts_per_row: Sequence[Sequence[StackPart]], shape: torch.Size) -> torch.Tensor | None:
    """``[depth, rows]`` weights of the rows' parts (1 where a stack is shorter); None when all are 1."""
    if all(p.weight == 1.0 for parts in parts_per_row for p in parts):
        return None
    table = torch.ones(shape, dtype=torch.float32)
    for i, parts in enumerate(parts_per_row):
        for d, part in enumerate(parts):
            table[d, i] = part.weight
    return table


def _cancelled() -> BaseException:
    from concurrent.futures import CancelledError

    return CancelledError("the request was cancelled")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids under left padding: 0.. over real tokens; padding gets 0 (it is masked anyway)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)  # sliding-window and hybrid layers follow the config
    except TypeError:  # older transformers: a plain dynamic cache
        return DynamicCache()


def _context_length(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(value, int):
        ids.add(value)
    elif isinstance(value, (list, tuple)):
        ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
