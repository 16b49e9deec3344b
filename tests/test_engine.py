"""The serving engine on the tiny base: per-row equivalence with PEFT in mixed batches, residency,
version pickup, generation (greedy, sampling, stop strings, streaming) and the batching worker."""

import threading
import time

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from persona.store import NewVersion
from persona import (
    AdapterNotFound,
    IntegrityError,
    InvalidConfig,
    InvalidReference,
    LoraSettings,
    StackPart,
    Store,
    VersionNotFound,
)
from persona.base import load_base
from persona.serving.detokenize import TextStream
from persona.serving.engine import Engine
from persona.serving.requests import GenerationRequest
from persona.serving.sampling import SamplingParams
from persona.serving.scheduler import EngineClosed

IDS = torch.tensor([[5, 17, 300, 42, 9, 11, 7, 8]] * 6) + torch.arange(6).view(-1, 1) * 13
PROMPTS = ("Hello there", "The quick brown fox jumps over", "1 2 3", "Once upon a time, in a land far away,")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from more threads, and on a busy machine OpenMP spinning makes them 4x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tiny_base):
    return load_base(tiny_base)  # shared: engines wrap it once and clear their routes after each batch


@pytest.fixture
def store(tiny_base, isolated_store):
    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:a", LoraSettings(init="random", seed=1, rank=4))
    store.create("user:b", LoraSettings(init="random", seed=2, rank=8, alpha=8, target_modules=("q_proj", "v_proj")))
    store.create("domain:c", LoraSettings(init="random", seed=3, rank=6))
    store.create("user:d", LoraSettings(init="random", seed=4, rank=4))
    return store


@pytest.fixture
def engine(store, base):
    with Engine(store, base=base) as engine:
        yield engine


def greedy(model, prompt="Hello there", n=12, **params):
    return GenerationRequest(model, prompt=prompt, params=SamplingParams(max_new_tokens=n, **params))


def peft_model(tiny_base, store, refs):
    """A PEFT model with each pinned ref loaded as an adapter named after it."""
    model = None
    for ref in refs:
        folder = str(store._adapter_dir(ref) / f"v{ref.version:04d}")
        name = str(ref).replace(":", "_").replace("@", "_")
        if model is None:
            base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
            model = PeftModel.from_pretrained(base, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
    return model.eval()


def peft_logits(model, names, ids=IDS):
    model.base_model.set_adapter([n.replace(":", "_").replace("@", "_") for n in names])
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------- equivalence
def test_mixed_batch_rows_match_peft_each_alone(engine, store, tiny_base):
    models = ["user:a", "user:b", engine.base_name, "user:a+user:b", "domain:c", "user:d"]
    ours = engine.logits(IDS, torch.ones_like(IDS), models)
    pinned = [store.resolve(r) for r in ("user:a", "user:b", "domain:c", "user:d")]
    peft = peft_model(tiny_base, store, pinned)
    a, b, c, d = (str(p) for p in pinned)
    expected = {0: [a], 1: [b], 3: [a, b], 4: [c], 5: [d]}
    for row, names in expected.items():
        theirs = peft_logits(peft, names)
        assert (ours[row] - theirs[row]).abs().max() < 1e-4, (row, names)
    plain = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        assert torch.equal(ours[2], plain(IDS).logits[2])  # the no-adapter row is the base, bit for bit
    assert (ours[0] - ours[3]).abs().max() > 1e-2 and (ours[0] - ours[5]).abs().max() > 1e-2  # mix-ups would show


def peft_weighted_logits(model, weights, ids=IDS):
    """PEFT's logits with the named adapters active, each LoRA scaling multiplied by its weight."""
    from peft.tuners.lora import LoraLayer

    names = {n.replace(":", "_").replace("@", "_"): w for n, w in weights.items()}
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [dict(m.scaling) for m in layers]
    try:
        for layer in layers:
            for name, w in names.items():
                if name in layer.scaling:
                    layer.scaling[name] *= w
        return peft_logits(model, list(weights), ids)
    finally:
        for layer, scaling in zip(layers, saved, strict=True):
            layer.scaling.clear()
            layer.scaling.update(scaling)


def test_weighted_parts_match_peft_with_scaled_lora_alongside_unweighted_rows(engine, store, tiny_base):
    models = ["user:a", "domain:c*0.5", "user:a+domain:c*0.5", engine.base_name, "user:a*2+user:b*0.25", "domain:c"]
    ours = engine.logits(IDS, torch.ones_like(IDS), models)
    a, b, c = (store.resolve(r) for r in ("user:a", "user:b", "domain:c"))
    peft = peft_model(tiny_base, store, [a, b, c])
    expected = {0: {a: 1.0}, 1: {c: 0.5}, 2: {a: 1.0, c: 0.5}, 4: {a: 2.0, b: 0.25}, 5: {c: 1.0}}
    for row, weights in expected.items():
        theirs = peft_weighted_logits(peft, {str(r): w for r, w in weights.items()})
        assert (ours[row] - theirs[row]).abs().max() < 1e-4, (row, models[row])
    # the weight is applied, not ignored: half of domain:c is neither all of it nor none
    assert (ours[1] - ours[5]).abs().max() > 1e-2
    unweighted = engine.logits(IDS, torch.ones_like(IDS), ["user:a", "domain:c", "user:a+domain:c", engine.base_name,
                                                            "user:a+user:b", "domain:c"])
    for row in (0, 3, 5):  # unweighted rows are untouched by their neighbours' weights, bit for bit
        assert torch.equal(ours[row], unweighted[row])
    assert {k.split("@")[0] for k in engine.stats().resident} == {"user:a", "user:b", "domain:c"}  # one slot per adapter


def test_weight_one_is_exactly_unweighted(engine):
    plain = engine.logits(IDS[:3], None, ["user:a", "user:a+domain:c", "domain:c+user:b"])
    for models in (["user:a*1", "user:a*1.0+domain:c", "domain:c*1+user:b*1.000"],
                   ["user:a*1", "user:a+domain:c*1", "domain:c+user:b"]):
        assert torch.equal(engine.logits(IDS[:3], None, models), plain)
    assert engine.resolve("user:a*1.0+domain:c") == engine.resolve("user:a+domain:c")
    assert engine.generate([greedy("user:a*1", n=6)])[0].text == engine.generate([greedy("user:a", n=6)])[0].text


def test_one_adapter_at_several_weights_in_one_batch(engine, store, tiny_base):
    """Every row reads the same slot (the no-gather path) at its own weight."""
    models = ["domain:c*0.5", "domain:c", "domain:c*2"]
    ours = engine.logits(IDS[:3], None, models)
    c = store.resolve("domain:c")
    peft = peft_model(tiny_base, store, [c])
    for row, w in enumerate((0.5, 1.0, 2.0)):
        assert (ours[row] - peft_weighted_logits(peft, {str(c): w}, IDS[:3])[row]).abs().max() < 1e-4, models[row]


def test_weighted_generation_resolves_and_batches_like_alone(engine):
    models = ["user:a+domain:c*0.5", "user:a+domain:c", "domain:c*0.3", "user:b*1.5"]
    requests = [greedy(m, prompt=p, n=10) for m, p in zip(models, PROMPTS, strict=True)]
    together = engine.generate(requests)
    assert [r.resolved for r in together] == [("user:a@v1", "domain:c@v1*0.5"), ("user:a@v1", "domain:c@v1"),
                                              ("domain:c@v1*0.3",), ("user:b@v1*1.5",)]
    assert together[0].model == "user:a+domain:c*0.5"
    for request, result in zip(requests, together, strict=True):
        assert engine.generate([request])[0] == result
    with pytest.raises(InvalidReference, match="plain decimal"):
        engine.generate([greedy("user:a*-1")])


def test_left_padded_rows_match_unpadded(engine):
    short = torch.tensor([[11, 12, 13]])
    batch = torch.tensor([[0, 0, 0, 0, 0, 11, 12, 13], [5, 17, 300, 42, 9, 11, 7, 8]])
    mask = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1], [1] * 8])
    padded = engine.logits(batch, mask, ["user:a", "domain:c"])
    alone = engine.logits(short, None, ["user:a"])
    assert (padded[0, -3:] - alone[0]).abs().max() < 1e-4


def test_uniform_batch_takes_the_no_gather_path_and_agrees(engine):
    mixed = engine.logits(IDS[:2], None, ["user:a", "domain:c"])
    uniform = engine.logits(IDS[:2], None, ["user:a", "user:a"])
    assert (mixed[0] - uniform[0]).abs().max() < 1e-5


# ---------------------------------------------------------------------------- residency
def test_eviction_and_reload_give_unchanged_results(store, base):
    models = ["user:a", "user:b", "domain:c", "user:d"]
    with Engine(store, base=base) as roomy:
        reference = roomy.logits(IDS[:4], None, models)
    with Engine(store, base=base, max_resident=2, cpu_cache=8) as engine:
        mixed = engine.logits(IDS[:4], None, models)  # 4 adapters, 2 slots: split into groups
        assert torch.equal(mixed, reference)
        for _ in range(2):
            for i, m in enumerate(models):
                assert torch.equal(engine.logits(IDS[i : i + 1], None, [m])[0], reference[i])
        stats = engine.stats()
        assert len(stats.resident) == 2 and stats.evictions >= 6
        assert stats.loads == 4 and stats.cpu_hits >= 6  # evicted adapters came back from the CPU tier
        assert stats.slot_bytes == engine._cache.bank.nbytes
        capacity = engine._cache.bank.capacity
        assert capacity == 3  # max_resident + the zero slot, however many loads
    with Engine(store, base=base, max_resident=2, cpu_cache=0) as engine:
        for _ in range(2):
            for i, m in enumerate(models):
                assert torch.equal(engine.logits(IDS[i : i + 1], None, [m])[0], reference[i])
        assert engine.stats().loads == 8 and engine.stats().cpu_hits == 0  # no CPU tier: back to the store


def test_slot_memory_grows_with_residents_not_max_resident(store, base):
    with Engine(store, base=base, max_resident=16) as engine:
        engine.preload("user:a")
        one = engine.stats().slot_bytes
        engine.preload("user:d")  # same shape as user:a
        assert engine.stats().slot_bytes == one * 3 // 2  # (N + 1) slots for N residents
        assert engine._cache.bank.capacity == 3


# ---------------------------------------------------------------------------- versions
def test_new_current_version_is_picked_up_and_pins_hold(engine, store, tiny_base):
    v1 = engine.logits(IDS[:1], None, ["user:a"])
    loaded = store.load("user:a")
    gen = torch.Generator().manual_seed(99)
    new = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in loaded.tensors.items()}
    store.publish_version("user:a", NewVersion(new, loaded.config, parent=1))
    assert engine.resolve("user:a") == (StackPart(store.resolve("user:a@v2")),)
    v2 = engine.logits(IDS[:1], None, ["user:a"])
    assert (v2 - v1).abs().max() > 1e-2
    peft = peft_model(tiny_base, store, [store.resolve("user:a")])
    assert (v2[0] - peft_logits(peft, ["user:a@v2"])[0]).abs().max() < 1e-4
    assert torch.equal(engine.logits(IDS[:1], None, ["user:a@v1"]), v1)  # a pinned request still gets v1
    result = engine.generate([greedy("user:a", n=3)])[0]
    assert result.resolved == ("user:a@v2",)
    store.rollback("user:a", 1)
    assert torch.equal(engine.logits(IDS[:1], None, ["user:a"]), v1)
    assert engine.generate([greedy("user:a", n=3)])[0].resolved == ("user:a@v1",)


def test_unknown_adapter_version_or_reference_raises_never_falls_back(engine):
    for model, error in (
        ("user:nobody", AdapterNotFound),
        ("user:a@v9", VersionNotFound),
        ("user:a@stable", VersionNotFound),
        ("nonsense", InvalidReference),
        ("user:a+user:a", InvalidReference),
    ):
        with pytest.raises(error):
            engine.generate([greedy("user:a"), greedy(model)])
        with pytest.raises(error):
            engine.submit(greedy(model))
        with pytest.raises(error):
            engine.logits(IDS[:1], None, [model])
    # domain:auto with no trained domain to route to: an error, not the base
    with pytest.raises(AdapterNotFound, match="no domain adapter to route to"):
        engine.generate([greedy("domain:auto")])
    with pytest.raises(InvalidReference, match="chosen per prompt"):
        engine.logits(IDS[:1], None, ["domain:auto"])  # logits have no prompt text to route on
    assert engine.stats().requests == 0 and engine.stats().batches == 0  # nothing ran


# ---------------------------------------------------------------------------- generation
def test_greedy_row_in_mixed_batch_equals_generating_it_alone(engine):
    models = ["user:a", "user:b", engine.base_name, "user:a+domain:c"]
    requests = [greedy(m, prompt=p, n=12) for m, p in zip(models, PROMPTS, strict=False)]
    together = engine.generate(requests)
    for request, result in zip(requests, together, strict=False):
        alone = engine.generate([request])[0]
        assert alone == result
        assert result.completion_tokens == 12 and result.finish_reason == "length"
    assert len({r.text for r in together}) == 4
    assert engine.stats().largest_batch == 4


def test_base_rows_generate_what_transformers_generate_does(engine, base, tiny_base):
    tok = base.tokenizer
    ours = engine.generate([greedy(engine.base_name, prompt=p, n=8) for p in PROMPTS[:2]])
    plain = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tok.padding_side = "left"
    batch = tok(list(PROMPTS[:2]), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = plain.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    for i, result in enumerate(ours):
        theirs = tok.decode(out[i, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        assert result.text == theirs


def test_seed_reproduces_sampling_and_top_p_narrows_it(engine):
    def sample(seed, **kw):
        params = dict(temperature=1.0, seed=seed, **kw)
        return engine.generate([greedy("user:a", n=16, **params), greedy("domain:c", n=16, **params)])

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first[0].text != other[0].text
    assert first[0].text != engine.generate([greedy("user:a", n=16)])[0].text  # really sampled
    # top_p so small that only the most likely token survives: sampling becomes greedy
    assert sample(7, top_p=1e-6)[0].text == engine.generate([greedy("user:a", n=16)])[0].text


def test_stop_string_ends_a_row_and_is_never_streamed(engine):
    full = engine.generate([greedy("user:a", n=16)])[0].text
    stop = full[6:9]
    cut = full[: full.index(stop)]
    request = greedy("user:a", n=16, stop=("never-there", stop))
    result = engine.generate([request, greedy("user:d", n=16)])[0]
    assert (result.text, result.finish_reason) == (cut, "stop")
    assert result.completion_tokens < 16
    deltas = list(engine.stream(request))
    assert "".join(deltas) == cut and all(stop not in d for d in deltas)


def test_eos_ends_a_row_with_stop(engine, store, base):
    """Every token counts as end-of-sequence here, so the first one ends the row, with no text."""
    with Engine(store, base=base) as eos_engine:
        eos_engine.eos_token_ids = frozenset(range(len(base.tokenizer)))
        result = eos_engine.generate([greedy("user:a", n=10)])[0]
    assert (result.text, result.finish_reason, result.completion_tokens) == ("", "stop", 1)


def test_streaming_deltas_join_to_the_full_text(engine):
    request = greedy("user:b", prompt=PROMPTS[1], n=20)
    deltas = list(engine.stream(request))
    assert len(deltas) > 3
    assert "".join(deltas) == engine.generate([request])[0].text


def test_text_stream_never_splits_multibyte_characters(tokenizer):
    text = "héllo 日本 world ✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, [1, 2, 3], stop=())
    deltas = [stream.add(t) for t in ids] + [stream.finish()]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    held = TextStream(tokenizer, [], stop=("日本 w",))
    out = "".join(held.add(t) for t in ids) + held.finish()
    assert out == "héllo " and held.stopped


def test_chat_messages_use_the_chat_template(engine, base):
    messages = ({"role": "user", "content": "What is 2+2?"},)
    request = GenerationRequest("user:a", messages=messages, params=SamplingParams(max_new_tokens=4))
    result = engine.generate([request])[0]
    template = base.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    assert result.prompt_tokens == len(base.tokenizer(template, add_special_tokens=False)["input_ids"])
    assert template.endswith("<|im_start|>assistant\n")


def test_requests_and_params_are_validated(engine):
    bad_params = (
        {"max_new_tokens": 0}, {"max_new_tokens": 5000}, {"max_new_tokens": True}, {"temperature": -1},
        {"top_p": 0}, {"stop": ("",)}, {"seed": -1},
    )
    for bad in bad_params:
        with pytest.raises(InvalidConfig):
            SamplingParams(**bad)
    with pytest.raises(InvalidConfig, match="unknown sampling"):
        SamplingParams.from_dict({"max_tokens": 5})
    with pytest.raises(InvalidConfig):
        GenerationRequest("user:a", prompt="x", messages=({"role": "user", "content": "x"},))
    with pytest.raises(InvalidConfig):
        GenerationRequest("user:a", messages=({"role": "wizard", "content": "x"},))
    with pytest.raises(InvalidConfig, match="context"):
        engine.generate([greedy("user:a", prompt="word " * 600)])
    long = engine.generate([greedy("user:a", prompt="word " * 505, n=100)])[0]  # the context (512) caps the budget
    assert long.prompt_tokens + long.completion_tokens == 512 and long.finish_reason == "length"


# ---------------------------------------------------------------------------- the batching worker
def test_submit_from_threads_runs_one_mixed_batch_with_correct_answers(store, base):
    models = ["user:a", "user:b", "domain:c", "user:a+user:d"]
    requests = [greedy(m, prompt=p, n=10) for m, p in zip(models, PROMPTS, strict=False)]
    with Engine(store, base=base, batch_wait_s=0.5) as engine:
        expected = [engine.generate([r])[0] for r in requests]
        handles: list = [None] * 4
        barrier = threading.Barrier(4)

        def client(i):
            barrier.wait()
            handles[i] = engine.submit(requests[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [h.result(timeout=60) for h in handles] == expected
        assert engine.stats().largest_batch == 4  # the worker ran them as one batch


def test_a_failing_request_fails_alone_and_the_worker_lives_on(store, engine):
    weights = store._adapter_dir("domain:c") / "v0001" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    engine._worker.wait_s = 0.3
    bad, good = engine.submit(greedy("domain:c")), engine.submit(greedy("user:a"))
    with pytest.raises(IntegrityError):
        bad.result(timeout=60)
    assert good.result(timeout=60).completion_tokens == 12
    with pytest.raises(IntegrityError):
        list(engine.stream(greedy("domain:c")))
    assert engine.submit(greedy("user:b")).result(timeout=60).finish_reason == "length"
    assert engine.stats().failed == 2


def test_leaving_a_stream_early_cancels_it_and_close_refuses_more(engine):
    stream = engine.stream(greedy("user:a", n=200))
    next(stream)
    stream.close()  # the consumer went away: the row stops at its next token
    assert engine.submit(greedy("user:d", n=2)).result(timeout=60).completion_tokens == 2
    # The worker counts a job just after its handle finishes: wait for the count, do not race it.
    deadline = time.monotonic() + 30
    while (stats := engine.stats()).requests < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (stats.failed, stats.requests, stats.tokens_generated) == (1, 1, 2)
    started = time.monotonic()
    engine.close()
    assert time.monotonic() - started < 30
    with pytest.raises(EngineClosed):
        engine.submit(greedy("user:a"))


def test_engine_serves_a_recreated_adapter_not_its_deleted_namesake(store, engine):
    """Regression: the engine caches by ``kind:name@vN``; a deleted and re-created adapter used to
    get v1 again, so a running engine served the deleted adapter's weights under the new name."""
    old = engine.logits(IDS[:1], models=["user:a"])
    engine.preload("user:a")  # resident in a slot and in the CPU tier
    store.delete("user:a")
    store.create("user:a", LoraSettings(init="random", seed=99, rank=4))
    assert engine.resolve("user:a")[0].ref.version == 2
    new = engine.logits(IDS[:1], models=["user:a"])
    with Engine(store, base=engine.base) as fresh:
        expected = fresh.logits(IDS[:1], models=["user:a"])
    assert not torch.allclose(new, old, atol=1e-3)
    torch.testing.assert_close(new, expected, atol=1e-5, rtol=0)
