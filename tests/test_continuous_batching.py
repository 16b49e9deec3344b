"""Continuous batching (issue 17): rows join and leave the running batch at every step, each row exact.

The engine's step function is driven directly here (no worker thread), so when rows join is decided
by the test: a row that joins mid-decode must compute what its adapter alone computes (PEFT, 1e-4 on
every step's logits) and generate what it generates alone. The admission policy is tested on its own.
"""

import threading
import time
from collections import deque
from concurrent.futures import CancelledError
from dataclasses import replace

import pytest
import torch

import persona.serving.engine as engine_module
from persona import InvalidConfig, LoraSettings, Store
from persona.errors import CapacityExceeded
from persona.base import load_base
from persona.refs import StackPart
from persona.serving.constrain import ResponseFormat
from persona.serving.engine import Engine
from persona.serving.requests import GenerationRequest, Handle, Job
from persona.serving.scheduler import AdmissionPolicy, Occupancy

from test_engine import PROMPTS, greedy, peft_model  # noqa: F401 - shared fixtures' helpers

LONG = "In the beginning the stores were small, and every adapter had its own folder and its own version"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tiny_base):
    return load_base(tiny_base)


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


def run_steps(engine, schedule, limit=200):
    """Drive the engine's step function: ``schedule[i]`` (jobs) joins at step i; then step until empty."""
    steps = 0
    while True:
        joining = schedule[steps] if steps < len(schedule) else []
        occupancy = engine._step(joining)
        steps += 1
        if steps >= len(schedule) and occupancy.rows == 0:
            return steps
        assert steps < limit


class Recorder:
    """Every step's raw logits and chosen token, per job (wrapping ``next_tokens`` where the engine calls it)."""

    def __init__(self, monkeypatch):
        self.logits: dict[int, list[torch.Tensor]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.batch_sizes: list[int] = []
        real = engine_module.next_tokens

        def spy(logits, rows, token_bytes):
            raw = logits.clone()
            tokens, entries = real(logits, rows, token_bytes)
            self.batch_sizes.append(len(rows))
            for i, row in enumerate(rows):
                self.logits.setdefault(id(row.job), []).append(raw[i])
                self.tokens.setdefault(id(row.job), []).append(int(tokens[i]))
            return tokens, entries

        monkeypatch.setattr(engine_module, "next_tokens", spy)


def test_rows_joining_mid_decode_match_peft_each_alone(engine, store, tiny_base, monkeypatch):
    """Rows join a running batch at different steps (shorter and longer than its cache), others leave
    early, a stack and a base row among them: every step's logits of every row equal PEFT's for that
    adapter alone on the same tokens, within 1e-4."""
    recorder = Recorder(monkeypatch)
    specs = [("user:a", PROMPTS[0], 14), ("user:b", LONG, 6), ("domain:c", PROMPTS[2], 9),
             ("user:a+domain:c", PROMPTS[1], 8), (engine.base_name, PROMPTS[3], 5), ("user:d", "Hi", 7)]
    jobs = [engine._admit(greedy(m, prompt=p, n=n)) for m, p, n in specs]
    # a alone for 3 steps; b (longer than a's cache) and c (shorter) join together; the stack joins
    # after b has left; the base and d join at the last steps of a.
    schedule = [[jobs[0]], [], [], [jobs[1], jobs[2]], [], [], [], [], [], [jobs[3]], [jobs[4], jobs[5]]]
    run_steps(engine, schedule)
    assert max(recorder.batch_sizes) >= 3  # rows really ran together
    pinned = {str(p.ref): p.ref for j in jobs for p in j.parts}
    peft = peft_model(tiny_base, store, list(pinned.values()))
    for job, (model, _, n) in zip(jobs, specs, strict=True):
        result = job.handle.result(timeout=0)
        assert result.completion_tokens == n
        generated = recorder.tokens[id(job)]
        ids = torch.tensor([job.prompt_ids + generated[:-1]])
        names = [str(p.ref).replace(":", "_").replace("@", "_") for p in job.parts]
        with torch.no_grad():
            if names:
                peft.base_model.set_adapter(names)
                theirs = peft(ids).logits[0]
            else:
                with peft.disable_adapter():
                    theirs = peft(ids).logits[0]
        ours = torch.stack(recorder.logits[id(job)])
        start = len(job.prompt_ids) - 1
        assert (ours - theirs[start : start + n]).abs().max() < 1e-4, model
    assert engine._cache.pinned == set()  # every row that left unpinned its adapters


def test_joining_rows_generate_what_they_generate_alone(engine, store, base):
    """Greedy, seeded sampling, stop strings, logit_bias, logprobs and a JSON grammar keep working for
    rows that join mid-decode: each result equals the request run alone (and submitted all at once to
    another engine's worker), a seeded sampled row repeats."""
    fmt = ResponseFormat.from_schema({"type": "object", "properties": {"n": {"type": "integer"}}})
    requests = [
        greedy("user:a", prompt=LONG, n=20),
        greedy("user:b", prompt=PROMPTS[1], n=12, temperature=0.9, seed=5, top_p=0.9),
        greedy("domain:c", prompt=PROMPTS[2], n=12, logprobs=2, logit_bias=((42, 5.0),)),
        greedy("user:d", prompt=PROMPTS[0], n=16, response_format=fmt),
        greedy("user:a+user:b", prompt=PROMPTS[3], n=10),
    ]
    alone = [engine.generate([r])[0] for r in requests]
    stop = alone[0].text[4:7]
    requests.append(greedy("user:a", prompt=LONG, n=20, stop=(stop,)))
    alone.append(engine.generate([requests[-1]])[0])
    assert alone[-1].finish_reason == "stop" and alone[-1].completion_tokens < 20

    def joined():
        jobs = [engine._admit(r) for r in requests]
        run_steps(engine, [[jobs[0]], [jobs[1]], [], [jobs[2], jobs[3]], [jobs[4]], [], [jobs[5]]])
        return [j.handle.result(timeout=0) for j in jobs]

    # A sampled row draws from its own seeded generator, so it repeats under the same schedule; it is
    # left out of the comparison with other batchings, where its logits differ in the last bits and the
    # random tiny base's near-uniform distribution lets that move a draw.
    first, again = joined(), joined()
    assert first[1] == again[1] and first[1].completion_tokens == 12
    def unsampled(results):
        return results[:1] + results[2:]

    assert_same(unsampled(first), unsampled(alone))
    assert alone[2].logprobs and alone[3].text.startswith("{")
    with Engine(store, base=base) as other:
        results = [h.result(timeout=60) for h in [other.submit(r) for r in requests]]
    assert_same(unsampled(results), unsampled(alone))


def assert_same(results, expected):
    """Equal results; logprobs (floats of differently padded batches) within 1e-4."""
    assert len(results) == len(expected)
    for ours, theirs in zip(results, expected, strict=True):
        assert replace(ours, logprobs=None) == replace(theirs, logprobs=None), ours.model
        assert (ours.logprobs is None) == (theirs.logprobs is None)
        for a, b in zip(ours.logprobs or (), theirs.logprobs or (), strict=True):
            assert (a.token_id, [t.bytes for t in a.top]) == (b.token_id, [t.bytes for t in b.top])
            assert abs(a.logprob - b.logprob) < 1e-4


def test_submitted_requests_through_the_worker_equal_each_run_alone(store, base):
    """Requests submitted while others decode join the running batch; results as each one run alone."""
    requests = [greedy(m, prompt=p, n=n) for m, p, n in (
        ("user:a", LONG, 24), ("user:b", PROMPTS[0], 8), ("domain:c", PROMPTS[1], 12), ("user:d", PROMPTS[3], 6))]
    with Engine(store, base=base, batch_wait_s=0) as engine:
        expected = [engine.generate([r])[0] for r in requests]
        first = engine.submit(requests[0])
        stream = first.stream()
        next(stream)  # the first row is decoding: the others join it mid-batch
        handles = [first] + [engine.submit(r) for r in requests[1:]]
        list(stream)
        assert [h.result(timeout=60) for h in handles] == expected
        deadline = time.monotonic() + 30  # counted just after the handles finish: wait for the count
        while (stats := engine.stats()).requests < 8 and time.monotonic() < deadline:  # 4 alone, 4 submitted
            time.sleep(0.05)
        assert stats.requests == 8 and stats.tokens_generated == 2 * sum(r.completion_tokens for r in expected)


def test_a_joining_step_prefills_without_decoding_the_running_rows(engine):
    """Prefill first: an iteration with rows to join prefills them (their first token is chosen at
    once) and leaves the running rows' decode to the next iteration, which finds the new rows in."""
    a, b = engine._admit(greedy("user:a", n=30)), engine._admit(greedy("user:b", n=30))
    engine._step([a])
    tokens = lambda: [row.tokens for row in engine._running.rows]  # noqa: E731
    assert tokens() == [1]  # a's first token, from its prefill
    engine._step([])
    assert tokens() == [2]
    engine._step([b])
    assert tokens() == [2, 1]  # b joined with its first token; a did not step
    engine._step([])
    assert tokens() == [3, 2]
    times = engine.stats().times
    assert (times.prefill_steps, times.decode_steps, times.decode_rows) == (2, 2, 3)
    run_steps(engine, [])


def test_a_request_arriving_during_a_prefill_gets_its_first_token_before_the_next_decode_step(store, base):
    """Event order, not wall time: a decodes; b's prefill is held in its forward while c arrives; c's
    prefill and its first token's emission come before the next decode step of the running rows.
    (Before prefill-first, an iteration was prefill + decode, so c waited for a and b's decode.)"""
    events, hold, held = [], threading.Event(), threading.Event()
    with Engine(store, base=base, batch_wait_s=0) as engine:
        real = engine._forward

        def forward(ids, mask, pos, *, cache, last_only):
            kind = "decode" if ids.shape[1] == 1 else "prefill"
            if kind == "prefill" and hold.is_set() and not held.is_set():
                held.set()  # b's prefill: c is submitted while it runs
                assert hold.wait(30)
                time.sleep(0.2)  # let c reach the worker's queue
            out = real(ids, mask, pos, cache=cache, last_only=last_only)
            events.append((kind, ids.shape[0]))
            return out

        engine._forward = forward
        a = engine.submit(greedy("user:a", prompt=PROMPTS[1], n=40))
        deadline = time.monotonic() + 30
        while ("decode", 1) not in events and time.monotonic() < deadline:  # a is decoding
            time.sleep(0.001)
        hold.set()
        engine.submit(greedy("user:b", prompt=PROMPTS[0], n=4))
        assert held.wait(30)
        c = engine.submit(greedy("user:d", prompt=PROMPTS[3], n=4))
        emit = c.emit
        c.emit = lambda *args: (events.append(("c emits", 0)), emit(*args))[1]
        assert c.result(timeout=60).completion_tokens == 4
        a.cancel()
    b_prefill = events.index(("prefill", 1), events.index(("decode", 1)))  # the first prefill after a decoded
    after = events[b_prefill + 1 :]
    assert after[0] == ("prefill", 1)  # c's, straight after b's
    assert after.index(("c emits", 0)) < next(i for i, e in enumerate(after) if e[0] == "decode")


def test_serving_times_account_for_each_requests_way_to_its_first_token(store, base):
    """stats().times: every submitted request's first token is counted, its phases are in order and
    add up to its time to first token; decode and prefill iterations are counted."""
    with Engine(store, base=base, batch_wait_s=0) as engine:
        handles = [engine.submit(greedy(m, prompt=p, n=6)) for m, p in
                   (("user:a", LONG), ("user:b", PROMPTS[0]), ("domain:c", PROMPTS[1]))]
        longest = max(handle.result(timeout=60).completion_tokens for handle in handles)
    # read after close: a result is handed over inside its last step, whose times are added when it ends
    times = engine.stats().times
    # the first token comes from the prefill, each further one from a decode step
    assert times.first_tokens == 3 and times.prefill_steps >= 1 and times.decode_steps >= longest - 1 >= 1
    assert times.decode_rows >= times.decode_steps and times.decode_s > 0 and times.prefill_s > 0
    assert min(times.queue_s, times.admission_s, times.setup_s, times.first_token_s, times.join_s) >= 0
    assert engine.stats().to_dict()["times"]["first_tokens"] == 3


def test_job_times_are_in_order(engine):
    job = engine._admit(greedy("user:a", n=3))
    job.times.submitted = job.times.taken = job.times.admitted = time.perf_counter()
    run_steps(engine, [[job]])
    t = job.times
    assert t.submitted <= t.taken <= t.admitted <= t.prefill_start < t.prefill_end <= t.first_token
    assert engine.stats().times.first_tokens == 1


def test_chunked_prefill_gives_the_logits_and_outputs_of_an_unchunked_one(store, base, monkeypatch):
    """max_batch_tokens=5: the long prompt is prefilled in chunks of 5 while another row decodes
    between them; every step's logits equal the unchunked run's within 1e-4, the results are equal,
    and both equal each request run alone."""
    requests = [greedy("user:a", prompt=PROMPTS[1], n=10), greedy("user:b", prompt=LONG, n=8)]

    def run(max_batch_tokens):
        recorder = Recorder(monkeypatch)
        with Engine(store, base=base, max_batch_tokens=max_batch_tokens) as engine:
            jobs = [engine._admit(r) for r in requests]
            run_steps(engine, [[jobs[0]], [], [jobs[1]]])
            times = engine.stats().times
            alone = [engine.generate([r])[0] for r in requests]
        return [recorder.logits[id(j)] for j in jobs], [j.handle.result(timeout=0) for j in jobs], times, alone

    chunked_logits, chunked, times, alone = run(5)
    whole_logits, whole, _, _ = run(2048)
    assert len(base.tokenizer(LONG)["input_ids"]) > 10  # three chunks or more
    assert times.prefill_steps >= 4  # a's prefill and b's chunks
    for ours, theirs in zip(chunked_logits, whole_logits, strict=True):
        assert len(ours) == len(theirs)
        assert (torch.stack(ours) - torch.stack(theirs)).abs().max() < 1e-4
    assert chunked == whole == alone


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps_and_not_starved(store, base):
    """A prompt over the token budget joins (alone) and runs a budget's worth per iteration, the
    running row decoding between its chunks; requests queued behind it join after it (FIFO), and
    every one equals its result alone."""
    events = []
    with Engine(store, base=base, batch_wait_s=0, max_batch_tokens=6) as engine:
        requests = [greedy("user:a", prompt=PROMPTS[1], n=30), greedy("user:b", prompt=LONG, n=5),
                    greedy("user:d", prompt=PROMPTS[0], n=5), greedy("domain:c", prompt=PROMPTS[2], n=5)]
        alone = [engine.generate([r])[0] for r in requests]
        real = engine._forward

        def forward(ids, mask, pos, *, cache, last_only):
            events.append(("decode" if ids.shape[1] == 1 else "prefill", ids.shape[0], ids.shape[1]))
            return real(ids, mask, pos, cache=cache, last_only=last_only)

        engine._forward = forward
        first = engine.submit(requests[0])
        stream = first.stream()
        next(stream)
        start = len(events)
        handles = [first] + [engine.submit(r) for r in requests[1:]]
        results = [h.result(timeout=60) for h in handles]
    assert results == alone
    chunks = [i for i, e in enumerate(events[start:]) if e[0] == "prefill" and e[2] == 6 and e[1] == 1]
    assert len(chunks) >= 2  # the long prompt ran in chunks of the budget ...
    between = events[start:][chunks[0] : chunks[1]]
    assert any(e[0] == "decode" for e in between)  # ... and the running row decoded between them
    assert all(e[2] <= 6 for e in events[start:])  # no prompt ran more tokens at once than the budget


def test_a_long_prompt_cancelled_between_its_chunks_is_dropped_and_unpins_its_adapter(store, base):
    with Engine(store, base=base, max_batch_tokens=4) as engine:
        job = engine._admit(greedy("user:b", prompt=LONG, n=5))
        occupancy = engine._step([job])
        assert occupancy.prefilling and occupancy.busy and occupancy.rows == 0
        assert engine._cache.pinned == {"user:b@v1"}  # its slot stays while its chunks run
        job.handle.cancel()
        occupancy = engine._step([])
        assert not occupancy.busy and engine._running.partial is None and engine._cache.pinned == set()
        assert isinstance(job.handle.error, CancelledError)


def test_a_cancelled_row_leaves_the_running_batch_at_the_next_step(engine):
    stay, leave = engine._admit(greedy("user:a", n=30)), engine._admit(greedy("user:b", n=30))
    assert engine._step([stay, leave]).rows == 2
    assert engine._cache.pinned == {"user:a@v1", "user:b@v1"}
    leave.handle.cancel()
    occupancy = engine._step([])
    assert occupancy == Occupancy(1, frozenset({"user:a@v1"}))
    assert isinstance(leave.handle.error, CancelledError)
    assert engine._cache.pinned == {"user:a@v1"}  # its slot may be evicted again
    run_steps(engine, [])
    assert stay.handle.result(timeout=0).completion_tokens == 30
    assert engine.stats().failed == 1 and engine.stats().requests == 1


def test_a_running_rows_adapter_is_never_evicted_between_steps(store, base):
    """max_resident=2: while user:a's row decodes, other work loads two more adapters between its steps;
    a's slot stays (pinned) and its row ends exactly as alone."""
    with Engine(store, base=base, max_resident=2) as engine:
        expected = engine.generate([greedy("user:a", n=12)])[0]
        job = engine._admit(greedy("user:a", n=12))
        engine._step([job])
        ids = torch.tensor([[5, 17, 300, 42]])
        engine.logits(ids, None, ["user:b"])
        engine._step([])
        engine.logits(ids, None, ["domain:c"])  # evicts b (least recently used but for the pinned a)
        assert "user:a@v1" in engine.stats().resident and "user:b@v1" not in engine.stats().resident
        with pytest.raises(CapacityExceeded):
            engine.logits(torch.cat([ids, ids]), None, ["user:b", "domain:c"])  # would need a's slot
        run_steps(engine, [])
        assert job.handle.result(timeout=0) == expected


def test_the_static_scheduler_is_gone_and_the_token_budget_is_validated(store, base):
    with pytest.raises(TypeError, match="scheduler"):
        Engine(store, base=base, scheduler="static")
    with pytest.raises(InvalidConfig, match="max_batch_tokens"):
        Engine(store, base=base, max_batch_tokens=0)


# ---------------------------------------------------------------------------- admission
def job(tokens: int, *adapters: str) -> Job:
    request = GenerationRequest("user:x", prompt="x")
    parts = tuple(StackPart.parse(a) for a in adapters)
    return Job(request, parts, [1] * tokens, 4, Handle(request, ()))


def sizes(jobs) -> list[int]:
    return [len(j.prompt_ids) for j in jobs]


def test_admission_is_fifo_under_the_token_budget():
    policy = AdmissionPolicy(max_batch=8, max_batch_tokens=100, max_resident=16)
    waiting = deque([job(40), job(40), job(30), job(5)])
    assert sizes(policy.admit(waiting, Occupancy())) == [40, 40]  # 30 more would pass 100; 5 may not overtake it
    assert sizes(policy.admit(waiting, Occupancy(rows=2))) == [30, 5]
    full = AdmissionPolicy(max_batch=2, max_batch_tokens=100, max_resident=16)
    assert len(full.admit(deque([job(1), job(1), job(1)]), Occupancy(rows=1))) == 1  # rows are capped too


def test_running_rows_do_not_count_against_the_prefill_token_budget():
    """Prefill first: joining prompts run in a forward of their own, so a prompt that fits the budget
    joins at once however many rows are decoding (it used to wait for them to drain)."""
    policy = AdmissionPolicy(max_batch=16, max_batch_tokens=64, max_resident=16)
    assert sizes(policy.admit(deque([job(60), job(2)]), Occupancy(rows=12))) == [60, 2]


def test_a_long_prompt_at_the_head_is_not_overtaken_and_joins_alone_to_be_chunked():
    """No starvation: short prompts behind a long one wait; one over the budget joins alone (the
    engine prefills it in chunks) and nothing joins while it is being chunked."""
    policy = AdmissionPolicy(max_batch=16, max_batch_tokens=64, max_resident=16)
    waiting = deque([job(60), job(10), job(2)])
    assert sizes(policy.admit(waiting, Occupancy(rows=10))) == [60]  # 60 + 10 > 64, and 2 may not overtake 10
    assert sizes(policy.admit(waiting, Occupancy(rows=11))) == [10, 2]
    oversize = deque([job(500), job(2)])
    assert sizes(policy.admit(oversize, Occupancy(rows=3))) == [500]  # alone in its step
    assert policy.admit(oversize, Occupancy(rows=3, prefilling=True)) == []  # nothing joins while it is chunked
    assert sizes(policy.admit(oversize, Occupancy(rows=4))) == [2]
    capped = AdmissionPolicy(max_batch=4, max_batch_tokens=64, max_resident=16)
    assert capped.admit(deque([job(60), job(2)]), Occupancy(rows=4)) == []  # waits for a row to leave ...
    assert sizes(capped.admit(deque([job(60), job(2)]), Occupancy(rows=3))) == [60]  # ... then goes first


def test_admission_keeps_the_adapters_within_max_resident():
    policy = AdmissionPolicy(max_batch=16, max_batch_tokens=1000, max_resident=2)
    waiting = deque([job(3, "user:a@v1"), job(3, "user:c@v1"), job(3, "user:a@v1")])
    running = Occupancy(rows=1, adapters=frozenset({"user:b@v1"}))
    assert [j.refs[0].name for j in policy.admit(waiting, running)] == ["a"]  # c would make three
    assert [j.refs[0].name for j in policy.admit(waiting, Occupancy())] == ["c", "a"]
