"""Revision benchmark: when a user's facts change, does the update learn and serve the new fact?

Synthetic users, each with eight facts (city, cat, dog, sister, brother, job, food, sport; every
fact has eight question phrasings: three train in updates 1-2, four in the revision, two are held
out for evaluation only). Update 1 tells four facts, update 2 four more, update 3 only revises three
of them (city, cat, job) with new values, asked with mostly new phrasings. cat/dog and
sister/brother are near-miss pairs (same words, different question): the failure mode of
supersession detection.

Compared in one run, on the same base and data:

- **plain sequential LoRA**: the same trainer with no replay, no gate (every update forced);
- **persona, no supersession**: defaults with ``supersede=False`` (what shipped before issue 11);
- **persona**: defaults (supersession on);
- **persona, recency 4**: supersession plus recency-weighted replay (newest row 4x the oldest);
- **destructive**: persona's revision update at a destructive learning rate: must be refused.

Measured on held-out phrasings, by comparing the log-likelihood of the answer with each candidate
value (the true one, the other users' values, two unused values and, for a revised fact, the old
one): revised facts where the new value wins; unchanged facts where the true value still wins after
the revision; gate decisions and reasons; supersession found vs the truth; update-3 time.

    python benchmarks/revision.py --users 2 --no-recency   # 14 min on 2 idle CPU cores (real embedded base)
    python benchmarks/revision.py --users 2                # the same plus the recency-weighted variant
    python benchmarks/revision.py --quick    # tiny random model: checks the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, table, workspace  # noqa: E402

import torch  # noqa: E402

from persona import Interaction, LoraSettings, Store, load_base  # noqa: E402
from persona.training.batches import collate  # noqa: E402
from persona.training.tokenize import tokenize_interactions  # noqa: E402
from persona.lora_runtime import Activation, AdapterWeights  # noqa: E402
from persona.training.supersede import row_digest  # noqa: E402
from persona.training.trainer import Trainer, UpdateConfig  # noqa: E402

SLOTS = {
    "city": (["Where do I live?", "Which city do I live in?", "What city is my home?", "Where is my home these days?",
              "In which town do I reside?", "Where am I based?", "What's the city I call home?", "Which city am I living in?"],
             "You live in {v}.", ["Lisbon", "Porto", "Oslo", "Denver", "Kyoto", "Nairobi", "Dublin", "Quito"]),
    "cat": (["What is my cat's name?", "What did I name my cat?", "What's my cat called?", "How is my cat named?",
             "Tell me my cat's name.", "What do I call my cat?", "Do you remember my cat's name?", "Which name does my cat have?"],
            "Your cat is called {v}.", ["Tom", "Felix", "Luna", "Mochi", "Simba", "Pepper", "Ginger", "Nala"]),
    "dog": (["What is my dog's name?", "What did I name my dog?", "What's my dog called?", "How is my dog named?",
             "Tell me my dog's name.", "What do I call my dog?", "Do you remember my dog's name?", "Which name does my dog have?"],
            "Your dog is called {v}.", ["Rex", "Bruno", "Max", "Daisy", "Rocky", "Bella", "Duke", "Coco"]),
    "sister": (["What is my sister's name?", "What's my sister called?", "Who is my sister?", "Tell me my sister's name.",
                "What did my parents name my sister?", "Do you remember my sister's name?", "How is my sister named?",
                "What do we call my sister?"],
               "Your sister is {v}.", ["Anna", "Maria", "Sofia", "Clara", "Emma", "Julia", "Nora", "Ines"]),
    "brother": (["What is my brother's name?", "What's my brother called?", "Who is my brother?", "Tell me my brother's name.",
                 "What did my parents name my brother?", "Do you remember my brother's name?", "How is my brother named?",
                 "What do we call my brother?"],
                "Your brother is {v}.", ["Pedro", "Liam", "Omar", "Hugo", "Ivan", "Marco", "Tariq", "Felipe"]),
    "job": (["What is my job?", "What do I do for a living?", "What's my profession?", "What work do I do?",
             "What is my occupation?", "How do I earn my living?", "What's my line of work?", "What am I by trade?"],
            "You work as a {v}.", ["nurse", "pilot", "baker", "teacher", "plumber", "chemist", "lawyer", "farmer"]),
    "food": (["What is my favorite food?", "Which dish do I like best?", "What food do I love most?", "What's my favourite meal?",
              "What do I most like to eat?", "Which food is my favorite?", "What meal makes me happiest?", "What is my top dish?"],
             "Your favorite food is {v}.", ["ramen", "paella", "lasagna", "tacos", "curry", "sushi", "falafel", "pierogi"]),
    "sport": (["What sport do I play?", "Which sport do I practice?", "What game do I play on weekends?", "What's my sport?",
               "Which sport am I into?", "What do I play for exercise?", "What sport keeps me fit?", "Which team sport do I play?"],
              "You play {v}.", ["tennis", "rugby", "hockey", "cricket", "volleyball", "badminton", "baseball", "handball"]),
}
UPDATES = [("city", "cat", "dog", "sister"), ("brother", "job", "food", "sport")]
REVISED = ("city", "cat", "job")
TRAIN_PHRASINGS, REVISION_PHRASINGS, HELD_OUT = (0, 1, 2), (1, 3, 4, 5), (6, 7)
USERS = ["ana", "ben", "cho", "dev"]


def values(users: list[str]) -> dict[str, dict[str, tuple[str, str | None]]]:
    """user -> slot -> (current value, old value for revised slots): distinct across users."""
    out = {}
    for u, user in enumerate(users):
        out[user] = {}
        for slot, (_, _, pool) in SLOTS.items():
            first = pool[2 * u]
            out[user][slot] = (pool[2 * u + 1], first) if slot in REVISED else (first, None)
    return out


def update_data(facts, user: str, k: int) -> list[Interaction]:
    if k < 2:
        return [Interaction(prompt=SLOTS[s][0][p], completion=SLOTS[s][1].format(v=facts[user][s][1] or facts[user][s][0]))
                for s in UPDATES[k] for p in TRAIN_PHRASINGS]
    return [Interaction(prompt=SLOTS[s][0][p], completion=SLOTS[s][1].format(v=facts[user][s][0]))
            for s in REVISED for p in REVISION_PHRASINGS]


@torch.no_grad()
def logliks(trainer: Trainer, weights: AdapterWeights, pairs: list[tuple[str, str]]) -> list[float]:
    """Summed log-likelihood of each answer given its question, through the chat template."""
    examples = tokenize_interactions([Interaction(prompt=q, completion=a) for q, a in pairs], trainer.tokenizer, 256).examples
    out: list[float] = []
    model = trainer.model
    model.eval()
    with trainer.runtime.activate([Activation(AdapterWeights(weights.factors, weights.scale, 0.0))]):
        for start in range(0, len(examples), 16):
            batch = collate(list(examples[start:start + 16]), trainer.pad_id)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
            labels = batch.labels[:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            out += (-ce.sum(1)).tolist()
    return out


def judge(trainer, store, ref, facts, users, user) -> tuple[list[bool], list[bool]]:
    """(revised wins, unchanged wins) on held-out phrasings for one adapter version."""
    loaded = store.load(ref)
    weights = AdapterWeights.from_peft(loaded.tensors, loaded.config)
    jobs, pairs = [], []
    for slot, (questions, template, pool) in SLOTS.items():
        true, old = facts[user][slot]
        taken = {facts[u][slot][0] for u in users} | {facts[u][slot][1] for u in users if facts[u][slot][1]}
        distractors = [facts[u][slot][0] for u in users if u != user] + [v for v in pool if v not in taken][:2]
        if old:
            distractors.append(old)
        for p in HELD_OUT:
            start = len(pairs)
            pairs += [(questions[p], template.format(v=v)) for v in [true, *distractors]]
            jobs.append((slot, start, len(pairs)))
    scores = logliks(trainer, weights, pairs)
    revised, unchanged = [], []
    for slot, a, b in jobs:
        win = scores[a] > max(scores[a + 1:b])
        (revised if slot in REVISED else unchanged).append(win)
    return revised, unchanged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 1 epoch: checks the script runs")
    parser.add_argument("--users", type=int, default=2, choices=range(1, len(USERS) + 1))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--no-recency", action="store_true", help="skip the recency-weighted variant")
    parser.add_argument("--detect-only", action="store_true",
                        help="only supersession detection on the real base, no training (about a minute)")
    args = parser.parse_args()
    header("persona revision benchmark" + (" (QUICK: tiny random model, numbers meaningless)" if args.quick else ""))
    with workspace("revision", args.quick) as (work, base_id):
        if args.detect_only:
            detect_only(base_id)
        else:
            run(work, base_id, args, 1 if args.quick else args.epochs)


def detect_only(base_id: str) -> None:
    """Supersession found in update 3 for every user, against the truth, at several thresholds."""
    from persona.training.supersede import SUPERSEDE_THRESHOLD, SupersessionDetector

    base = load_base(base_id)
    facts = values(USERS)
    out = []
    for threshold in sorted({0.3, 0.4, SUPERSEDE_THRESHOLD, 0.5, 0.6}):
        detector = SupersessionDetector(base.model, base.tokenizer, threshold)
        correct = false = truth_n = 0
        false_rows = []
        for user in USERS:
            old = [i for k in range(2) for i in update_data(facts, user, k)]
            truth = {row_digest(i) for i in old if any(i.prompt in SLOTS[s][0] for s in REVISED)}
            result = detector.detect(old, update_data(facts, user, 2))
            got = {s.digest for s in result.superseded}
            correct, false, truth_n = correct + len(got & truth), false + len(got - truth), truth_n + len(truth)
            false_rows += [s.excerpt for s in result.superseded if s.digest not in truth]
        out.append([threshold, f"{correct}/{truth_n} = {correct / truth_n:.0%}", false, "; ".join(false_rows[:3]) or "-"])
    print("## Supersession detection on update 3 (all users; truth: every update-1/2 row of a revised fact)\n")
    print(table(["threshold", "revised rows found", "false (unchanged rows taken)", "false examples"], out))
    pair_scores(base)


def pair_scores(base) -> None:
    """Every ordered pair of the 64 questions (8 facts x 8 phrasings), each with its fact's answer
    (old value for the older row, new value for the newer): how many same-fact pairs reach each
    threshold on the question score alone, and how many different-fact pairs do (false)."""
    from persona.training.supersede import SupersessionDetector, answers_differ, subject_conflict

    detector = SupersessionDetector(base.model, base.tokenizer)
    rows = [(slot, q, template.format(v=pool[0]), template.format(v=pool[1]))
            for slot, (questions, template, pool) in SLOTS.items() for q in questions]
    score = detector.scores([r[1] for r in rows], [r[1] for r in rows])
    same, other, vetoed = [], [], 0
    for i, (s_old, q_old, a_old, _) in enumerate(rows):
        for j, (s_new, q_new, _, a_new) in enumerate(rows):
            if i == j:
                continue
            if not answers_differ(q_old, a_old, q_new, a_new) or subject_conflict(q_old, a_old, q_new, a_new):
                vetoed += s_old != s_new
                continue
            (same if s_old == s_new else other).append(float(score[i, j]))
    out = [[t, f"{sum(v >= t for v in same)}/{len(same)} = {sum(v >= t for v in same) / len(same):.0%}",
            f"{sum(v >= t for v in other)}/{len(other)}"] for t in (0.3, 0.35, 0.4, 0.45, 0.5, 0.6)]
    print("\n## Question pairs (every ordered pair of the 64 questions; different-fact pairs the subject veto "
          f"stopped first: {vetoed})\n")
    print(table(["threshold", "same-fact pairs at or above", "different-fact pairs at or above (false)"], out))


def run(work: Path, base_id: str, args, epochs: int) -> None:
    users = USERS[: args.users]
    facts = values(users)
    config = UpdateConfig(epochs=epochs, learning_rate=args.lr, holdout_fraction=0.15, seed=0)
    plain = dataclasses.replace(config, replay_fraction=0.0, replay_capacity=0, force=True, supersede=False)
    base = load_base(base_id)
    store = Store.init(work / "store", base=base_id)
    trainer = Trainer(store, base)
    rows, trained, gates, seconds, found = {}, {}, {}, {}, {}

    def record(method, user, result):
        gates.setdefault(method, []).append(f"{'promoted' if result.promoted else 'REFUSED'}: {result.reason}")
        seconds.setdefault(method, []).append(result.metrics["seconds"])

    for user in users:
        for method, cfg in (("plain sequential LoRA", plain), ("persona", config)):
            ref = f"user:{user}-{'plain' if cfg is plain else 'p'}"
            store.create(ref, LoraSettings(rank=8, alpha=16))
            for k in range(2):
                trainer.update(ref, update_data(facts, user, k), cfg)
            if cfg is config:
                # The state after update 2 is copied, so every variant's revision starts from it.
                rows[(user, "after update 2")] = judge(trainer, store, f"{ref}@current", facts, users, user)
                snapshot = work / f"snap-{user}"
                shutil.copytree(store.root, snapshot)
            result = trainer.update(ref, update_data(facts, user, 2), cfg)
            record(method, user, result)
            rows[(user, method)] = judge(trainer, store, f"{ref}@current", facts, users, user)
            trained[(user, method)] = judge(trainer, store, f"{ref}@{result.version.label}", facts, users, user)
            if cfg is config:
                sup = result.metrics["superseded"]
                truth = {row_digest(i) for k in range(2) for i in update_data(facts, user, k)
                         if i.prompt in {SLOTS[s][0][p] for s in REVISED for p in range(8)}}
                got = {r["digest"] for r in sup["rows"]}
                found[user] = (sup["count"], len(got & truth), len(got - truth), len(truth))
        variants = [("persona, no supersession", dataclasses.replace(config, supersede=False))]
        if not args.no_recency:
            variants.append(("persona, recency 4", dataclasses.replace(config, replay_recency=4.0)))
        variants.append(("destructive (lr 0.5)", dataclasses.replace(config, learning_rate=0.5, max_steps=4)))
        for method, cfg in variants:
            copy = work / f"copy-{user}-{len(gates)}"
            shutil.copytree(work / f"snap-{user}", copy)
            other = Trainer(Store.open(copy), base)
            result = other.update(f"user:{user}-p", update_data(facts, user, 2), cfg)
            record(method, user, result)
            rows[(user, method)] = judge(other, other.store, f"user:{user}-p@current", facts, users, user)
            trained[(user, method)] = judge(other, other.store, f"user:{user}-p@{result.version.label}", facts, users, user)
            shutil.rmtree(copy)

    methods = ["after update 2", "plain sequential LoRA", "persona, no supersession", "persona"]
    methods += [] if args.no_recency else ["persona, recency 4"]
    methods += ["destructive (lr 0.5)"]
    def share(table_, method, column):
        wins = [w for u in users for w in table_[(u, method)][column]]
        return f"{sum(wins)}/{len(wins)} = {sum(wins) / len(wins):.0%}"

    out = []
    for method in methods:
        secs = seconds.get(method)
        learned = f"{share(trained, method, 0)}, {share(trained, method, 1)}" if (users[0], method) in trained else "-"
        out.append([method, share(rows, method, 0), share(rows, method, 1),
                    ", ".join(g.split(":")[0] for g in gates.get(method, [])) or "-", learned,
                    sum(secs) / len(secs) if secs else "-"])
    print("## Revised and unchanged facts on held-out phrasings (log-likelihood of each candidate value)\n")
    print(table(["method: version served (current) after update 3", "revised: new value wins", "unchanged: true value wins",
                 "gate on update 3", "update-3 version whether promoted or not: revised, unchanged", "update 3 seconds (mean)"], out))
    print("\n'after update 2' is before the revision: its 'revised' column is the share where the NEW value already won (chance).")
    ratio = sum(seconds["persona"]) / sum(seconds["persona, no supersession"])
    print(f"\nupdate 3 time, persona / persona without supersession: {ratio:.2f}x (goal <= 1.1x; same run, shared CPU)")
    print("\n## Supersession found in update 3 (truth: every update-1/2 row of a revised fact)\n")
    print(table(["user", "superseded", "correct", "false", "truth"], [[u, *found[u]] for u in users]))
    print("\n## Gate reasons on update 3\n")
    for method in methods[1:]:
        for user, reason in zip(users, gates.get(method, [])):
            print(f"- {method}, {user}: {reason}")


if __name__ == "__main__":
    main()
