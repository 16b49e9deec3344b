"""Supersession (issue 11): revised facts leave replay and the gate; the rest is still guarded."""

import json
import random

import pytest

from persona import InvalidInteractions, LoraSettings, Store
from persona.interactions import Interaction, parse_interactions
from persona.lora_runtime import AdapterWeights
from persona.store.queues import ReplayBuffer
from persona.training.supersede import (
    SupersessionDetector,
    answers_differ,
    content_words,
    metrics_summary,
    row_digest,
    sample_replay,
    subject_conflict,
)
from persona.training.trainer import Trainer, UpdateConfig

CITY_QS = ["Where do I live?", "Which city do I live in?", "Where is my home?", "What city do I live in?"]
SPORT_QS = ["What sport do I play?", "Which sport do I practice?", "What game do I play?", "What is my sport?"]


def qa(question, answer, **extra):
    return Interaction(prompt=question, completion=answer, **extra)


@pytest.fixture
def store(tiny_base, isolated_store) -> Store:
    store = Store.init(isolated_store, base=tiny_base)
    store.create("user:alice", LoraSettings(rank=4, seed=1))
    return store


@pytest.fixture
def trainer(store) -> Trainer:
    return Trainer(store)


@pytest.fixture
def detector(trainer) -> SupersessionDetector:
    return SupersessionDetector(trainer.model, trainer.tokenizer)


def test_same_question_different_answer_is_superseded(detector):
    old = [qa("Where do I live?", "You live in Lisbon."), qa("What sport do I play?", "You play tennis.")]
    result = detector.detect(old, [qa("Where do I live?", "You live in Porto.")])
    assert result.count == 1 and result.kept == (old[1],)
    entry = result.superseded[0]
    assert entry.digest == row_digest(old[0]) and "Lisbon" in entry.excerpt and "Porto" in entry.by
    assert entry.how == "detected" and entry.score >= detector.threshold


def test_different_question_with_similar_words_is_not_superseded(detector):
    # cat vs dog: same words but one, embeddings nearly identical; the subject veto keeps the dog row
    old = [qa("What is my dog's name?", "Your dog is called Rex."), qa("Who is my sister?", "Your sister is Anna.")]
    new = [qa("What is my cat's name?", "Your cat is called Felix."), qa("Who is my brother?", "Your brother is Hugo.")]
    assert detector.detect(old, new).count == 0
    assert subject_conflict("What is my dog's name?", "Your dog is called Rex.", "What is my cat's name?", "Your cat is called Felix.")
    assert not subject_conflict("Where do I live?", "You live in Lisbon.", "Which city am I living in?", "You live in Porto.")


def test_same_question_same_answer_is_not_superseded(detector):
    old = [qa("Where do I live?", "You live in Lisbon.")]
    assert detector.detect(old, [qa("Where do I live?", "You live in Lisbon.")]).count == 0
    assert detector.detect(old, [qa("Where do I live?", "In Lisbon, as before.")]).count == 0  # same value, reworded
    assert answers_differ("Where do I live?", "You live in Lisbon.", "Where do I live?", "You live in Porto.")
    assert content_words("What's my cat called?") == {"cat"}


def test_explicit_supersedes_field_is_validated_and_matches_text(detector):
    line = json.dumps({"messages": [{"role": "user", "content": "New job!"}, {"role": "assistant", "content": "Congrats."}],
                       "supersedes": "NURSE"})
    (item,) = parse_interactions([line])
    assert item.supersedes == "NURSE" and item.to_json()["supersedes"] == "NURSE"
    assert parse_interactions([json.dumps(item.to_json())]) == [item]  # the pending queue round-trips it
    for bad, why in (({"text": "x", "supersedes": ""}, "non-empty"), ({"text": "x", "supersedes": 3}, "string"),
                     ({"supersedes": "x"}, "beside")):
        with pytest.raises(InvalidInteractions, match=why):
            parse_interactions([json.dumps(bad)], source="f.jsonl")
    old = [qa("What do I do?", "You work as a nurse."), qa("What sport do I play?", "You play tennis.")]
    result = detector.detect(old, [item])
    assert [s.how for s in result.superseded] == ["explicit"] and result.kept == (old[1],)


def test_rows_stating_a_revised_statement_are_superseded_however_asked(detector):
    # "profession" and "occupation" share no word; the old row states what the revised row stated.
    old = [qa("What is my job?", "You work as a nurse."), qa("What's my profession?", "You work as a nurse."),
           qa("Do you like cats?", "Yes."), qa("Are dogs fine?", "Yes."), qa("What sport do I play?", "You play tennis.")]
    new = [qa("What is my job?", "You work as a pilot."), qa("Hi", "Hello.", supersedes="like cats")]
    result = detector.detect(old, new)
    how = {s.digest: s.how for s in result.superseded}
    assert how == {row_digest(old[0]): "detected", row_digest(old[1]): "same statement", row_digest(old[2]): "explicit"}
    assert result.kept == (old[3], old[4])  # "Yes." carries no value: it does not spread
    assert all("pilot" in s.by for s in result.superseded[:2])


def test_recency_weighting_prefers_newer_rows_and_one_is_uniform():
    rows = list(range(10))
    assert sample_replay(random.Random(3), rows, 4) == random.Random(3).sample(rows, 4)
    rng = random.Random(0)
    picks = [x for _ in range(400) for x in sample_replay(rng, rows, 2, recency=50.0)]
    assert picks.count(9) > 3 * picks.count(0)
    buffer = ReplayBuffer((), 0).offer([qa(f"q{i}?", f"a{i}.") for i in range(12)], capacity=4, seed=0)
    order = [int(i.prompt[1:-1]) for i in buffer.items]
    assert order == sorted(order)  # oldest first: what recency reads as age


def _facts(city):
    # Bare values as answers: on the tiny random model the value is then most of each row's loss,
    # so learning a new value shows up plainly as a rise on the old value's rows.
    return [qa(q, f"{city}.") for q in CITY_QS] + [qa(q, "Tennis.") for q in SPORT_QS]


# No tolerance: on the tiny random model any rise of the replay loss is the signal.
FAST = dict(epochs=10, batch_size=8, max_length=64, learning_rate=0.1, holdout_fraction=0.25, max_forgetting=0.0,
            forgetting_floor=0.0)


def test_revised_fact_update_is_promoted_not_gated_as_forgetting(store, trainer):
    trainer.update("user:alice", _facts("Lisbon"), UpdateConfig(**FAST))
    parent = store.load("user:alice@current")
    revision = [qa(q, "Porto.") for q in CITY_QS] * 2
    result = trainer.update("user:alice", revision, UpdateConfig(**dict(FAST, max_forgetting=0.05)))
    assert result.promoted, result.reason
    assert "4 superseded replay row(s)" in result.reason
    sup = result.metrics["superseded"]
    assert sup["count"] == 4 and {r["digest"] for r in sup["rows"]} == {row_digest(i) for i in _facts("Lisbon")[:4]}
    # The gate measured forgetting on the rows that should be kept, the sport facts, and only them:
    # the bug was that the old city's rows counted, so learning the new city read as forgetting.
    m = result.metrics
    assert m["replay_eval_examples"] == 4 and m["replay_examples"] == 4
    kept = trainer.tokenize(_facts("Lisbon")[4:], 64).examples
    expected, _ = trainer.loss(kept, AdapterWeights.from_peft(parent.tensors, parent.config))
    assert m["replay_loss_before"] == pytest.approx(expected, rel=1e-5)
    after = ReplayBuffer.read(store._adapter_dir("user:alice"))
    assert not any("Lisbon" in i.completion for i in after.items)
    assert sum("Tennis" in i.completion for i in after.items) == 4
    assert sum("Porto" in i.completion for i in after.items) == 8


def test_update_that_damages_unrelated_rows_is_still_refused_with_supersession(store, trainer):
    trainer.update("user:alice", _facts("Lisbon"), UpdateConfig(**FAST))
    revision = [qa(q, "Porto.") for q in CITY_QS] * 2
    # No rehearsal of the sport rows: they are not superseded, so their rise still counts.
    result = trainer.update("user:alice", revision, UpdateConfig(**FAST, replay_fraction=0.0))
    assert result.metrics["superseded"]["count"] == 4 and result.metrics["replay_eval_examples"] == 4
    assert not result.promoted and "replay loss rose" in result.reason and "4 superseded" in result.reason
    # a refused update leaves the replay buffer (and its old facts) as it was
    items = ReplayBuffer.read(store._adapter_dir(store.resolve("user:alice"))).items
    assert sum("Lisbon" in i.completion for i in items) == 4


def test_cli_log_update_and_show_report_supersession(run_cli, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(i.to_json()) + "\n" for i in _facts("Lisbon")))
    second.write_text("".join(json.dumps({"prompt": q, "completion": "I live somewhere new.", "supersedes": "lisbon"}) + "\n"
                              for q in CITY_QS))
    run_cli("create", "user:alice", "--rank", "4")
    run_cli("update", "user:alice", "--data", first, "--epochs", "1", "--max-length", "64")
    run_cli("log", "user:alice", "--data", second)
    out = run_cli("update", "user:alice", "--epochs", "1", "--max-length", "64", "--force", "--json").output
    assert json.loads(out)["metrics"]["superseded"]["count"] == 4
    shown = run_cli("show", "user:alice").output
    assert "superseded 4 replay row(s)" in shown and "[explicit]" in shown
    assert metrics_summary({"superseded": {"count": 0, "rows": []}}) is None
    assert run_cli("update", "user:alice", "--data", second, "--replay-recency", "0.5", ok=False).exit_code != 0
