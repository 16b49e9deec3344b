"""The router: domain adapters only, right domain for held-out prompts, refresh on a new version.

The tiny base is random, so the test domains are made clearly separable by their words: each
domain's prompts draw from its own small vocabulary. (Accuracy on real topics with the real base is
measured in benchmarks/compose.py.)
"""

import json
import math
import random

import pytest
import torch
from click.testing import CliRunner

from persona import AdapterNotFound, InvalidConfig, LoraSettings, Store
from persona.base import load_base
from persona.cli.main import PersonaGroup
from persona.cli.compose import COMMANDS
from persona.interactions import Interaction
from persona.lora_runtime import Activation, AdapterWeights, LoraRuntime
from persona.refs import MAX_STACK, StackPart, format_stack, format_weight, parse_stack
from persona.compose.route import CACHE_DIR, Router, prompt_text, select, top_right_singular_vector
from persona.training.trainer import Trainer, UpdateConfig

VOCAB = {
    "finance": ["stock", "bond", "dividend", "mortgage"],
    "medicine": ["fever", "vaccine", "symptom", "allergy"],
    "cooking": ["pasta", "garlic", "oven", "butter"],
    "travel": ["flight", "hotel", "passport", "luggage"],
}
FAST = UpdateConfig(epochs=1, batch_size=8, max_length=96, holdout_fraction=0.2, force=True)


def prompts(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{domain}-{seed}")
    return [" ".join(rng.choice(VOCAB[domain]) for _ in range(12)) for _ in range(n)]


def chats(domain: str, n: int, seed: int) -> list[Interaction]:
    return [Interaction(messages=(("user", p), ("assistant", f"about {domain}"))) for p in prompts(domain, n, seed)]


def train(trainer: Trainer, ref: str, domain: str, seed: int = 1) -> None:
    if not trainer.store.exists(ref):
        trainer.store.create(ref, LoraSettings(rank=4, seed=seed))
    trainer.update(ref, chats(domain, 16, seed), FAST)


@pytest.fixture(scope="module")
def world(tiny_base, tmp_path_factory):
    """Three trained domains, plus a user and a merged adapter trained on a fourth topic."""
    store = Store.init(tmp_path_factory.mktemp("route") / "adapters", base=tiny_base)
    trainer = Trainer(store)
    for domain in ("finance", "medicine", "cooking"):
        train(trainer, f"domain:{domain}", domain)
    train(trainer, "user:alice", "travel")
    train(trainer, "merged:travel", "travel")
    return store, trainer


@pytest.fixture(scope="module")
def router(world):
    store, trainer = world
    return Router(store, trainer.model, trainer.tokenizer)


def test_picks_the_right_domain_for_held_out_prompts(router):
    for domain in ("finance", "medicine", "cooking"):
        for text in prompts(domain, 8, seed=99):  # never trained on
            choice = router.route(text)
            assert len(choice) == 1 and choice[0].adapter == f"domain:{domain}@v2", (text, router.scores(text))
            assert choice[0].weight == 1.0


def test_top_k_weights_and_all_scores(router):
    text = prompts("medicine", 1, seed=5)[0]
    scores = router.scores(text)
    assert [s.adapter for s in scores][0] == "domain:medicine@v2"
    assert sorted(s.adapter for s in scores) == ["domain:cooking@v2", "domain:finance@v2", "domain:medicine@v2"]
    assert [s.score for s in scores] == sorted((s.score for s in scores), reverse=True)
    two = router.route(text, top_k=2)
    assert [c.adapter for c in two] == [s.adapter for s in scores[:2]]
    assert sum(c.weight for c in two) == pytest.approx(1.0) and two[0].weight > two[1].weight
    assert len(router.route(text, top_k=10)) == 3  # no more than there are domains
    with pytest.raises(InvalidConfig, match="top_k"):
        router.route(text, top_k=0)


def test_never_picks_user_or_merged_adapters(router):
    # alice and merged:travel were trained on exactly this kind of prompt; the router ignores them
    for text in prompts("travel", 5, seed=3):
        scores = router.scores(text)
        assert scores and all(s.adapter.startswith("domain:") for s in scores)
        assert router.route(text, top_k=3)[0].adapter.startswith("domain:")


def test_prompt_forms():
    assert prompt_text("hi") == "hi"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert prompt_text(messages) == "a\nc"
    assert prompt_text(Interaction(prompt="p", completion="c")) == "p"
    with pytest.raises(InvalidConfig, match="no user text"):
        prompt_text([{"role": "system", "content": "only a system prompt"}])
    with pytest.raises(InvalidConfig, match="no user text"):
        prompt_text("   ")


def test_refreshes_when_a_domain_gets_a_new_version(tiny_base, isolated_store):
    store = Store.init(isolated_store, base=tiny_base)
    trainer = Trainer(store)
    train(trainer, "domain:finance", "finance")
    train(trainer, "domain:medicine", "medicine")
    router = Router(store, trainer.model, trainer.tokenizer)
    text = prompts("cooking", 1, seed=7)[0]
    before = {s.adapter: s.score for s in router.scores(text)}
    assert set(before) == {"domain:finance@v2", "domain:medicine@v2"}
    cache = store.cache_dir(CACHE_DIR) / "centroid" / "medicine.safetensors"
    assert cache.is_file()

    train(trainer, "domain:medicine", "cooking", seed=2)  # medicine@v3 now also knows cooking prompts
    after = {s.adapter: s.score for s in router.scores(text)}
    assert set(after) == {"domain:finance@v2", "domain:medicine@v3"}
    assert after["domain:medicine@v3"] > before["domain:medicine@v2"]
    assert router.route(text)[0].adapter == "domain:medicine@v3"
    from safetensors import safe_open

    with safe_open(str(cache), framework="pt") as f:
        assert f.metadata()["version"] == "3"

    train(trainer, "domain:cooking", "cooking")  # a new domain appears
    assert router.route(text)[0].adapter == "domain:cooking@v2"
    store.delete("domain:cooking")  # and disappears, its cache with it
    assert "domain:cooking@v2" not in {s.adapter for s in router.scores(text)}
    assert not (store.cache_dir(CACHE_DIR) / "centroid" / "cooking.safetensors").exists()


def test_cache_is_reused_by_a_new_router_and_recomputed_if_stale(world, monkeypatch):
    store, trainer = world
    calls = []
    original = Router._embed

    def counting(self, texts, *a, **k):
        calls.append(len(texts))
        return original(self, texts, *a, **k)

    monkeypatch.setattr(Router, "_embed", counting)
    router = Router(store, trainer.model, trainer.tokenizer)
    router.scores("stock bond")
    assert calls == [1]  # centroids came from ROOT/.cache/router, only the prompt was embedded
    cache = store.cache_dir(CACHE_DIR) / "centroid" / "finance.safetensors"
    cache.write_bytes(b"garbage")  # damaged: recomputed, never trusted
    Router(store, trainer.model, trainer.tokenizer).scores("stock bond")
    assert calls[1:] == [16, 1]
    assert cache.read_bytes() != b"garbage"


def test_domains_without_training_prompts_are_skipped(tiny_base, isolated_store):
    store = Store.init(isolated_store, base=tiny_base)
    base = load_base(tiny_base)
    store.create("domain:empty")
    router = Router(store, base.model, base.tokenizer)
    with pytest.raises(AdapterNotFound, match="no domain adapter to route to.*empty: no training prompts"):
        router.route("anything")
    assert "no training prompts" in router.skipped["empty"]
    arrow = Router(store, base.model, base.tokenizer, method="arrow")
    with pytest.raises(AdapterNotFound, match="identity"):
        arrow.route("anything")


def test_arrow_prototypes_and_scores(world):
    store, trainer = world
    a, b = torch.randn(4, 64, dtype=torch.float64), torch.randn(128, 4, dtype=torch.float64)
    expected = torch.linalg.svd(b @ a).Vh[0]
    assert abs(float(top_right_singular_vector(a, b) @ expected)) == pytest.approx(1.0, abs=1e-9)
    assert top_right_singular_vector(a, torch.zeros_like(b)) is None
    router = Router(store, trainer.model, trainer.tokenizer, method="arrow")
    scores = router.scores("fever vaccine symptom")
    assert sorted(s.adapter for s in scores) == ["domain:cooking@v2", "domain:finance@v2", "domain:medicine@v2"]
    assert all(0 <= s.score <= 1 for s in scores)


def test_route_refuses_while_adapters_are_active(router, world):
    store, trainer = world
    loaded = store.load("domain:finance")
    runtime = LoraRuntime.attach(trainer.model)
    with runtime.activate([Activation(AdapterWeights.from_peft(loaded.tensors, loaded.config))]):
        with pytest.raises(Exception, match="adapters are active"):
            router.route("stock")
    assert router.route("stock bond dividend")[0].adapter == "domain:finance@v2"


def test_select_softmax():
    from persona.compose.route import RouteScore

    scores = [RouteScore("domain:a@v1", 0.5), RouteScore("domain:b@v1", 0.4), RouteScore("domain:c@v1", -1.0)]
    (only,) = select(scores, 1)
    assert (only.adapter, only.weight) == ("domain:a@v1", 1.0)
    a, b = select(scores, 2, temperature=0.1)
    assert a.weight / b.weight == pytest.approx(math.e, rel=1e-6)  # exp((0.5 - 0.4) / 0.1)


def test_cli_route(world, monkeypatch):
    store, trainer = world
    import persona.compose.route as route_module

    monkeypatch.setattr(route_module.Router, "load", classmethod(
        lambda cls, s, device=None, dtype=None, **kw: cls(s, trainer.model, trainer.tokenizer, **kw)))
    runner = CliRunner()
    group = PersonaGroup(name="persona", commands={c.name: c for c in COMMANDS})
    out = runner.invoke(group, ["route", "garlic oven pasta butter", "--top-k", "2", "--json", "--store", str(store.root)])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["choices"][0]["adapter"] == "domain:cooking@v2" and len(data["choices"]) == 2
    assert len(data["scores"]) == 3 and data["method"] == "centroid"
    first, second = data["choices"]
    assert first["adapter"] != second["adapter"] and first["weight"] > second["weight"]
    assert first["weight"] + second["weight"] == pytest.approx(1.0) and first["score"] >= second["score"]
    assert data["stack"] == f"{first['adapter']}*{format_weight(first['weight'])}+{second['adapter']}*{format_weight(second['weight'])}"
    text = runner.invoke(group, ["route", "garlic oven pasta butter", "--store", str(store.root)]).output
    assert text.startswith("route: domain:cooking@v2 (weight 1.000)") and "domain:finance@v2" in text
    assert "stack: domain:cooking@v2\n" in text  # top-1: weight 1, the plain adapter


def test_engine_serves_domain_auto_with_the_routers_choice(world):
    from persona import InvalidReference
    from persona.serving.engine import Engine
    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams

    store, trainer = world
    engine = Engine(store, base=trainer.base, max_resident=4)
    try:
        two = SamplingParams(max_new_tokens=2)
        medicine = prompts("medicine", 1, seed=7)[0]
        cooking = prompts("cooking", 1, seed=8)[0]
        results = engine.generate([
            GenerationRequest("domain:auto", prompt=medicine, params=two),
            GenerationRequest("user:alice+domain:auto", messages=({"role": "user", "content": cooking},), params=two),
        ])
        assert results[0].resolved == ("domain:medicine@v2",)
        assert results[1].resolved == ("user:alice@v2", "domain:cooking@v2")
        alone = engine.generate([GenerationRequest("domain:medicine", prompt=medicine, params=two)])[0]
        assert alone.text == results[0].text  # the routed row computes what that domain computes
        with pytest.raises(InvalidReference, match="chosen per prompt"):
            engine.resolve("domain:auto")
    finally:
        engine.close()


def test_engine_domain_auto_top_2_equals_the_weighted_stack_it_resolved_to(world, router):
    from persona.serving.engine import Engine
    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams

    store, trainer = world
    text = prompts("medicine", 1, seed=11)[0]
    expected = router.route(text, top_k=2)
    best, second = expected
    assert best.adapter == "domain:medicine@v2" and second.adapter != best.adapter  # two distinct domains, best first
    assert best.weight + second.weight == pytest.approx(1.0) and best.weight > second.weight
    params = SamplingParams(max_new_tokens=8)
    with Engine(store, base=trainer.base, max_resident=4, route_top_k=2) as engine:
        routed = engine.generate([
            GenerationRequest("domain:auto", prompt=text, params=params),
            GenerationRequest("user:alice+domain:auto*0.5", prompt=text, params=params),
        ])
        assert parse_stack("+".join(routed[0].resolved)) == tuple(StackPart(c.ref, c.weight) for c in expected)
        halved = parse_stack("+".join(routed[1].resolved))
        assert halved == (StackPart(parse_stack("user:alice@v2")[0].ref),
                          *(StackPart(c.ref, 0.5 * c.weight) for c in expected))
        assert sum(p.weight for p in halved[1:]) == pytest.approx(0.5)  # the auto part's weight times the route's
        assert routed[1].model == "user:alice+domain:auto*0.5"  # the request's model, as sent
        explicit = engine.generate([GenerationRequest("+".join(r.resolved), prompt=text, params=params) for r in routed])
        assert [e.text for e in explicit] == [r.text for r in routed]
        assert [e.resolved for e in explicit] == [r.resolved for r in routed]
        # and the second domain really takes part: the weighted pair is not the best domain alone
        ids = torch.tensor([trainer.tokenizer(text)["input_ids"]] * 2)
        pair, alone = engine.logits(ids, None, ["+".join(routed[0].resolved), best.adapter])
        assert not torch.equal(pair, alone)


def test_domain_auto_never_repeats_a_domain_the_stack_names(world):
    from persona import AdapterNotFound as NotFound
    from persona.serving.engine import Engine
    from persona.serving.requests import GenerationRequest
    from persona.serving.sampling import SamplingParams

    store, trainer = world
    text = prompts("medicine", 1, seed=12)[0]
    one = SamplingParams(max_new_tokens=1)
    with Engine(store, base=trainer.base, max_resident=4) as engine:
        assert engine.generate([GenerationRequest("domain:auto", prompt=text, params=one)])[0].resolved == ("domain:medicine@v2",)
        result = engine.generate([GenerationRequest("domain:medicine*0.5+domain:auto", prompt=text, params=one)])[0]
        assert result.resolved[0] == "domain:medicine@v2*0.5" and len(result.resolved) == 2
        assert result.resolved[1] in ("domain:finance@v2", "domain:cooking@v2")
        with pytest.raises(NotFound, match="no domain adapter left"):
            engine.generate([GenerationRequest("domain:medicine+domain:finance+domain:cooking+domain:auto", prompt=text)])


def test_route_top_k_limits(world):
    from persona.serving.engine import Engine
    from persona.serving.requests import GenerationRequest

    store, trainer = world
    for bad in (0, MAX_STACK + 1, True, 2.0):
        with pytest.raises(InvalidConfig, match="route_top_k"):
            Engine(store, base=trainer.base, route_top_k=bad)
    with pytest.raises(InvalidConfig, match="max_resident"):
        Engine(store, base=trainer.base, max_resident=2, route_top_k=3)
    with Engine(store, base=trainer.base, max_resident=4, route_top_k=3) as engine:
        too_deep = "user:alice+domain:finance+domain:auto"  # 2 named + 3 routed > max_resident 4
        from persona import InvalidReference

        with pytest.raises(InvalidReference, match="can become 5 adapters"):
            engine.check(too_deep)
        with pytest.raises(InvalidReference, match="can become 5 adapters"):
            engine.generate([GenerationRequest(too_deep, prompt="stock")])
        assert [str(p) for p in engine.check("user:alice*0.5+domain:auto")] == ["user:alice@v2*0.5"]


def test_cli_generate_routes_top_k(world, run_cli):
    store, _ = world
    text = prompts("cooking", 1, seed=13)[0]
    out = json.loads(run_cli("generate", "domain:auto*0.5", text, "--raw", "--route-top-k", "2", "--max-new-tokens", 2,
                             "--json", "--store", store.root).stdout)
    parts = parse_stack("+".join(out["resolved"]))
    assert len(parts) == 2 and parts[0].ref.id == "domain:cooking" and parts[0].weight > parts[1].weight
    assert sum(p.weight for p in parts) == pytest.approx(0.5) and out["model"] == "domain:auto*0.5"
    assert format_stack(parts) == "+".join(out["resolved"])
    assert run_cli("generate", "domain:auto", text, "--route-top-k", 0, "--store", store.root, ok=False).exit_code == 2
