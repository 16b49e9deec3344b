"""The serving engine: one frozen base, many LoRA adapters, mixed batches.

Its job: admit requests (validate, pin their adapters, tokenize), keep their adapters resident, and
run the forward passes and decode loop of each batch. The parts it drives live beside it in
``persona.serving``: ``requests`` (the types), ``resolve`` (pinning a model string), ``slots``
(residency), ``decode`` (one step's token choice), ``running`` (the running batch and its KV cache),
``scheduler`` (the worker thread and its admission policy).

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
- A request's references are pinned to versions when it is admitted (``serving.resolve``); the pinned
  version is what runs, and what is cached (keys are ``kind:name@vN``), so a moved ``current`` is
  picked up by the next request and an old version is never served under the new name. An unknown
  adapter, version or malformed reference raises the store's error: there is no fallback to the base.
- Adapters are loaded on first use into slot tensors (``serving.slots``) and applied per row by a
  batched gather (``persona.lora_runtime.SlotRoute``); stacks loop over their depth, and a part's weight
  scales that row's update at that depth (one slot serves an adapter at any weight).
- Generation runs its own decode loop over a KV cache, with left padding, per-row sampling
  (``serving.decode``, ``serving.sampling``), incremental detokenization and stop strings
  (``serving.detokenize``).
  Finished rows leave the batch. A row may also record logprobs, bias its logits (``logit_bias``)
  or follow a JSON grammar (``response_format``, ``serving.constrain``); rows that ask for none of
  these are not touched.
- ``generate`` runs its requests in the caller's thread, as batches of ``max_batch`` run to their
  end; ``submit``/``stream`` go through one worker thread (``serving.scheduler``) that batches
  continuously: at every iteration waiting requests join the running batch (``serving.running``)
  and finished rows leave it.

Thread safety: every public method may be called from any thread; model execution is serialized by
one lock. The engine owns its base model while it lives: do not run a ``Trainer`` on the same
``BaseModel`` object at the same time.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from concurrent.futures import CancelledError as _CancelledError
from typing import Any, Iterator, Sequence

import torch

from ..base import BaseModel, check_base, load_base, resolve_device
from ..embed import SENTENCE_EMBEDDING_ID
from ..errors import EngineClosed, InvalidConfig, InvalidPrompt  # noqa: F401 - EngineClosed importable from here as before
from ..lora_runtime import LoraRuntime
from ..refs import MAX_STACK, StackPart
from ..store.memory import TextEmbedder
from .constrain import Vocabulary
from .decode import Row, advance, new_kv_cache, next_tokens, positions
from .model_facts import check_base_dtype, context_length, eos_ids, vocab_size
from .memory import MemoryConfig, PromptMemory
from .requests import EngineStats, GenerationRequest, GenerationResult, Handle, Job, ServingTimes, cancelled_error
from .resolve import ModelResolver
from .running import RunningBatch, TurnLock, check_cache_layers
from .scheduler import AdmissionPolicy, ContinuousWorker, Occupancy
from .slots import AdapterCache, SlotBank, distinct_keys, group_rows, weight_table

__all__ = ["Engine"]

log = logging.getLogger(__name__)

PREGATHER_BYTES = 512 << 20  # transient memory a decode batch may use for its rows' gathered factors


class Engine:
    """A multi-LoRA inference engine around one frozen base model.

    ``base`` defaults to the store's base, loaded frozen; ``device`` defaults to where ``base`` is
    (else the CPU). ``max_resident`` bounds the adapters held in slots (least recently used are
    evicted); ``cpu_cache`` bounds the decoded adapters kept in CPU memory; ``max_batch`` bounds the
    rows of one batch; ``batch_wait_s`` is how long the worker waits for more requests to batch.
    ``route_top_k`` is how many domain adapters ``domain:auto`` becomes (1: the router's best, at
    weight 1). Submitted requests are batched continuously (they join and leave the running batch at
    every step); ``max_batch_tokens`` bounds the prompt tokens prefilled in one iteration, and a
    longer prompt is prefilled in chunks of that size.

    ``device``/``dtype`` (``persona serve --device/--dtype``) place the base the engine loads:
    ``"auto"`` (the default) is a GPU in bfloat16 where torch sees one, else the CPU in float32
    (:func:`persona.base.resolve_device`). With a given ``base``, ``device`` moves it and ``dtype``
    must be the one it was loaded in. Slot tensors follow the model's device and dtype.
    ``memory``: :meth:`serving.memory.MemoryConfig.of` (None: requests opt in; docs/MEMORY.md).
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
        dtype: str | torch.dtype | None = None,
        batch_wait_s: float = 0.005,
        route_top_k: int = 1,
        max_batch_tokens: int = 2048,
        memory: MemoryConfig | bool | None = None,
    ):
        limits = (
            ("max_resident", max_resident, 1, 4096),
            ("cpu_cache", cpu_cache, 0, 1 << 20),
            ("max_batch", max_batch, 1, 4096),
            ("route_top_k", route_top_k, 1, MAX_STACK),
            ("max_batch_tokens", max_batch_tokens, 1, 1 << 20),
        )
        for name, value, low, high in limits:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InvalidConfig(f"{name} must be an integer in {low}..{high}, got {value!r}")
        if route_top_k > max_resident:
            raise InvalidConfig(f"route_top_k={route_top_k} cannot exceed max_resident={max_resident}")
        if not isinstance(batch_wait_s, (int, float)) or not 0 <= batch_wait_s <= 10:
            raise InvalidConfig(f"batch_wait_s must be in [0, 10] seconds, got {batch_wait_s!r}")
        self.store = store
        if base is None:  # device and dtype resolved (a missing GPU refused) before any weight is read
            base = load_base(store.config.base_id, device=device or "auto", dtype=dtype or "auto")
        else:
            check_base_dtype(base, dtype)
            if device is not None:
                base.model.to(resolve_device(device, None)[0])
        self.base = base
        self.device = next(base.model.parameters()).device
        check_base(self.base.info, base_id=store.config.base_id, fingerprint=store.config.base_fingerprint,
                   store_root=store.root)
        self.model = self.base.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = self.base.tokenizer
        self.max_batch = max_batch
        self.route_top_k = route_top_k
        self.runtime = LoraRuntime.attach(self.model)
        self.dtype = next(self.model.parameters()).dtype
        # Serving keeps the slots in the model's dtype: a bf16 base reads bf16 factors (the LoRA scale
        # is folded in float32 first, then rounded once; see SlotBank.write).
        bank = SlotBank(self.runtime, device=self.device, dtype=self.dtype)
        self._cache = AdapterCache(store, bank, max_resident=max_resident, cpu_cache=cpu_cache)
        self.context_length = context_length(self.model.config)
        self.eos_token_ids = eos_ids(self.model, self.tokenizer)
        self.vocabulary = Vocabulary(self.tokenizer, vocab_size(self.model, self.tokenizer), self.eos_token_ids)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids, default=0)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._logits_to_keep = "logits_to_keep" in params
        self._lock = TurnLock()  # the model and the slots
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share across threads
        self._stats_lock = threading.Lock()  # counters and a snapshot of residency: stats() never waits on a batch
        self._counts = dict.fromkeys(
            ("requests", "failed", "cancelled", "prompt_tokens", "tokens_generated", "batches", "largest_batch"), 0)
        self._times = ServingTimes()  # where the continuous worker's time goes (stats().times)
        self._residency: dict[str, Any] = {}
        self._snapshot_residency()
        self._router = None  # built on the first domain:auto request
        self._resolver = ModelResolver(
            store, base_name=self.base_name, max_resident=max_resident, route_top_k=route_top_k, route=self._route_prompt
        )
        self.memory = MemoryConfig.of(memory)
        # fused retrieval's vectors are cached per key: this base (its fingerprint) and this embedding
        embedder = TextEmbedder(f"{self.base.info.fingerprint}/{SENTENCE_EMBEDDING_ID}", self._embed_texts)
        self._memory = PromptMemory(store, self.memory, self.tokenizer, self._tokenizer_lock, embedder)
        check_cache_layers(new_kv_cache(self.model))
        self.max_batch_tokens = max_batch_tokens  # also the chunk of a longer prompt's prefill
        self._running = self._new_batch()
        self._decode_next = False  # after a chunk of a long prompt, the running rows decode first
        policy = AdmissionPolicy(max_batch=max_batch, max_batch_tokens=max_batch_tokens, max_resident=max_resident)
        self._worker = ContinuousWorker(self._step, policy, wait_s=batch_wait_s)

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
        return self._resolver.resolve(model)

    def check(self, model: str) -> tuple[StackPart, ...]:
        """Validate ``model`` before any prompt is known: pin every part but ``domain:auto``.

        Raises what :meth:`resolve` raises; a ``domain:auto`` part is left out of the result (the
        router picks it per prompt at admission). Returns the pinned fixed parts.
        """
        return self._resolver.check(model)

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
                    logits = self._forward(ids, mask, positions(mask), cache=None, last_only=False)
                finally:
                    self.runtime.clear_routes()
                for j, i in enumerate(group):
                    out[i] = logits[j]
                self._count(batches=1)
        return torch.stack(out)  # type: ignore[arg-type]

    def _route(self, parts_per_row: Sequence[Sequence[StackPart]], *, decoding: bool = False) -> None:
        """Make every adapter of these rows resident and route each row to its slots, at its parts' weights."""
        keys = distinct_keys([[p.ref for p in parts] for parts in parts_per_row])
        protected = {str(r) for r in keys}
        for ref in keys:
            self._cache.acquire(ref, protected)
        self._snapshot_residency()
        self.runtime.set_routes(self._routes(parts_per_row, decoding=decoding))

    def _routes(self, parts_per_row: Sequence[Sequence[StackPart]], *, decoding: bool) -> dict:
        """The routes of rows whose adapters are resident. A decode loop pre-gathers each row's factors
        once (when that fits ``PREGATHER_BYTES``) rather than gathering them again at every step."""
        refs_per_row = [[p.ref for p in parts] for parts in parts_per_row]
        bank = self._cache.bank
        depth = max((len(r) for r in refs_per_row), default=0)
        pregather = decoding and len(refs_per_row) * depth * bank.slot_nbytes <= PREGATHER_BYTES
        slots = self._cache.slots_for(refs_per_row)
        return bank.routes(slots, weight_table(parts_per_row, slots.shape), pregather=pregather)

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
    def _route_prompt(self, prompt: Any, exclude: Any) -> Any:
        """The router's choices for ``prompt`` (``domain:auto``); the router is built on first use."""
        # The router runs the base model: never while a batch has adapters routed on it.
        with self._lock, self._tokenizer_lock:
            if self._router is None:
                from ..compose.route import Router

                self._router = Router(self.store, self.model, self.tokenizer)
            return self._router.route(prompt, top_k=self.route_top_k, exclude=exclude)

    def _embed_texts(self, texts: Sequence[str]) -> Any:
        """The base's own sentence embeddings of ``texts`` (``persona.embed``), for fused memory retrieval."""
        from ..embed import embed_sentences

        # the base alone, as the router runs it: never while a batch has adapters routed on it
        with self._lock, self._tokenizer_lock:
            return embed_sentences(self.model, self.tokenizer, texts).numpy()

    def _admit(self, request: GenerationRequest, *, streaming: bool = True) -> Job:
        if not isinstance(request, GenerationRequest):
            raise InvalidConfig(f"expected a GenerationRequest, got {type(request).__name__}")
        prompt = request.messages if request.messages is not None else request.prompt
        parts = self._resolver.for_prompt(request.model, prompt)
        recalled = self._memory.recall(request, parts)  # the user parts' memories, in a system message
        with self._tokenizer_lock:
            if request.messages is not None:
                try:
                    text = self.tokenizer.apply_chat_template(
                        list(recalled.messages), add_generation_prompt=True, tokenize=False
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
        handle = Handle(request, tuple(str(p) for p in parts), streaming=streaming, memories=recalled.ids)
        return Job(request, parts, list(ids), min(request.params.max_new_tokens, room), handle, grammar)

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
        job.times.submitted = time.perf_counter()
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

    def _run_jobs(self, jobs: Sequence[Job]) -> None:
        """Run admitted jobs to completion in this thread (``generate``'s batches); every job's handle
        ends finished or failed."""
        with self._lock:
            try:
                for group in group_rows([j.refs for j in jobs], self._cache.max_resident):
                    live = self._load_adapters([jobs[i] for i in group], protected=())
                    if live:
                        with torch.no_grad():
                            try:
                                self._decode([self._row(j) for j in live])
                            finally:
                                self.runtime.clear_routes()
            except BaseException as exc:
                for job in jobs:  # a failed forward fails the requests it left unfinished
                    job.handle.fail(exc)
                raise
            finally:
                self._snapshot_residency()
                for job in jobs:
                    self._count_ended(job)

    def _step(self, joining: Sequence[Job]) -> Occupancy:
        """One iteration of continuous batching, prefill first: if any of ``joining`` can run, they are
        prefilled (their first tokens reach their streams at once) and join; otherwise every running
        row decodes one token. Finished rows leave. Returns what is left running.

        Why an iteration does one or the other (as vLLM's default scheduler before chunked prefill):
        a request that arrives while a prefill runs is taken by the very next iteration, instead of
        waiting for the running rows' decode step too, which costs several times a one-row step in a
        full batch. The running rows lose nothing they did not lose before (they waited for that
        prefill inside the same step), and consecutive prefill iterations are bounded: each one adds
        rows, and admission stops at ``max_batch`` rows, so a decode step follows in at most that many.
        """
        batch, ended = self._running, []
        self._lock.yield_to_waiting()
        with self._lock, torch.no_grad():
            try:
                running = {str(r) for row in self._held_rows() for r in row.job.refs}
                live = self._load_adapters(joining, protected=running)
                kept = {id(j) for j in live}
                ended += [j for j in joining if id(j) not in kept]  # a broken adapter, or cancelled: never ran
                if live:
                    self._count(batches=1)
                    ended += [r.job for r in batch.prefill([self._row(j) for j in live], chunk=self.max_batch_tokens)]
                    self._record_first_tokens(live)
                    self._decode_next = batch.partial is not None  # a long prompt's chunks alternate with decode steps
                elif batch.partial is not None and not (batch.rows and self._decode_next):
                    job = batch.partial.row.job
                    if job.handle.cancelled:
                        batch.drop_partial()
                        job.handle.fail(cancelled_error())
                        ended.append(job)
                    else:
                        ended += [r.job for r in batch.prefill_chunk(self.max_batch_tokens)]
                        self._record_first_tokens([job] if batch.partial is None else [])
                    self._decode_next = True
                else:
                    rows, start = len(batch), time.perf_counter()
                    ended += [r.job for r in batch.decode()]
                    if rows:
                        self._add_times(decode_steps=1, decode_rows=rows, decode_s=time.perf_counter() - start)
                    self._decode_next = False
                with self._stats_lock:
                    self._counts["largest_batch"] = max(self._counts["largest_batch"], len(batch))
            except BaseException as exc:
                done = {id(j) for j in ended}
                lost = {id(j): j for j in [*(r.job for r in batch.clear()), *joining] if id(j) not in done}
                for job in lost.values():  # a failed forward fails every request it held
                    job.handle.fail(exc)
                ended += lost.values()
                raise
            finally:
                self.runtime.clear_routes()  # the router and logits() run the model between steps
                adapters = frozenset(str(r) for row in self._held_rows() for r in row.job.refs)
                self._cache.pinned = adapters  # a running row's slots are never evicted between its steps
                self._snapshot_residency()
                for job in ended:
                    self._count_ended(job)
            return Occupancy(len(batch), adapters, prefilling=batch.partial is not None)

    def _held_rows(self) -> list[Row]:
        """The running rows and the one being prefilled in chunks (their adapters stay resident)."""
        batch = self._running
        return batch.rows + ([batch.partial.row] if batch.partial is not None else [])

    def _record_first_tokens(self, jobs: Sequence[Job]) -> None:
        """Add the prefilled jobs' ways to their first tokens to ``stats().times`` (submitted jobs only:
        ``generate``'s have no queue), and log each at debug level."""
        with self._stats_lock:
            self._times = self._times.plus(prefill_steps=1)
            for job in jobs:
                t = job.times
                if t.submitted and t.first_token:
                    self._times = self._times.of(t)
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("first token of %s after %.1f ms: queue %.1f, admission %.1f, setup %.1f, "
                                  "prefill %.1f, emit %.1f", job.request.model,
                                  1e3 * (t.first_token - t.submitted), 1e3 * (t.taken - t.submitted),
                                  1e3 * (t.admitted - t.taken), 1e3 * (t.prefill_start - t.admitted),
                                  1e3 * (t.prefill_end - t.prefill_start), 1e3 * (t.first_token - t.prefill_end))

    def _add_times(self, **increments: float) -> None:
        with self._stats_lock:
            self._times = self._times.plus(**increments)

    def _load_adapters(self, jobs: Sequence[Job], *, protected: set[str] | tuple = ()) -> list[Job]:
        """Make the jobs' adapters resident and return the jobs that can run. Each adapter loads on its
        own, so one that fails (a damaged file) fails only its requests; cancelled jobs fail here too."""
        broken = self._cache.acquire_each(distinct_keys([j.refs for j in jobs]), protected)
        live = []
        for job in jobs:
            error = next((broken[str(r)] for r in job.refs if str(r) in broken), None)
            if error is not None:
                job.handle.fail(error)
            elif job.handle.cancelled:
                job.handle.fail(cancelled_error())
            else:
                live.append(job)
        return live

    def _row(self, job: Job) -> Row:
        return Row(job, tokenizer=self.tokenizer, tokenizer_lock=self._tokenizer_lock, device=self.device,
                   eos_token_ids=self.eos_token_ids)

    def _choose(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        """Shape the rows' logits, choose their tokens and hand them over; returns the tokens."""
        tokens, entries = next_tokens(logits, rows, self.vocabulary.token_bytes)
        advance(rows, tokens, entries)
        return tokens

    def _decode(self, rows: list[Row]) -> None:
        """``generate``'s batch: the rows' prompts in one forward, then decode steps until every row has left."""
        with self._stats_lock:
            self._counts["batches"] += 1
            self._counts["largest_batch"] = max(self._counts["largest_batch"], len(rows))
        batch = self._new_batch()
        batch.prefill(rows)
        while len(batch):
            batch.decode()

    def _new_batch(self) -> RunningBatch:
        return RunningBatch(
            forward=lambda ids, mask, pos, cache: self._forward(ids, mask, pos, cache=cache, last_only=True),
            routes_for=lambda rows, decoding: self._routes([r.job.parts for r in rows], decoding=decoding),
            apply_routes=self.runtime.set_routes, choose=self._choose,
            new_cache=lambda: new_kv_cache(self.model), pad_token_id=self.pad_token_id, device=self.device,
            record=lambda phase, seconds: self._add_times(**{phase: seconds}))

    # ------------------------------------------------------------------ observability
    def stats(self) -> EngineStats:
        """Counters and residency; answers at once, even while a batch runs (state as of its start)."""
        with self._stats_lock:
            return EngineStats(max_resident=self._cache.max_resident, **self._residency, **self._counts,
                               times=self._times)

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

    def _count_ended(self, job: Job) -> None:
        result = job.handle._result
        if result is not None:
            self._count(requests=1, prompt_tokens=result.prompt_tokens, tokens_generated=result.completion_tokens)
        elif job.handle.done():
            self._count(failed=1)

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for key, value in increments.items():
                self._counts[key] += value
