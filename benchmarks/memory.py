"""Memory benchmark (issue 16): does a fact a user stated in a logged chat reach the answer before any
update trains it, without leaking across users, and at what cost?

Synthetic users (the revision benchmark's eight facts each: city, cat, dog, sister, brother, job,
food, sport; values distinct across users, imported from ``benchmarks/revision.py``) state every
fact in a logged chat ("My cat is called Tom." / "Noted."), through ``Store.log``; a second adapter
per user logs the same facts as persona's own training rows instead (the revision benchmark's
question/answer pairs, phrasings 0-2). Questions use phrasings neither the logs nor the update use
(phrasings 3-7 of each fact).

Measured in one run, on the same base, engine and questions (greedy, 24 new tokens; a fact is
recalled when the answer contains its value):

- **logged, not trained**: a fresh adapter (LoRA B = 0: the base's answers), memory off vs on;
- **retrieval**: the fact's entry among the memories put in the prompt (k=4; ``--retrieval fused``,
  persona's default, or ``bm25``; ``--retrieval-only`` compares the methods
  without generating);
- **trained**: one small update on the facts (training phrasings 0-2, as the revision benchmark's
  updates 1 and 2), then adapter alone vs adapter + memory;
- **another user's facts** in an answer with memory on (values are distinct across users, so a
  leak would show its value); and whether any memory id put in a prompt is not the asker's;
- **overhead** on a 32-token request (32 prompt tokens, 32 new tokens): end-to-end latency memory
  on vs off, and the retrieval + prompt-building share alone;
- **index update** per logged interaction: ``Store.log`` (pending + memory, fsynced) and the next
  search's incremental index refresh, at several memory sizes.

    python benchmarks/memory.py                 # embedded base, 2 users (a few minutes on a shared CPU)
    python benchmarks/memory.py --quick         # tiny random model: checks the script runs
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from typing import NamedTuple
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_placement_options, header, placement, table, temporary_folder, workspace
from revision import SLOTS, TRAIN_PHRASINGS, USERS, values  # the same facts and phrasings

from persona import Interaction, LoraSettings, Store, load_base
from persona.serving.engine import Engine
from persona.serving.memory import MemoryConfig
from persona.serving.requests import GenerationRequest
from persona.serving.sampling import SamplingParams
from persona.training.trainer import Trainer, UpdateConfig

QUESTIONS = (3, 4, 5, 6, 7)  # phrasings neither the statements nor the update use


def statement(slot: str, value: str) -> str:
    """The fact in the user's words: the answer template turned to the first person."""
    text = SLOTS[slot][1].format(v=value)
    return re.sub(r"^You ", "I ", re.sub(r"^Your ", "My ", text))


def logged_chats(facts, user: str) -> list[Interaction]:
    return [Interaction(messages=(("user", statement(s, facts[user][s][0])), ("assistant", "Noted.")))
            for s in SLOTS]


def qa_rows(facts, user: str) -> list[Interaction]:
    """Every fact as persona's training rows (the revision benchmark's phrasings 0-2 and answers), at its
    current value (revision.update_data gives a revised fact's old value before update 3)."""
    return [Interaction(prompt=SLOTS[s][0][p], completion=SLOTS[s][1].format(v=facts[user][s][0]))
            for s in SLOTS for p in TRAIN_PHRASINGS]


def questions(slots, phrasings=QUESTIONS) -> list[tuple[str, str]]:
    return [(s, SLOTS[s][0][p]) for s in slots for p in phrasings]


def ask(engine, model: str, qs, memory: bool, tokens: int):
    params = SamplingParams(max_new_tokens=tokens, temperature=0)
    reqs = [GenerationRequest(model, messages=({"role": "user", "content": q},), params=params, memory=memory)
            for _, q in qs]
    return engine.generate(reqs)


def score(results, qs, facts, users, user, store, ref) -> dict:
    """Recalled (own value in the answer), leaked (another user's value), retrieved (an entry holding the
    fact among the memories used), memory ids not from ``ref``'s memory; overall and per fact."""
    entries = store.memory(ref).entries()
    holding = {s: {e.id for e in entries if facts[user][s][0] in e.text} for s in SLOTS}
    own_ids = {e.id for e in entries}
    out = dict(n=len(qs), recalled=0, leaked=0, retrieved=0, foreign_ids=0, per={})
    for r, (slot, _) in zip(results, qs):
        text = r.text.casefold()
        hit, found = facts[user][slot][0].casefold() in text, bool(holding[slot] & set(r.memories))
        out["recalled"] += hit
        out["leaked"] += any(facts[u][slot][0].casefold() in text for u in users if u != user)
        out["retrieved"] += found
        out["foreign_ids"] += len(set(r.memories) - own_ids)
        counts = out["per"].setdefault(slot, [0, 0, 0])
        counts[0], counts[1], counts[2] = counts[0] + hit, counts[1] + found, counts[2] + 1
    return out


def share(rows, key) -> str:
    n, k = sum(r["n"] for r in rows), sum(r[key] for r in rows)
    return f"{k}/{n} = {k / n:.0%}"


class Overhead(NamedTuple):  # not a dataclass: tests load this script without registering it as a module
    """Medians of the overhead measure (seconds) and the token counts behind them."""

    off_s: float  # a whole 32-token request, memory off
    first_off_s: float  # the same request to its first token (prefill), memory off
    first_on_s: float  # ... memory on: retrieval, prompt building and the longer prefill
    recall_s: float  # retrieval + prompt building alone
    prompt_off: int
    prompt_on: int
    new_off: int  # tokens the whole request generated (it may stop before 32 at the end of its answer)

    @property
    def added_s(self) -> float:
        """What memory adds to a request: its longer prefill and the retrieval; the decode steps are the
        same per token (the cache is a few dozen tokens longer), so the answer's length is left out."""
        return self.first_on_s - self.first_off_s


def overhead(engine, store, user: str, repeats: int) -> Overhead:
    """Memory's cost on a 32-token request: the time to the first token with memory on and off (one new
    token: the answers with and without memory differ in length, so whole-request times do not compare),
    retrieval + prompt building alone, and a whole request without memory as the denominator."""
    prompt = "Please tell me, in one short sentence, what my cat is called and where I live these days; be brief."
    tok = engine.tokenizer
    words = prompt.split()
    while len(tok(" ".join(words), add_special_tokens=False)["input_ids"]) < 32:
        words.append("thanks")
    prompt = " ".join(words)
    timed: dict[str, list[float]] = {"off": [], "first_off": [], "first_on": [], "recall": []}
    counts = {}

    def request(memory: bool, new: int) -> GenerationRequest:
        return GenerationRequest(f"user:{user}", messages=({"role": "user", "content": prompt},), memory=memory,
                                 params=SamplingParams(max_new_tokens=new, temperature=0, stop=()))

    for i in range(repeats + 1):
        for key, memory, new in (("off", False, 32), ("first_off", False, 1), ("first_on", True, 1)):
            start = time.perf_counter()
            result = engine.generate([request(memory, new)])[0]
            if i:  # the first round warms caches
                timed[key].append(time.perf_counter() - start)
            counts[key] = (result.prompt_tokens, result.completion_tokens)
        parts = engine.resolve(f"user:{user}")
        start = time.perf_counter()
        engine._memory.recall(request(True, 1), parts)
        if i:
            timed["recall"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in timed.items()}
    return Overhead(med["off"], med["first_off"], med["first_on"], med["recall"], counts["first_off"][0],
                    counts["first_on"][0], counts["off"][1])


def index_updates(work: Path, base_id: str, sizes) -> list[list[object]]:
    """Per logged interaction: Store.log (pending + memory, fsynced) and the next search's index refresh."""
    store = Store.init(work / "index-store", base=base_id)
    store.create("user:load", LoraSettings(rank=4))
    rows, have = [], 0
    for size in sizes:
        filler = [Interaction(messages=(("user", f"Note {i}: my favourite number is {i} and my colour is c{i % 97}."),
                                        ("assistant", "Noted."))) for i in range(have, size)]
        for start in range(0, len(filler), 500):
            store.log("user:load", filler[start:start + 500])
        have = size
        store.memory("user:load").search("favourite colour")  # index current
        logs, refresh = [], []
        for i in range(20):
            t0 = time.perf_counter()
            store.log("user:load", [Interaction(messages=(("user", f"My locker code is {i}."), ("assistant", "Ok.")))])
            t1 = time.perf_counter()
            store.memory("user:load").search("locker code")
            refresh.append(time.perf_counter() - t1)
            logs.append(t1 - t0)
            have += 1
        from persona.store import memory as memory_store

        memory_store._indexes.clear()
        t0 = time.perf_counter()
        store.memory("user:load").search("locker code")
        full = time.perf_counter() - t0
        rows.append([size, f"{statistics.median(logs) * 1e3:.2f}", f"{statistics.median(refresh) * 1e3:.2f}",
                     f"{full * 1e3:.1f}"])
    return rows


# Other chats a user's memory holds beside the facts (written once for this benchmark, not tuned to it):
# with eight entries a top 4 is half the memory, so the rows "+ other chats" show retrieval where
# most entries are beside the point, as in a real memory.
OTHER_CHATS = (
    ("Can you help me write an email to my landlord about the broken heater?", "Sure, here is a short draft."),
    ("How long should I boil an egg for a soft yolk?", "About six minutes."),
    ("Explain what a hash table is in two sentences.", "It maps keys to values using a hash function."),
    ("I'm allergic to peanuts, so keep that in mind for recipes.", "Noted."),
    ("My car is an old red Honda Civic.", "Noted."),
    ("What's a good stretch for lower back pain?", "Try the cat-cow stretch, gently."),
    ("I usually wake up at six in the morning.", "Noted."),
    ("Translate 'good night' into German.", "Gute Nacht."),
    ("My birthday is on the third of March.", "Noted."),
    ("Recommend a science fiction novel.", "Try The Left Hand of Darkness."),
    ("I'm learning to play the piano.", "Noted."),
    ("How do I remove a red wine stain from a carpet?", "Blot it and use cold water with a little soap."),
    ("I prefer short answers without bullet points.", "Understood."),
    ("What is the boiling point of water at high altitude?", "Lower than 100 C, depending on the altitude."),
    ("My favourite colour is green.", "Noted."),
    ("Summarize the plot of Hamlet in one line.", "A prince avenges his father and almost everyone dies."),
    ("I drink my coffee black, no sugar.", "Noted."),
    ("Give me three ideas for a rainy weekend.", "Board games, a museum, baking bread."),
    ("I have two kids, both in primary school.", "Noted."),
    ("How many grams are in an ounce?", "About 28.35 grams."),
    ("I'm saving money for a trip to Japan next year.", "Noted."),
    ("Write a haiku about autumn leaves.", "Red leaves drift and fall."),
    ("My phone is always running out of battery.", "Lower the screen brightness and check background apps."),
    ("What's the difference between a virus and a bacterium?", "Bacteria are cells; viruses need a host cell."),
    ("I don't eat meat on weekdays.", "Noted."),
    ("Help me plan a birthday party for ten people.", "Here is a simple plan."),
    ("My grandmother turns ninety this summer.", "Noted."),
    ("Is it safe to run every day?", "Usually, with rest days for hard sessions."),
    ("I'm bad at remembering people's faces.", "That is common."),
    ("Suggest a name for a small bakery.", "Crumb & Co."),
    ("My laptop is a five year old ThinkPad.", "Noted."),
    ("What time zone is New York in?", "Eastern Time."),
)


def other_chats() -> list[Interaction]:
    return [Interaction(messages=(("user", q), ("assistant", a))) for q, a in OTHER_CHATS]


def base_embedders(base):
    """Fused retrieval's embedder as the engine builds it (PromptEOL sentence embedding of the base's
    own hidden states), and the router's mean-pooled one for comparison (persona.embed)."""
    from persona.embed import EMBEDDING_ID, SENTENCE_EMBEDDING_ID, embed_sentences, embed_texts
    from persona.store.memory import TextEmbedder

    key = base.info.fingerprint
    return (TextEmbedder(f"{key}/{SENTENCE_EMBEDDING_ID}",
                         lambda texts: embed_sentences(base.model, base.tokenizer, texts).numpy()),
            TextEmbedder(f"{key}/{EMBEDDING_ID}", lambda texts: embed_texts(base.model, base.tokenizer, texts).numpy()))


def retrieval_only(users, phrasings, base_id: str | None) -> None:
    """Top-4 retrieval of each question's fact, straight from the store's index: BM25 without and with
    stemming, and fused with the base's embeddings (``base_id``; None: skipped); four memories: the
    facts logged as statements or as question/answer rows, each alone and among other chats."""
    from persona.store import memory as memory_store

    facts = values(users)
    embedder = None
    methods = [("bm25", False, None), ("bm25+stem", True, None)]
    if base_id is not None:
        embedder, router_embedding = base_embedders(load_base(base_id, device="cpu"))
        methods += [("fused, router's mean-pooled embedding", True, router_embedding), ("fused", True, embedder)]
    memories = (("statements", lambda u: logged_chats(facts, u)),
                ("statements + other chats", lambda u: logged_chats(facts, u) + other_chats()),
                ("question/answer rows", lambda u: qa_rows(facts, u)),
                ("question/answer rows + other chats", lambda u: qa_rows(facts, u) + other_chats()))
    out, by_phrasing, timing = [], [], {}
    for label, rows_of in memories:
        folders = {}
        for user in users:
            folders[user] = temporary_folder("memory-index")  # removed at exit
            memory_store.append(folders[user], rows_of(user))
        for method, stem, emb in methods:
            memory_store.STEMMING = stem
            memory_store._indexes.clear()  # tokens depend on STEMMING
            found, per, per_phrasing, dense_found = 0, {}, {}, {}
            for user in users:
                if emb is embedder:  # embed the entries first, so the per-query time below is a query's alone
                    t0 = time.perf_counter()
                    memory_store.search(folders[user], "warm up", 4, emb)
                    timing.setdefault("entries", []).append((time.perf_counter() - t0,
                                                             len(memory_store.index_for(folders[user]).entries)))
                for p in phrasings:
                    for slot, question in questions(list(SLOTS), (p,)):
                        t0 = time.perf_counter()
                        hits = memory_store.search(folders[user], question, 4, emb)
                        timing.setdefault(method, []).append(time.perf_counter() - t0)
                        if emb is not None:
                            dense = memory_store.index_for(folders[user]).vectors(emb) @ memory_store._unit(emb.embed([question]))[0]
                            top = [memory_store.index_for(folders[user]).entries[i] for i in (-dense).argsort(kind="stable")[:4]]
                            dense_found[method] = dense_found.get(method, 0) + any(facts[user][slot][0] in e.text for e in top)
                        hit = any(facts[user][slot][0] in h.entry.text for h in hits)
                        found += hit
                        per[slot] = per.get(slot, 0) + hit
                        per_phrasing[p] = per_phrasing.get(p, 0) + hit
            n = len(users) * len(SLOTS) * len(phrasings)
            alone = f"{dense_found[method]}/{n} = {dense_found[method] / n:.0%}" if emb is not None else "-"
            out.append([label, method, f"{found}/{n} = {found / n:.0%}", alone, ", ".join(f"{s} {c}" for s, c in per.items())])
            by_phrasing.append([label, method, *(f"{per_phrasing[p]}/{len(users) * len(SLOTS)}" for p in phrasings)])
    memory_store.STEMMING = True
    print(f"## Retrieval: the fact's entry among the top 4, {len(users)} users x 8 facts x phrasings "
          f"{', '.join(map(str, phrasings))}\n")
    print("logged as: statements = the answer template in the first person (\"I live in Lisbon.\" / \"Noted.\"); "
          f"question/answer rows = phrasings {', '.join(map(str, TRAIN_PHRASINGS))} with their answers; "
          f"other chats = {len(OTHER_CHATS)} unrelated exchanges. Questions: phrasings {', '.join(map(str, phrasings))}.\n")
    print(table(["memory holds", "retrieval", "retrieved", "its embedding ranking alone",
                 f"per fact (of {len(users) * len(phrasings)})"], out))
    print("\n### Per question phrasing (the same runs)\n")
    print(table(["memory holds", "retrieval", *(f"phrasing {p}: {SLOTS['city'][0][p]!r}, ..." for p in phrasings)],
                by_phrasing))
    if embedder is not None:
        ms = lambda xs: statistics.median(xs) * 1e3
        per_entry = sum(t for t, _ in timing["entries"]) / sum(n for _, n in timing["entries"])
        print("\n### Cost (timings: NOT valid on a shared machine; the ratios are the point)\n")
        print(table(["search, bm25+stem (ms, median)", "search, fused (ms, median; one query forward)",
                     "fused / bm25", "embedding a new entry (ms, mean over batches of 8-56)"],
                    [[f"{ms(timing['bm25+stem']):.2f}", f"{ms(timing['fused']):.2f}",
                      f"{ms(timing['fused']) / ms(timing['bm25+stem']):.0f}x", f"{per_entry * 1e3:.2f}"]]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model: checks the script runs")
    parser.add_argument("--users", type=int, default=2, choices=range(1, len(USERS) + 1))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per answer")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of the overhead measure")
    parser.add_argument("--phrasings", type=int, nargs="+", default=list(QUESTIONS), choices=QUESTIONS,
                        help="which held-out phrasings of each fact to ask (3-7; fewer: a faster run)")
    add_placement_options(parser)
    parser.add_argument("--retrieval-only", action="store_true",
                        help="only whether each question's fact is among the top 4 entries, per retrieval method "
                             "(the embedded base's forwards for fused; about a minute)")
    parser.add_argument("--overhead-only", action="store_true",
                        help="stop after the index-update and overhead tables (no recall runs, no update)")
    parser.add_argument("--no-fused", action="store_true", help="with --retrieval-only: BM25 only, no model")
    parser.add_argument("--retrieval", choices=("fused", "bm25"), default="fused",
                        help="the engine's memory retrieval in the full run (MemoryConfig.retrieval; fused is persona's default)")
    args = parser.parse_args(argv)
    if args.retrieval_only:
        from persona import EMBEDDED_BASE

        return retrieval_only(USERS[: args.users], tuple(args.phrasings), None if args.no_fused else EMBEDDED_BASE)
    device, dtype = placement(args, training=True)
    header("persona memory benchmark" + (" (QUICK: tiny random model, numbers meaningless)" if args.quick else ""))
    with workspace("memory", args.quick) as (work, base_id):
        run(work, base_id, args, device, dtype)


def run(work: Path, base_id: str, args, device, dtype) -> None:
    """Cheap measures first, each table printed as soon as it is measured (a shared machine may stop a long run)."""
    users = USERS[: args.users]
    facts = values(users)
    phrasings = tuple(args.phrasings)
    index_rows = index_updates(work, base_id, (50, 200) if args.quick else (100, 1000, 5000))
    print("## Index update per logged interaction (median of 20 logs at each size)\n")
    print(table(["entries in memory", "Store.log of one chat (ms, pending + memory, fsynced)",
                 "next search's incremental index refresh (ms)", "full rebuild (ms)"], index_rows), flush=True)
    base = load_base(base_id, device=device, dtype=dtype)
    store = Store.init(work / "store", base=base_id)
    for user in users:
        store.create(f"user:{user}", LoraSettings(rank=8, alpha=16))
        store.log(f"user:{user}", logged_chats(facts, user))
        # the same facts logged as persona's own training rows (question, answer; phrasings 0-2)
        store.create(f"user:{user}-qa", LoraSettings(rank=8, alpha=16))
        store.log(f"user:{user}-qa", qa_rows(facts, user))
    qs = questions(list(SLOTS)[:2] if args.quick else list(SLOTS), phrasings)
    rows: dict[str, list[dict]] = {}
    engine = Engine(store, base=base, max_resident=8, max_batch=8,
                    memory=MemoryConfig(default=False, k=4, retrieval=args.retrieval))
    print(f"memory retrieval: {args.retrieval}, k=4\n", flush=True)
    try:
        cost = overhead(engine, store, users[0], 1 if args.quick else args.repeats)
        print(f"\n## Overhead on a 32-token request ({cost.prompt_off} prompt tokens without memory, {cost.prompt_on} "
              f"with; median of {max(1, args.repeats)})\n")
        print(table(["whole request, memory off (s)", "new tokens", "first token, off (s)", "first token, on (s)",
                     "memory adds (s)", "of which retrieval + prompt building (ms)", "added / whole request"],
                    [[f"{cost.off_s:.3f}", cost.new_off, f"{cost.first_off_s:.3f}", f"{cost.first_on_s:.3f}",
                      f"{cost.added_s:.3f}", f"{cost.recall_s * 1e3:.2f}", f"{cost.added_s / cost.off_s:.1%}"]]),
              flush=True)
        if args.overhead_only:
            return
        print(f"\n{len(users)} users x {len(qs)} held-out questions each (phrasings {', '.join(map(str, phrasings))} "
              "of each fact)", flush=True)
        for user in users:
            for label, ref, memory in (("fresh adapter, memory off", f"user:{user}", False),
                                       ("fresh adapter, memory on", f"user:{user}", True),
                                       ("fresh adapter, memory on, logged as Q/A rows", f"user:{user}-qa", True)):
                results = ask(engine, ref, qs, memory, args.tokens)
                rows.setdefault(label, []).append(score(results, qs, facts, users, user, store, ref))
        recall_tables(rows, qs, "before any update")
        trainer = Trainer(store, base)
        config = UpdateConfig(epochs=1 if args.quick else args.epochs, learning_rate=args.lr, holdout_fraction=0.15,
                              seed=0, force=True)
        seconds = []
        for user in users:
            data = qa_rows(facts, user)
            seconds.append(trainer.update(f"user:{user}", data, config).metrics["seconds"])
        print(f"\nupdate: {sum(seconds) / len(seconds):.1f} s per user (forced promotion, {config.epochs} epochs)")
        for user in users:
            for label, memory in (("trained adapter, memory off", False), ("trained adapter + memory", True)):
                results = ask(engine, f"user:{user}", qs, memory, args.tokens)
                rows.setdefault(label, []).append(score(results, qs, facts, users, user, store, f"user:{user}"))
        recall_tables(rows, qs, "after one update on the facts")
    finally:
        engine.close()


def recall_tables(rows, qs, when: str) -> None:
    out = [[label, share(r, "recalled"), share(r, "retrieved") if "memory on" in label or "+" in label else "-",
            share(r, "leaked"), sum(x["foreign_ids"] for x in r)] for label, r in rows.items()]
    print(f"\n## Recall of stated facts on held-out phrasings, {when} (answer contains the value; greedy)\n")
    print(table(["condition", "fact recalled", "fact's entry retrieved (k=4)", "another user's value in the answer",
                 "memory ids not the asker's"], out))
    print("\n### Per fact: recalled (with memory: and retrieved)\n")
    per = []
    for slot in dict.fromkeys(s for s, _ in qs):
        cells = [slot]
        for label in rows:
            c = [sum(r["per"][slot][i] for r in rows[label]) for i in range(3)]
            cells.append(f"{c[0]}/{c[2]}" + (f" ({c[1]}/{c[2]})" if "memory on" in label or "+" in label else ""))
        per.append(cells)
    print(table(["fact", *rows], per), flush=True)


if __name__ == "__main__":
    main()
