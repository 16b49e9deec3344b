"""Bulk update benchmark (issue 15): many users' adapters updated in shared steps vs one after another.

Each user gets a rank-8 adapter and ~40 pending chats made from a template with that user's own
facts (name, city, pet, job, ...). The same prepared store is copied once per mode, and each mode
runs in its own child process (its peak RSS is that process's, from ``os.wait4``):

- **one after another**: ``Trainer.update_all`` with ``rows_per_step=0`` (today's ``update --all``);
- **batched**: ``Trainer.update_all`` with ``--rows-per-step`` / ``--max-adapters-per-step``.

Reported per user count: wall time of the whole ``update --all`` (base loaded once in both), the
speed-up, each user's held-out loss after the update batched vs alone (goal: within 2%), the gate
decisions (goal: identical), peak memory (goal: <= 1.5x). Then one small update (12 chats) through
the CLI as a whole process, against a plain in-process PEFT loop (transformers + peft, AdamW, the
same rank, epochs and learning rate) learning the same chats, with where the CLI's time goes.

    python benchmarks/update_many.py                    # 8 and 32 users on the embedded base
    python benchmarks/update_many.py --users 8 --epochs 1
    python benchmarks/update_many.py --quick            # tiny random model, 2 users: checks the script runs
    python benchmarks/update_many.py --device cuda --random-base .gpu/arch   # benchmarks/gpu.sh, on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_placement_options, header, make_random_base, table, workspace  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["Ana", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ida", "Jo", "Kai", "Lu", "Max", "Nia", "Oz", "Pia"]
CITIES = ["Porto", "Oslo", "Lima", "Kyoto", "Accra", "Quito", "Perth", "Riga", "Cork", "Turin", "Hue", "Baku"]
PETS = ["a beagle", "a tabby cat", "two goldfish", "a parrot", "a tortoise", "a husky", "a rabbit", "no pets"]
JOBS = ["a nurse", "a baker", "an architect", "a pilot", "a teacher", "a welder", "a chemist", "a librarian"]
FOODS = ["ramen", "tacos", "lentil soup", "paella", "dumplings", "falafel", "risotto", "pho"]
QUESTIONS = [
    ("What is my name?", "Your name is {name}."), ("Where do I live?", "You live in {city}."),
    ("Do I have pets?", "You have {pet}."), ("What do I do for work?", "You work as {job}."),
    ("What is my favourite food?", "Your favourite food is {food}."),
    ("Remind me where I am based.", "You are based in {city}."), ("What's my job?", "You are {job}."),
    ("Which food do I like best?", "You like {food} best."), ("Tell me about my pet.", "You have {pet}."),
    ("How should you address me?", "I call you {name}."),
]


def user_facts(i: int) -> dict[str, str]:
    rng = random.Random(i)
    return {"name": f"{NAMES[i % len(NAMES)]}{i}", "city": rng.choice(CITIES), "pet": rng.choice(PETS),
            "job": rng.choice(JOBS), "food": rng.choice(FOODS)}


def user_chats(i: int, n: int) -> list[dict]:
    """``n`` chats stating user ``i``'s facts, questions from the template in a seeded order."""
    facts, rng = user_facts(i), random.Random(1000 + i)
    chats = []
    for k in range(n):
        question, answer = QUESTIONS[k % len(QUESTIONS)]
        prefix = rng.choice(["", "Quick question: ", "Hi! ", "Please tell me: "])
        chats.append({"messages": [{"role": "user", "content": prefix + question},
                                   {"role": "assistant", "content": answer.format(**facts)}]})
    rng.shuffle(chats)
    return chats


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare_store(work: Path, base_id: str, users: int, chats: int) -> Path:
    from persona import LoraSettings, Store
    from persona.interactions import read_interactions

    folder = work / f"store-{users}"
    store = Store.init(folder, base=base_id)
    for i in range(users):
        ref = f"user:u{i:03d}"
        store.create(ref, LoraSettings(rank=8, alpha=16, seed=i))
        store.log(ref, read_interactions(write_jsonl(work / f"u{i}.jsonl", user_chats(i, chats))))
    return folder


def child(args) -> None:
    """One mode in this process: ``update_all`` on a store copy; results as JSON on ``--out``."""
    started = time.perf_counter()
    from persona import Store
    from persona.training.trainer import BulkConfig, Trainer, UpdateConfig, UpdateFailure

    trainer = Trainer(Store.open(args.store), device=args.device, dtype=args.dtype)
    loaded = time.perf_counter()
    bulk = BulkConfig(rows_per_step=args.rows_per_step, tokens_per_step=args.tokens_per_step,
                      max_adapters_per_step=args.max_adapters_per_step)
    steps = [0]
    hook = trainer.model.get_decoder().register_forward_pre_hook(
        lambda *_: steps.__setitem__(0, steps[0] + int(__import__("torch").is_grad_enabled())))
    results = trainer.update_all(UpdateConfig(epochs=args.epochs, seed=0), bulk)
    hook.remove()
    done = time.perf_counter()
    out = {"load_s": loaded - started, "update_s": done - loaded, "steps": steps[0], "users": {}}
    for r in results:
        if isinstance(r, UpdateFailure):
            out["users"][r.adapter] = {"failed": r.reason}
        else:
            out["users"][r.adapter] = {"heldout": r.metrics["heldout_loss_after"], "promoted": r.promoted,
                                       "steps": r.metrics["steps"]}
    Path(args.out).write_text(json.dumps(out))


def run_child(argv: list[str]) -> tuple[float, int, int, float]:
    """Run ``argv`` as a child; (wall seconds, peak RSS in MiB, exit status, CPU seconds: user + system).

    CPU seconds say how much work a mode did, which a machine shared with other jobs distorts far less than
    wall time (run with OMP_NUM_THREADS=1 there: idle OpenMP threads spin-waiting on a busy core count too)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss // 1024, proc.returncode, usage.ru_utime + usage.ru_stime


def compare_modes(work: Path, base_id: str, users: int, args) -> list[list[object]]:
    store = prepare_store(work, base_id, users, args.chats)
    modes = {"one after another": 0, "batched": args.rows_per_step}
    measured = {}
    for mode, rows in modes.items():
        copy = work / f"{mode.replace(' ', '-')}-{users}"
        shutil.copytree(store, copy)
        out = work / f"{copy.name}.json"
        tokens = args.tokens_per_step if rows else 0
        wall, rss, code, cpu = run_child([sys.executable, __file__, "--child", "--store", str(copy), "--out", str(out),
                                          "--rows-per-step", str(rows), "--tokens-per-step", str(tokens),
                                          "--max-adapters-per-step", str(args.max_adapters_per_step),
                                          "--epochs", str(args.epochs), "--device", args.device, "--dtype", args.dtype])
        if code:
            raise SystemExit(f"{mode} failed with status {code}")
        measured[mode] = (wall, rss, json.loads(out.read_text()), cpu)
    (w0, r0, seq, c0), (w1, r1, bat, c1) = measured["one after another"], measured["batched"]
    diffs = [abs(bat["users"][u]["heldout"] - seq["users"][u]["heldout"]) / seq["users"][u]["heldout"]
             for u in seq["users"] if "heldout" in seq["users"][u] and seq["users"][u]["heldout"]]
    gates_same = all(bat["users"][u].get("promoted") == seq["users"][u].get("promoted") for u in seq["users"])
    failed = sum("failed" in v for m in (seq, bat) for v in m["users"].values())
    print(f"{users} users: one after another {seq['update_s']:.1f}s (+{seq['load_s']:.1f}s start), batched "
          f"{bat['update_s']:.1f}s (+{bat['load_s']:.1f}s start); failures {failed}")
    return [
        [f"{users} users: update --all wall time, s (whole child process)", w0, w1, w0 / w1],
        [f"{users} users: training and evaluation only, s", seq["update_s"], bat["update_s"], seq["update_s"] / bat["update_s"]],
        [f"{users} users: CPU seconds, user + system (whole child process)", c0, c1, c0 / c1],
        [f"{users} users: training steps (forward + backward passes of the base)", seq["steps"], bat["steps"], ""],
        [f"{users} users: max held-out loss difference, batched vs alone", "", f"{max(diffs, default=0):.2%}", ""],
        [f"{users} users: gate decisions identical", "", str(gates_same), ""],
        [f"{users} users: peak RSS, MiB", r0, r1, r1 / r0],
    ]


PLAIN = r'''
import json, sys, time
t0 = time.perf_counter()
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
t_import = time.perf_counter()
base, data, epochs, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
t_load = time.perf_counter()
c_load = time.process_time()
rows = [json.loads(line)["messages"] for line in open(data)]
texts = [tok.apply_chat_template(m, tokenize=False) for m in rows]
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
model.train()
torch.manual_seed(0)
steps = padded = real = 0
for epoch in range(epochs):
    for k in range(0, len(texts), 8):
        enc = tok(texts[k:k + 8], return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad(); loss.backward(); opt.step()
        steps += 1; padded += enc.input_ids.numel(); real += int(enc.attention_mask.sum())
t_train = time.perf_counter()
print(json.dumps({"imports": t_import - t0, "load": t_load - t_import, "train": t_train - t_load,
                  "train_cpu": time.process_time() - c_load, "steps": steps, "padded": padded, "real": real}))
'''


PHASES = ["base load (Trainer: imports transformers, loads and checks the base)", "parent load", "split + tokenize + replay", "evaluate parent", "train",
          "evaluate new", "publish + replay buffer"]


def breakdown(args) -> None:
    """The single update again, in this process, with where its work goes: per phase, the base's forward passes
    (with a gradient: training steps), rows, padded and real tokens, CPU and wall seconds. JSON on ``--out``."""
    import resource

    import torch

    from persona import Store
    from persona.interactions import read_interactions

    def clock():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime, time.perf_counter()

    phases = {name: {"passes": 0, "grad_passes": 0, "rows": 0, "padded": 0, "real": 0, "cpu_s": 0.0, "wall_s": 0.0}
              for name in PHASES}
    current = [PHASES[0]]
    mark = [clock()]

    def enter(name):
        now = clock()
        phases[current[0]]["cpu_s"] += now[0] - mark[0][0]
        phases[current[0]]["wall_s"] += now[1] - mark[0][1]
        current[0], mark[0] = name, now

    from persona.training.trainer import Trainer, UpdateConfig

    store = Store.open(args.store)
    items = read_interactions(args.data)
    trainer = Trainer(store, device=args.device, dtype=args.dtype)

    def count(module, a, kw):
        ids, mask = kw.get("input_ids", a[0] if a else None), kw.get("attention_mask")
        p = phases[current[0]]
        p["passes"] += 1
        p["grad_passes"] += int(torch.is_grad_enabled())
        p["rows"] += ids.shape[0]
        p["padded"] += ids.numel()
        p["real"] += int(mask.sum()) if mask is not None else ids.numel()

    trainer.model.get_decoder().register_forward_pre_hook(count, with_kwargs=True)

    def wrap(method, name):
        real = getattr(trainer, method)

        def phase(*a, **kw):
            enter(name() if callable(name) else name)
            try:
                return real(*a, **kw)
            finally:
                enter("publish + replay buffer")
        setattr(trainer, method, phase)

    measured = [0]

    def evaluate_name():
        measured[0] += 1
        return "evaluate parent" if measured[0] == 1 else "evaluate new"

    wrap("_load_parent", "parent load")
    wrap("_prepare", "split + tokenize + replay")
    wrap("_measure", evaluate_name)
    wrap("_train", "train")
    result = trainer.update("user:solo", items, UpdateConfig(epochs=args.epochs, seed=0))
    enter("publish + replay buffer")
    Path(args.out).write_text(json.dumps({"phases": phases, "steps": result.metrics["steps"]}))


def breakdown_rows(found: dict, plain: dict) -> list[list[object]]:
    """Rows of the where-the-time-goes table: persona's phases, then the plain loop's training for comparison."""
    phases = found["phases"]
    cpu_total = sum(p["cpu_s"] for p in phases.values()) or 1.0
    rows = []
    for name in PHASES:
        p = phases[name]
        work = (f"{p['passes']} passes ({p['grad_passes']} with backward), {p['rows']} rows, "
                f"{p['padded']} padded / {p['real']} real tokens") if p["passes"] else "no pass of the base"
        rows.append([f"  persona phase: {name}: {work}", f"{p['cpu_s']:.2f} CPU s",
                     f"{p['cpu_s'] / cpu_total:.0%} of CPU", f"{p['wall_s']:.2f} wall s"])
    rows.append([f"  plain loop training: {plain['steps']} passes with backward, {plain['padded']} padded / "
                 f"{plain['real']} real tokens", f"{plain['train_cpu']:.2f} CPU s", "", f"{plain['train']:.2f} wall s"])
    return rows


def single_update(work: Path, base_id: str, args) -> list[list[object]]:
    """12 chats: ``persona update`` as a whole process vs a plain PEFT loop as a whole process."""
    from persona import LoraSettings, Store

    data = write_jsonl(work / "single.jsonl", user_chats(99, 12))
    store = Store.init(work / "single-store", base=base_id)
    store.create("user:solo", LoraSettings(rank=8, alpha=16))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PERSONA_HOME": str(work / "single-store")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import persona.cli.main, persona.training.trainer"], env=env, check=True)
    import_s = time.perf_counter() - start
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "persona", "update", "user:solo", "--data", str(data), "--json",
                           "--epochs", str(args.epochs), "--device", args.device, "--dtype", args.dtype],
                          env=env, capture_output=True, text=True, check=False)
    cli_s = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"persona update failed: {done.stderr[-2000:]}")
    metrics = json.loads(done.stdout)["metrics"]
    from persona.base import resolve_base

    base_path = resolve_base(base_id)  # the local safetensors folder (the embedded base converted once)
    start = time.perf_counter()
    plain = subprocess.run([sys.executable, "-c", PLAIN, str(base_path), str(data),
                            str(args.epochs), "1e-3"], env=env, capture_output=True, text=True, check=False)
    plain_s = time.perf_counter() - start
    if plain.returncode:
        raise SystemExit(f"plain PEFT loop failed: {plain.stderr[-2000:]}")
    p = json.loads(plain.stdout.strip().splitlines()[-1])
    update_s = metrics["seconds"]
    fresh = Store.init(work / "breakdown-store", base=base_id)  # the same update again, instrumented
    fresh.create("user:solo", LoraSettings(rank=8, alpha=16))
    found_out = work / "breakdown.json"
    *_, code, _ = run_child([sys.executable, __file__, "--breakdown", "--store", str(fresh.root), "--data", str(data),
                             "--out", str(found_out), "--epochs", str(args.epochs), "--device", args.device,
                             "--dtype", args.dtype])
    if code:
        raise SystemExit(f"the instrumented update failed with status {code}")
    found = json.loads(found_out.read_text())
    return [
        ["single update (12 chats), whole process, s", cli_s, plain_s, cli_s / plain_s],
        ["  of which python start + imports (persona: `import persona.cli.main`), s", import_s, p["imports"], ""],
        ["  of which the update itself (persona: load parent, split, evaluate twice, train, publish), s", update_s, p["train"], ""],
        ["  the rest (persona: base load, store, CLI; plain: model load + LoRA), s", cli_s - import_s - update_s, p["load"], ""],
        [f"  steps (persona; plain: batches of 8 x {args.epochs} epochs)", metrics["steps"], p["steps"], ""],
        ["where persona's update goes (instrumented run, in one process)", "CPU s", "share", "wall s"],
        *breakdown_rows(found, p),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", default="8,32", help="comma-separated user counts (default 8,32)")
    parser.add_argument("--chats", type=int, default=40, help="pending chats per user")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rows-per-step", type=int, default=64)
    parser.add_argument("--max-adapters-per-step", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 users, 8 chats, 1 epoch")
    parser.add_argument("--no-single", action="store_true", help="skip the single-update comparison")
    parser.add_argument("--single-only", action="store_true", help="only the single-update comparison and its breakdown")
    parser.add_argument("--random-base", type=Path, metavar="ARCH",
                        help="random weights of ARCH's architecture (serve_engine.py --save-arch) instead of the "
                             "embedded base: times hold, losses are meaningless")
    parser.add_argument("--tokens-per-step", type=int, default=0,
                        help="batched mode's padded-token cap per step (0: rows only)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--breakdown", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    add_placement_options(parser)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    if args.breakdown:
        breakdown(args)
        return
    if args.quick:
        args.users, args.chats, args.epochs = "2", 8, 1
    header("persona bulk update benchmark" + (" (QUICK: tiny random model, numbers meaningless)" if args.quick else ""))
    print(f"{args.chats} pending chats per user, {args.epochs} epochs, rows per step {args.rows_per_step}, "
          f"tokens per step {args.tokens_per_step or 'uncapped'}, at most {args.max_adapters_per_step} adapters per step\n")
    rows = []
    with workspace("update-many", args.quick) as (work, base_id):
        if args.random_base and not args.quick:
            base_id = make_random_base(args.random_base, work / "random-base")
        for users in [] if args.single_only else [int(u) for u in args.users.split(",")]:
            rows += compare_modes(work, base_id, users, args)
        if not args.no_single:
            rows += single_update(work, base_id, args)
    print()
    print(table(["measure", "one after another / persona CLI", "batched / plain PEFT loop", "ratio"], rows))


if __name__ == "__main__":
    main()
