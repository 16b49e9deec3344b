"""Merging adapters into a new, versioned adapter whose lineage names every parent version.

``merge(store, ["user:alice", "domain:finance"], into="merged:alice-finance", method="cat")``

The arithmetic is PEFT's ``LoraModel.add_weighted_adapter``; this module checks the inputs first
(so a bad merge fails with a persona error naming the rule, before any model is built), runs PEFT
on verified tensors, and publishes the result with the store. ``cat``, which only stacks factors,
is computed directly (:func:`cat_adapters`, PEFT's arithmetic without building the base's skeleton):
it is also what serves a stack to a one-LoRA-per-request engine (:mod:`persona.compose.materialize`).

Methods (``weights`` default to 1.0 each: the merge approximates applying every parent at once):

- ``cat``: exact. Each parent's A (times ``w_i * alpha_i / r_i``) and B are stacked, so the merged
  adapter's output equals the parents' stacked at inference. Rank: the sum of the parents' ranks.
- ``svd``: ``sum_i w_i * alpha_i / r_i * B_i A_i`` truncated by SVD to ``rank`` (default: the
  largest parent rank). Exact when ``rank`` reaches the sum of the parents' ranks.
- ``linear``: A and B each averaged with ``sqrt(w_i * alpha_i / r_i)``; cheap, and by PEFT's own
  account a rough approximation (the product has cross terms). Equal ranks required.
- ``ties``: TIES on A and on B (keep the top ``density`` share by magnitude, elect a sign per
  entry, average the entries that agree). Equal ranks required.
- ``dare_linear`` / ``dare_ties``: DARE (drop entries at random, keep ``density``, rescale by
  1/density), then linear / TIES. Equal ranks required; ``seed`` makes the drops reproducible.

PEFT builds the merged adapter with ``lora_alpha == r`` (scaling 1) and folds each parent's own
``alpha / r`` into the weights; the published ``adapter_config.json`` is that config, so PEFT,
vLLM and persona's runtime all apply it the same way.

Refused before PEFT runs: fewer than two parents, the same parent version twice, ``into`` not a
``merged:`` adapter or among the parents, parents bound to another base (``BaseMismatch``),
tensor shapes that do not fit the base, LoRA variants PEFT merges wrongly (rsLoRA, DoRA, LoRA
bias, per-module rank/alpha patterns: huggingface/peft#3761), unequal ranks for the methods that
average factors, different target modules for those same methods, a weight count that is not the
parent count, a weight that is not finite or beyond ``MAX_WEIGHT`` (100) in absolute value, and
``density``/``rank`` given where the method has no use for them. The store refuses to publish a result
holding NaN or infinity whatever the inputs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from ..errors import AdapterExists, InvalidConfig, InvalidReference
from ..peft_format import (ADAPTER_WEIGHTS, LoraSettings, PeftConfig, check_lora_fits, group_factors, linear_shapes,
                           lora_shapes, peft_tensors, refuse_variants)
from ..refs import RESERVED_NAMES, AdapterRef, parse_ref
from ..store import LoadedAdapter, NewVersion, Store, VersionInfo

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
DENSITY_METHODS = frozenset({"ties", "dare_linear", "dare_ties"})
# Methods that combine A and B factor by factor: PEFT needs equal ranks, and a module adapted by
# only some parents would be averaged with fewer terms than the others.
FACTOR_METHODS = frozenset({"linear", "ties", "dare_linear", "dare_ties"})
MIN_PARENTS = 2
MAX_PARENTS = 16
MAX_RANK = 1024  # LoraSettings' bound
# |weight| bound: weights beyond it overflow float32 in PEFT's arithmetic (linear takes sqrt(w), cat
# and svd scale by w) and published all-NaN adapters (issue 10, item 9); useful weights are O(1).
MAX_WEIGHT = 100.0


@dataclass(frozen=True)
class MergePlan:
    """A validated merge: pinned parents, their weights and the method's parameters."""

    parents: tuple[AdapterRef, ...]
    into: AdapterRef
    method: str
    weights: tuple[float, ...]
    density: float | None
    rank: int | None
    seed: int

    def params(self) -> dict[str, Any]:
        return {"method": self.method, "density": self.density, "rank": self.rank, "seed": self.seed}


def plan_merge(
    store: Store,
    parents: Sequence[str | AdapterRef],
    into: str | AdapterRef,
    method: str,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
) -> MergePlan:
    """Check everything that can be checked without reading tensors, and pin each parent's version."""
    if method not in METHODS:
        raise InvalidConfig(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    target = parse_ref(into)
    if target.kind != "merged":
        raise InvalidReference(f"a merge result is a merged adapter (merged:NAME), not {target.id}")
    if target.version is not None or target.alias is not None:
        raise InvalidReference(f"--into names an adapter, not a version: {target.id}, not {target}")
    if target.name in RESERVED_NAMES:
        raise InvalidReference(f"{target.id} is a reserved name")
    refs = [parse_ref(p) for p in parents]
    if not MIN_PARENTS <= len(refs) <= MAX_PARENTS:
        raise InvalidConfig(f"a merge takes {MIN_PARENTS} to {MAX_PARENTS} parent adapters, got {len(refs)}")
    if any(r.id == target.id for r in refs):
        raise InvalidReference(f"{target.id} cannot be merged into itself; pick another --into name")

    if weights is None:
        weights = [1.0] * len(refs)
    weights = tuple(weights)
    if len(weights) != len(refs):
        raise InvalidConfig(f"{len(weights)} weight(s) for {len(refs)} parents: give one weight per parent, in order")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise InvalidConfig(f"weights must be finite numbers, got {list(weights)}")
    if any(abs(w) > MAX_WEIGHT for w in weights):
        raise InvalidConfig(f"merge weights must lie in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], got {list(weights)}")
    if all(w == 0 for w in weights):
        raise InvalidConfig("all weights are 0: the merged adapter would do nothing")

    if method in DENSITY_METHODS:
        if density is None:
            raise InvalidConfig(f"{method} needs --density, the share of entries it keeps, in (0, 1] (e.g. 0.5)")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise InvalidConfig(f"density must be in (0, 1], got {density!r}")
        density = float(density)
    elif density is not None:
        raise InvalidConfig(f"density applies to {', '.join(sorted(DENSITY_METHODS))}, not to {method}")
    if method == "svd":
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise InvalidConfig(f"rank must be a positive integer, got {rank!r}")
    elif rank is not None:
        raise InvalidConfig(f"rank applies to svd only; {method} gives rank "
                            + ("the sum of the parent ranks" if method == "cat" else "the parents' rank"))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidConfig(f"seed must be an integer, got {seed!r}")

    pinned = tuple(store.resolve(r) for r in refs)  # AdapterNotFound / VersionNotFound
    seen: dict[AdapterRef, AdapterRef] = {}
    for given, pin in zip(refs, pinned):
        if pin in seen:
            raise InvalidReference(f"{given} and {seen[pin]} are the same version ({pin}); each parent must be a different version")
        seen[pin] = given
    return MergePlan(pinned, target, method, tuple(float(w) for w in weights), density, rank, seed)


def merge(
    store: Store,
    parents: Sequence[str | AdapterRef],
    into: str | AdapterRef,
    method: str,
    weights: Sequence[float] | None = None,
    density: float | None = None,
    rank: int | None = None,
    *,
    seed: int = 0,
) -> VersionInfo:
    """Merge ``parents`` with ``method`` and publish the result as ``into`` (v1, or its next version).

    ``weights`` (default 1.0 each) scale each parent's contribution; ``density`` (ties, dare_*) is
    the share of entries kept; ``rank`` (svd) is the target rank; ``seed`` fixes DARE's random
    drops. The new version's ``meta.json`` lineage names every parent: adapter, version, sha256 of
    its weights, weight, and the method with its parameters.

    >>> merge(store, ["user:alice", "domain:finance"], "merged:alice-fin", "cat", weights=[1, 0.5])  # doctest: +SKIP
    VersionInfo(adapter='merged:alice-fin', version=1, ...)
    """
    plan = plan_merge(store, parents, into, method, weights, density, rank, seed)
    # The store's lineage lock is held from reading the parents to publishing: a concurrent
    # `delete` of a parent either sees this merge in its lineage scan or happens before the parents
    # are read, so a deleted adapter's weights never end up inside a merge.
    with store.lineage_lock():
        loaded = [store.load(p) for p in plan.parents]  # hash-checked; BaseMismatch for another base
        ranks = check_parents(store, plan.method, loaded, plan.rank)
        if plan.method == "svd" and plan.rank is None:
            plan = replace(plan, rank=max(ranks))  # PEFT's default, made explicit for the lineage
        if plan.method == "cat":
            tensors, config = cat_adapters(loaded, plan.weights, store.config.base_id)
        else:
            tensors, config = _peft_merge(store, plan, loaded)
        lineage = tuple(
            {
                "adapter": p.info.adapter,
                "version": p.info.version,
                "sha256": p.info.files.get(ADAPTER_WEIGHTS),
                "relation": "merge",
                "weight": w,
                **plan.params(),
            }
            for p, w in zip(loaded, plan.weights)
        )
        try:
            return store.create(plan.into, LoraSettings.from_peft(config), tensors=tensors, adapter_config=config,
                                lineage=lineage)
        except AdapterExists:
            # A new version of an existing merge is not trained from the previous one: no parent.
            return store.publish_version(plan.into, NewVersion(tensors, config, lineage=lineage))


def _modules(tensors: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return group_factors(tensors, lambda key: InvalidConfig(
        f"unexpected tensor {key!r}: a merge takes plain LoRA adapters in PEFT's format"))


def check_parents(store: Store, method: str, loaded: Sequence[LoadedAdapter], rank: int | None = None) -> list[int]:
    """Refuse parents that ``method`` (with svd's ``rank``) cannot merge correctly; return their ranks."""
    from ..base import load_config

    base_config = load_config(store.config.base_id)
    base_shapes = linear_shapes(base_config)
    ranks, module_sets = [], []
    for parent in loaded:
        name, config = parent.info.ref, parent.peft_config
        if config.peft_type.upper() != "LORA":
            raise InvalidConfig(f"{name} is a {config.peft_type} adapter; only LoRA adapters merge")
        # PEFT merges these variants silently wrong (the merged config inherits them from the first parent).
        refuse_variants(config, InvalidConfig, str(name), "which PEFT's merge does not handle correctly "
                        "(huggingface/peft#3761); merge plain LoRA adapters only")
        modules = _modules(parent.tensors)
        # the one check that weights fit the base (also create's and import's): targets, keys, shapes
        check_lora_fits(parent.tensors, config, base_shapes, str(name))
        ranks.append(config.r)
        module_sets.append(frozenset(modules))
    if method in FACTOR_METHODS:
        if len(set(ranks)) > 1:
            listing = ", ".join(f"{p.info.ref} r={r}" for p, r in zip(loaded, ranks))
            raise InvalidConfig(f"{method} averages the LoRA factors and needs equal ranks ({listing}); "
                                "use cat or svd for different ranks")
        for parent, modules in zip(loaded[1:], module_sets[1:]):
            if modules != module_sets[0]:
                diff = sorted(modules ^ module_sets[0])
                raise InvalidConfig(
                    f"{method} needs parents that adapt the same modules; {loaded[0].info.ref} and "
                    f"{parent.info.ref} differ on {diff[0]}{' and others' if len(diff) > 1 else ''}. "
                    "Use cat or svd, which allow it"
                )
    if method == "svd" and rank is not None:
        limit = min(min(shape) for shape in lora_shapes(base_config, _suffixes(module_sets)).values())
        if rank > limit:
            raise InvalidConfig(f"svd rank {rank} exceeds the smallest adapted layer's dimension ({limit})")
    if method == "cat" and sum(ranks) > MAX_RANK:
        raise InvalidConfig(f"cat gives rank {sum(ranks)} (the sum of the parents'), over {MAX_RANK}; use svd with --rank")
    return ranks


def _suffixes(module_sets) -> tuple[str, ...]:
    return tuple(sorted({m.rsplit(".", 1)[-1] for s in module_sets for m in s}))


def cat_adapters(loaded: Sequence[LoadedAdapter], weights: Sequence[float], base_model: str
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The exact ``cat`` merge, without building a model: ``(tensors, adapter_config)``.

    Each parent's A, times ``w_i * alpha_i / r_i``, and its B are stacked at the parent's rows and
    columns (zero where a parent does not adapt a module), with ``lora_alpha == r`` (scaling 1), so
    ``B A x`` is ``sum_i w_i * alpha_i / r_i * B_i A_i x``: the parents stacked at inference. This is
    PEFT's ``add_weighted_adapter(combination_type="cat")`` arithmetic, and PEFT's config for it (the
    first parent's, with the summed rank and the union of the targets). Check with
    :func:`check_parents` first.
    """
    import torch

    factors = [_modules(parent.tensors) for parent in loaded]
    ranks = [parent.peft_config.r for parent in loaded]
    total = sum(ranks)
    out: dict[str, tuple[Any, Any]] = {}
    for module in sorted({m for f in factors for m in f}):
        a0, b0 = next(f[module] for f in factors if module in f)
        a_cat = torch.zeros(total, a0.shape[1], dtype=torch.float32)
        b_cat = torch.zeros(b0.shape[0], total, dtype=torch.float32)
        offset = 0
        for parent, f, r, w in zip(loaded, factors, ranks, weights):
            if module in f:
                a, b = f[module]
                a_cat[offset:offset + r] = a.to(torch.float32) * (w * parent.peft_config.scaling)
                b_cat[:, offset:offset + r] = b.to(torch.float32)
            offset += r
        out[module] = (a_cat, b_cat)
    config = loaded[0].peft_config.to_json()
    config.update(r=total, lora_alpha=total, target_modules=sorted({m.rsplit(".", 1)[-1] for m in out}),
                  rank_pattern={}, alpha_pattern={}, layers_to_transform=None, layers_pattern=None,
                  base_model_name_or_path=base_model, inference_mode=False)
    return peft_tensors(out), config


def _peft_merge(store: Store, plan: MergePlan, loaded: Sequence[LoadedAdapter]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run PEFT's add_weighted_adapter on a skeleton of the base; return (tensors, adapter_config)."""
    import torch
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from ..base import load_config

    # The merge reads only the LoRA factors, never the base's weights, so the base's architecture
    # is built with uninitialised storage instead of being loaded (same module names and shapes).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(store.config.base_id))
    model = model.to_empty(device="cpu").float()
    names = [f"p{i}" for i in range(len(loaded))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes from inside PEFT
        peft_model = _peft_model(model, names, loaded)

    merged = "merged"
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT looks for the base's config.json by name to decide whether to save embeddings: the
        # store records the base itself (and the merge saves LoRA factors only), so the miss is noise.
        warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)
        torch.manual_seed(plan.seed)  # DARE's drops are random: the seed makes a merge reproducible
        peft_model.add_weighted_adapter(
            adapters=names,
            weights=list(plan.weights),
            adapter_name=merged,
            combination_type=plan.method,
            svd_rank=plan.rank,
            density=plan.density,
            svd_full_matrices=False,  # the truncated SVD is the same; the full one costs far more
        )
        state = get_peft_model_state_dict(peft_model, adapter_name=merged)
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}
    config = PeftConfig.from_lora_config(peft_model.peft_config[merged], store.config.base_id).to_json()
    return tensors, config


def _peft_model(model: Any, names: Sequence[str], loaded: Sequence[LoadedAdapter]) -> Any:
    """A PeftModel over ``model`` holding each parent's verified tensors as a named adapter."""
    import torch
    from peft import PeftModel
    from peft.utils import set_peft_model_state_dict

    peft_model = None
    for name, parent in zip(names, loaded):
        config = parent.peft_config.to_lora_config()
        config.inference_mode = True
        if peft_model is None:
            peft_model = PeftModel(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        tensors = {k: v.to(torch.float32) for k, v in parent.tensors.items()}
        result = set_peft_model_state_dict(peft_model, tensors, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if result.unexpected_keys or missing:
            bad = (result.unexpected_keys or missing)[0]
            raise InvalidConfig(f"{parent.info.ref} does not fit this base: PEFT could not place {bad}")
    return peft_model
